"""Integration on real cells with the transfer benchmark's model (issue #18's before / after table).

Integrates the two downstream sets of a finished transfer workflow run (Granja 2019 held-out cells and
Buenrostro 2018, both on the corpus vocabulary; batch = study) with its pretrained checkpoint, and prints
NMI / ARI / iLISI / kBET / batch ASW per embedding (EpiAgent-BC, without batch token, zero-shot, LSI).

    python benchmarks/integration_transfer.py --results results/transfer_learn12 --out /tmp/int_after
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(ROOT / "results" / "transfer_learn12"),
                   help="results_dir of a transfer workflow run (config/transfer.yaml)")
    p.add_argument("--datasets", default="granja2019_d6t1_heldout,buenrostro2018_bm0828")
    p.add_argument("--out", required=True, help="output folder of the integration")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from epiflow.report.results import write_task_result
    from epiflow.tasks.common import load_cells, load_model
    from epiflow.tasks.config import IntegrationConfig
    from epiflow.tasks.integration import run
    from epiflow.tasks.zeroshot import read_label_map

    res = Path(a.results)
    folders = [res / "downstream" / d for d in a.datasets.split(",")]
    missing = [str(f) for f in folders + [res / "pretrain" / "checkpoint.pth"] if not f.exists()]
    if missing:
        print(f"error: missing {missing}: run the transfer workflow first "
              "(snakemake --configfile config/transfer.yaml config/transfer_learn.yaml)", file=sys.stderr)
        return 2
    cells = load_cells(folders)
    cells.obs["batch"] = cells.obs["dataset"].astype(str)
    cfg = IntegrationConfig(batch_key="batch", label_key="cell_type", max_steps=a.steps, common_ccres=True,
                            umap=False, progress=False, seed=a.seed)
    model = load_model(res / "pretrain" / "checkpoint.pth", n_ccres=cells.n_ccres, device=cfg.device)
    result = run(cells, model, cfg,
                 label_map=read_label_map(ROOT / "resources" / "label_maps" / "hematopoiesis_shared_coarse.tsv"))
    write_task_result(result, a.out, models=True)
    m = result.metrics
    keep = ["NMI", "ARI", "iLISI", "kBET", "graph_connectivity", "batch_ASW", "final_loss"]
    print(m[m.metric.isin(keep)].pivot_table(index="method", columns="metric", values="value").round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
