"""Baselines side by side: runtime and scores of each tool on one data set (one JSON object).

    python benchmarks/bench_baselines.py --quick            # synthetic cells, light tools in-process
    python benchmarks/bench_baselines.py --data ../shared/data/buenrostro2018_bm0828.h5ad \
        --tools lsi,lda,pca,harmony,peakvi --venv            # real data; heavy tools in their venvs

For each (tool, task) the JSON has ``runtime_s`` (adapter, including the venv subprocess) and the
task's main scores. Tools whose environment cannot be built are reported with their error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="small synthetic data, light tools only")
    p.add_argument("--data", help="h5ad of raw counts with obs cell_type (and batch)")
    p.add_argument("--tools", default="lsi,lda,pca,pca_svm,mlp")
    p.add_argument("--venv", action="store_true", help="run the venv tools (harmony, peakvi, ...) as well")
    p.add_argument("--epochs", type=int, default=20, help="PeakVI / SCALE(X) training length")
    args = p.parse_args(argv)
    import anndata as ad

    from epiflow.baselines.base import get_adapter
    from epiflow.baselines.run import canonical_input, evaluate, run_baseline
    from epiflow.errors import EpiflowError

    if args.data:
        adata = ad.read_h5ad(args.data)
        if "batch" not in adata.obs:
            adata.obs["batch"] = adata.obs.get("donor", "b0")
        name = os.path.basename(args.data)
    else:
        from test_baselines import synthetic

        adata = synthetic(n_per=100 if not args.quick else 40, n_feat=2000 if not args.quick else 400)
        name = "synthetic"
    tools = args.tools.split(",")
    res = {"data": name, "n_cells": int(adata.n_obs), "n_features": int(adata.n_vars), "runs": {}}
    params = {"peakvi": {"max_epochs": args.epochs}, "scalex": {"max_iteration": args.epochs * 50},
              "scale": {"max_iter": args.epochs * 50}}
    for tool in tools:
        spec = get_adapter(tool)
        if spec.default_env == "venv" and not args.venv:
            continue
        for task in spec.tasks:
            if task == "integration" and adata.obs["batch"].nunique() < 2:
                continue
            key = f"{tool}/{task}"
            t0 = time.perf_counter()
            try:
                inp, ctx = canonical_input(adata, task)
                out = run_baseline(tool, inp, task, params.get(tool, {}), threads=1)
                m = {r["metric"]: r["value"] for r in evaluate(out, inp, ctx, dataset=name, method=spec.method)}
                keep = ("NMI", "ARI", "accuracy", "macro_F1", "iLISI", "kBET", "runtime_s")
                res["runs"][key] = {k: round(float(v), 4) for k, v in m.items() if k in keep}
            except EpiflowError as exc:
                res["runs"][key] = {"error": str(exc).splitlines()[0][:300]}
            res["runs"][key]["wall_s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
