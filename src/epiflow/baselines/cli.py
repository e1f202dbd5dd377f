"""CLI verbs of the baselines: ``run-baseline``, ``baseline-env``, ``baselines-table``, ``list-baselines``."""

from __future__ import annotations

import argparse
import json

# the settings of the perturbation tasks that score a perturbation / genetic baseline
SCORING_FIELDS = ("min_cells", "k", "n_top", "da_tie_correct")


def _params(items) -> dict:
    from ..errors import EpiflowError

    out = {}
    for it in items or []:
        if "=" not in it:
            raise EpiflowError(f"--param expects KEY=VALUE, got {it!r}", field="--param")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _dataset_name(adata) -> str:
    """The metrics' dataset: one dataset's name, else 'all' (as the EpiAgent tasks name a multi-dataset run)."""
    if "dataset" in adata.obs and adata.obs["dataset"].nunique() == 1:
        return str(adata.obs["dataset"].iloc[0])
    return "all"


def _run(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from ..io import atomic_path
    from ..metrics.table import metrics_frame, write_metrics
    from .base import get_adapter, save_output
    from ..cliargs import check_config
    from ..tasks.config import PerturbationConfig
    from .run import canonical_input, evaluate, leave_one_type_out, load_counts, run_baseline, stimulation_types

    log = logging.getLogger("epiflow.baselines")
    spec = get_adapter(args.tool, args.task)
    params = _params(args.param)
    params.setdefault("seed", args.seed)
    adata = load_counts(corpus=args.corpus, counts=args.counts, dataset=args.dataset)
    holdout = [h.strip() for item in args.holdout or [] for h in item.split(",") if h.strip()]
    check_config(PerturbationConfig(**{f: getattr(args, f) for f in SCORING_FIELDS}))  # bounds, naming the flag
    ks = list(args.k)
    canonical = dict(label_key=args.label_key, batch_key=args.batch_key, condition_key=args.condition_key,
                     control=args.control, min_open_fraction=args.min_open_fraction, top_n=args.top_n,
                     perturbation_key=args.perturbation_key, holdout_fraction=args.holdout_fraction,
                     min_cells=args.min_cells)
    run = dict(env=args.env, cache=args.env_cache, envs_dir=args.envs_dir, timeout=args.timeout, threads=args.threads)
    method = args.method or spec.method_for(args.task)
    cells = None
    if args.task == "perturbation":
        # leave-one-cell-type-out, as EpiAgent's predict-stimulation: one fit per held-out type
        holdouts = stimulation_types(adata, label_key=args.label_key, condition_key=args.condition_key,
                                     control=args.control, min_cells=args.min_cells, holdout=holdout)
        if not args.umap:
            umap_groups = []  # no UMAP computed, no cells.tsv written
        else:
            umap_groups = None if not args.umap_group else [g for g in args.umap_group if g in holdouts]
        log.info("%s on %s: holding out %s in turn", method, args.task, holdouts)
        rows, out, cells = leave_one_type_out(args.tool, adata, holdouts=holdouts, method=method,
                                              dataset=_dataset_name(adata), params=params, canonical=canonical,
                                              run=run, ks=ks, n_top=args.n_top, tie_correct=args.da_tie_correct,
                                              seed=args.seed,
                                              umap_groups=umap_groups)
        inp, ctx = None, {}
    else:
        inp, ctx = canonical_input(adata, args.task, holdout=holdout or None, seed=args.seed, **canonical)
        log.info("%s on %s: %d cells x %d features", method, args.task, inp.n_obs, inp.n_vars)
        out = run_baseline(args.tool, inp, args.task, params, **run)
        rows = evaluate(out, inp, ctx, dataset=_dataset_name(inp), method=method, seed=args.seed,
                        n_neighbors=args.n_neighbors, ks=ks, n_top=args.n_top, tie_correct=args.da_tie_correct)
    od = Path(args.out_dir)
    od.mkdir(parents=True, exist_ok=True)
    with atomic_path(od / "output.npz") as tmp:
        save_output(out, tmp)
    if cells is not None and args.umap:
        with atomic_path(od / "cells.tsv") as tmp:
            cells.to_csv(tmp, sep="\t", index=False)
    elif cells is not None:
        (od / "cells.tsv").unlink(missing_ok=True)  # an earlier run's UMAPs would not match this run
    if out.embedding is not None:
        import anndata as ad
        import numpy as np

        e = ad.AnnData(obs=ctx["obs"].copy())
        e.obs_names = inp.obs_names
        e.obsm[f"X_{args.tool}"] = np.asarray(out.embedding, np.float32)
        with atomic_path(od / "embedding.h5ad") as tmp:
            e.write_h5ad(tmp)
    if out.labels is not None:
        import pandas as pd

        tab = pd.DataFrame({"cell": inp.obs_names, "split": inp.obs["split"].to_numpy(),
                            "true": ctx["truth"], "predicted": out.labels})
        with atomic_path(od / "predictions.tsv") as tmp:
            tab.to_csv(tmp, sep="\t", index=False)
    with atomic_path(od / "info.json") as tmp:
        Path(tmp).write_text(json.dumps({"tool": args.tool, "method": method, "task": args.task,
                                         "params": params, **out.info}, indent=1, default=str))
    write_metrics(metrics_frame(rows), od / "metrics.tsv")
    log.info("%s: wrote %s", method, od / "metrics.tsv")
    return 0


def _env(args: argparse.Namespace) -> int:
    from .venv import ensure_env, env_info

    for tool in args.tool:
        d = ensure_env(tool, cache=args.env_cache, envs_dir=args.envs_dir)
        info = env_info(d)
        print(f"{tool}\t{d}\tbuilt in {info['build_seconds']} s")
        if args.stamp:
            from pathlib import Path

            Path(args.stamp).write_text(json.dumps({"tool": tool, "env": str(d), **info}, indent=1))
    return 0


def _list(args: argparse.Namespace) -> int:
    from .base import NOT_ON_PYPI, REGISTRY

    print("tool\tmethod\ttasks\tdefault_env\tpypi")
    for s in REGISTRY.values():
        print(f"{s.tool}\t{s.method}\t{','.join(s.tasks)}\t{s.default_env}\t{s.pypi or '-'}")
    for name, task in NOT_ON_PYPI.items():
        print(f"-\t{name}\t{task}\tnot installable from PyPI\t-")
    return 0


def _table(args: argparse.Namespace) -> int:
    import pandas as pd

    from ..metrics.table import metrics_frame, read_metrics, write_metrics

    parts = [read_metrics(path) for path in args.metrics]
    write_metrics(metrics_frame(pd.concat(parts, ignore_index=True).to_dict("records")), args.out)
    return 0


def register(subparsers) -> None:
    from ..cliargs import OneOrSeveral, add_config_args, fields
    from ..tasks.config import PerturbationConfig, StimulationConfig

    p = subparsers.add_parser("run-baseline", help="run one baseline tool on a task and score it",
                              description="Run a baseline (its adapter, in-process or in the tool's own "
                                          "environment) and write metrics.tsv (task, dataset, method, "
                                          "metric, value), output.npz, info.json and embedding.h5ad / "
                                          "predictions.tsv; perturbation: leave-one-cell-type-out (one fit per "
                                          "held-out type, rows metric[type] and their means) and cells.tsv "
                                          "(Fig. 3g UMAPs).")
    p.add_argument("--tool", required=True, help="see `epiflow list-baselines`")
    p.add_argument("--task", required=True,
                   choices=["feature_extraction", "integration", "annotation", "imputation", "perturbation",
                            "genetic"])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", nargs="+", action=OneOrSeveral, metavar="PATH",
                     help="corpus folder (raw counts of its shards); several folders of one vocabulary (the corpus "
                          "and downstream folders tokenized onto it) are read together")
    src.add_argument("--counts", help="h5ad of raw counts")
    p.add_argument("--dataset", help="only the cells of this obs['dataset'] (several: comma-separated)")
    p.add_argument("--label-key", default="cell_type")
    p.add_argument("--batch-key", default="batch")
    p.add_argument("--condition-key", default="condition")
    p.add_argument("--control", default="control")
    p.add_argument("--holdout", action="append", metavar="GROUP[,GROUP...]",
                   help="perturbation: the cell types held out in turn (repeat or comma list; default: every type "
                        "with >= --min-cells control and perturbed cells, as predict-stimulation); genetic: the "
                        "held-out perturbations (default: EpiAgent's seeded split)")
    # perturbation, genetic: scored as the EpiAgent tasks (the same declarations, defaults and bounds)
    add_config_args(p, PerturbationConfig, exclude=[f.name for f, _ in fields(PerturbationConfig)
                                                    if f.name not in SCORING_FIELDS],
                    group="perturbation / genetic scoring (as predict-stimulation / predict-genetic)")
    add_config_args(p, StimulationConfig, exclude=[f.name for f, _ in fields(StimulationConfig) if f.name != "umap"],
                    group="perturbation UMAPs (as predict-stimulation)")
    p.add_argument("--umap-group", action="append",
                   help="perturbation: the held-out types whose cells.tsv UMAPs are made (default: every one; the "
                        "workflow passes tasks.stimulation.focus_group)")
    p.add_argument("--perturbation-key", default="perturbation",
                   help="genetic: obs column of perturbation labels (control or gene symbols joined by '+')")
    p.add_argument("--holdout-fraction", type=float, default=0.25,
                   help="genetic: fraction of the perturbations held out (EpiAgent's split)")
    p.add_argument("--min-open-fraction", type=float, default=0.03, help="imputation cCRE filter (paper: 0.03)")
    p.add_argument("--top-n", type=int, default=50_000, help="perturbation input: most accessible cCREs")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="adapter parameter (JSON value)")
    p.add_argument("--method", help="name in the metrics table (default: the tool's)")
    p.add_argument("--env", default="auto", choices=["auto", "inprocess", "venv"])
    p.add_argument("--env-cache", help="venv cache folder (default $EPIFLOW_ENV_CACHE or ~/.cache/epiflow/envs)")
    p.add_argument("--envs-dir", help="folder of baseline-<tool>.yaml files (default: the repository's envs/)")
    p.add_argument("--timeout", type=int, help="seconds allowed for the tool's run in its venv")
    p.add_argument("--threads", type=int, help="OMP/MKL threads in the tool's venv")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-neighbors", type=int, default=15)
    p.add_argument("--out", "--out-dir", dest="out_dir", required=True, metavar="DIR")
    p.set_defaults(func=_run)

    e = subparsers.add_parser("baseline-env", help="build (or find) the virtual environment of baseline tools")
    e.add_argument("--tool", action="append", required=True)
    e.add_argument("--env-cache")
    e.add_argument("--envs-dir")
    e.add_argument("--stamp", help="write the env's description (JSON) here (last tool)")
    e.set_defaults(func=_env)

    t = subparsers.add_parser("baselines-table", help="concatenate metrics tables (task, dataset, method, metric, value)")
    t.add_argument("metrics", nargs="+")
    t.add_argument("--out", required=True, metavar="FILE")
    t.set_defaults(func=_table)

    ls = subparsers.add_parser("list-baselines", help="the baseline tools, their tasks and environments")
    ls.set_defaults(func=_list)
