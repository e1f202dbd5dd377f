"""Run one adapter on an h5ad and write its output (.npz): the entry point inside a tool's environment.

    python -m epiflow.baselines.runner --tool T --task TASK --input in.h5ad --params p.json --output out.npz

Only numpy, scipy, anndata and the tool are needed (``epiflow``'s own source is put on
``PYTHONPATH`` by :func:`epiflow.baselines.venv.run_in_venv`). Errors are printed as one line
``EPIFLOW-ERROR: <message>`` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m epiflow.baselines.runner")
    p.add_argument("--tool", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--params", required=True)
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from ..errors import EpiflowError
    from .base import get_adapter, save_output

    try:
        import anndata as ad

        spec = get_adapter(args.tool, args.task)
        with open(args.params) as fh:
            params = json.load(fh)
        adata = ad.read_h5ad(args.input)
        t0 = time.perf_counter()
        out = spec.load()(adata, args.task, params)
        out.info["fit_seconds"] = time.perf_counter() - t0
        out.check(args.task, adata.n_obs)
        save_output(out, args.output)
    except EpiflowError as exc:
        print(f"EPIFLOW-ERROR: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
