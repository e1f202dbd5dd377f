"""CLI verbs of the baselines: ``run-baseline``, ``baseline-env``, ``baselines-table``, ``list-baselines``."""

from __future__ import annotations

import argparse
import json

# the settings of the perturbation tasks that score a perturbation / genetic baseline
SCORING_FIELDS = ("min_cells", "k", "n_top", "da_tie_correct")


def task_scoring_settings() -> dict:
    """The settings of EpiAgent's tasks that define how a baseline of the same task is scored (its
    cells, split, features and metric parameters), declared once, in the task's settings class:
    ``{task: (settings class, field names)}``. run-baseline takes them as the task's verb does (same
    flags, defaults, bounds); the workflow passes the task's values (common.smk, baseline_args)."""
    from ..tasks.config import (AnnotationConfig, FeaturesConfig, ImputationConfig, IntegrationConfig,
                                PerturbationConfig)

    return {"feature_extraction": (FeaturesConfig, ("n_neighbors", "max_iter")),
            "annotation": (AnnotationConfig, ("query_fraction",)),
            "imputation": (ImputationConfig, ("min_cell_fraction", "n_pcs")),
            "integration": (IntegrationConfig, ("max_cells", "common_ccres")),
            "perturbation": (PerturbationConfig, SCORING_FIELDS)}


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
    from .run import canonical_input, evaluate, leave_one_type_out, load_counts, run_baseline, stimulation_types

    log = logging.getLogger("epiflow.baselines")
    spec = get_adapter(args.tool, args.task)
    params = _params(args.param)
    params.setdefault("seed", args.seed)
    from ..errors import ConfigError

    if args.task != "integration":  # integrate's own settings: another task would ignore them
        given = [f for f, v in (("--label-map", args.label_map), ("--max-cells", args.max_cells),
                                ("--common-ccres", args.common_ccres or None)) if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} belong to --task integration, not {args.task}", field=given[0],
                              fix=f"leave {'it' if len(given) == 1 else 'them'} out, or run --task integration")
    # bounds of the settings the EpiAgent tasks declare, naming the flag
    for cls, names in task_scoring_settings().values():
        check_config(cls(**{f: getattr(args, f) for f in names}))
    adata = load_counts(corpus=args.corpus, counts=args.counts, dataset=args.dataset,
                        keep_tfidf=args.task == "imputation")
    holdout = [h.strip() for item in args.holdout or [] for h in item.split(",") if h.strip()]
    ks = list(args.k)
    label_map = None
    if args.label_map is not None:
        from ..tasks.zeroshot import read_label_map

        label_map = read_label_map(args.label_map)
    canonical = dict(label_key=args.label_key, batch_key=args.batch_key, condition_key=args.condition_key,
                     control=args.control, min_cell_fraction=args.min_cell_fraction, top_n=args.top_n,
                     perturbation_key=args.perturbation_key, holdout_fraction=args.holdout_fraction,
                     min_cells=args.min_cells, query_fraction=args.query_fraction, label_map=label_map,
                     max_cells=args.max_cells, common_ccres=args.common_ccres)
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
                        n_neighbors=args.n_neighbors, max_iter=args.max_iter, n_pcs=args.n_pcs, ks=ks,
                        n_top=args.n_top, tie_correct=args.da_tie_correct)
        if "reference_kind" in ctx:
            out.info["imputation_reference"] = ctx["reference_kind"]
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
    from ..tasks.config import StimulationConfig

    p = subparsers.add_parser("run-baseline", help="run one baseline tool on a task and score it",
                              description="Run a baseline (its adapter, in-process or in the tool's own "
                                          "environment) and write metrics.tsv (task, dataset, method, "
                                          "metric, value), output.npz, info.json and embedding.h5ad / "
                                          "predictions.tsv; perturbation: leave-one-cell-type-out (one fit per "
                                          "held-out type, rows metric[type] and their means) and cells.tsv "
                                          "(Fig. 3g UMAPs).")
    p.add_argument("--tool", required=True, help="see `epiflow list-baselines`")
    p.add_argument("--task", required=True, help="the task the tool runs and is scored on",
                   choices=["feature_extraction", "integration", "annotation", "imputation", "perturbation",
                            "genetic"])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", nargs="+", action=OneOrSeveral, metavar="PATH",
                     help="corpus folder (raw counts of its shards); several folders of one vocabulary (the corpus "
                          "and downstream folders tokenized onto it) are read together")
    src.add_argument("--counts", help="h5ad of raw counts")
    p.add_argument("--dataset", help="only the cells of this obs['dataset'] (several: comma-separated)")
    p.add_argument("--label-key", default="cell_type",
                   help="obs column with the cell types (genetic: optional labels) (default: cell_type)")
    p.add_argument("--batch-key", default="batch", help="integration: obs column with the batches (default: batch)")
    p.add_argument("--condition-key", default="condition",
                   help="perturbation: obs column of the condition (default: condition)")
    p.add_argument("--control", default="control",
                   help="perturbation / genetic: label of the unperturbed cells (default: control)")
    p.add_argument("--holdout", action="append", metavar="GROUP[,GROUP...]",
                   help="perturbation: the cell types held out in turn (repeat or comma list; default: every type "
                        "with >= --min-cells control and perturbed cells, as predict-stimulation); genetic: the "
                        "held-out perturbations (default: EpiAgent's seeded split)")
    # each task scored as EpiAgent's (the same declarations, defaults and bounds as the task's verb)
    verbs = {"feature_extraction": "evaluate-features", "annotation": "annotate", "imputation": "impute",
             "integration": "integrate", "perturbation": "predict-stimulation / predict-genetic"}
    for task, (cls, names) in task_scoring_settings().items():
        add_config_args(p, cls, exclude=[f.name for f, _ in fields(cls) if f.name not in names],
                        group=f"{task.replace('_', ' ')}{' / genetic' if task == 'perturbation' else ''}: "
                              f"cells and scoring (as {verbs[task]})")
    p.add_argument("--label-map", metavar="TSV",
                   help="integration: label-map TSV giving shared (coarse) labels, as integrate's --label-map")
    add_config_args(p, StimulationConfig, exclude=[f.name for f, _ in fields(StimulationConfig) if f.name != "umap"],
                    group="perturbation UMAPs (as predict-stimulation)")
    p.add_argument("--umap-group", action="append",
                   help="perturbation: the held-out types whose cells.tsv UMAPs are made (default: every one; the "
                        "workflow passes tasks.stimulation.focus_group)")
    p.add_argument("--perturbation-key", default="perturbation",
                   help="genetic: obs column of perturbation labels (control or gene symbols joined by '+')")
    p.add_argument("--holdout-fraction", type=float, default=0.25,
                   help="genetic: fraction of the perturbations held out (EpiAgent's split)")
    p.add_argument("--top-n", type=int, default=50_000,
                   help="perturbation / genetic input: the most accessible cCREs (paper: 50,000)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="adapter parameter (JSON value)")
    p.add_argument("--method", help="name in the metrics table (default: the tool's)")
    p.add_argument("--env", default="auto", choices=["auto", "inprocess", "venv"],
                   help="where the tool runs: auto = the registry's default for the tool, inprocess = this "
                        "Python, venv = its own virtual environment (default: auto)")
    p.add_argument("--env-cache", help="venv cache folder (default $EPIFLOW_ENV_CACHE or ~/.cache/epiflow/envs)")
    p.add_argument("--envs-dir", help="folder of baseline-<tool>.yaml files (default: the repository's envs/)")
    p.add_argument("--timeout", type=int, help="seconds allowed for the tool's run in its venv")
    p.add_argument("--threads", type=int, help="OMP/MKL threads in the tool's venv")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the tool, the split and the scores (the workflow passes the task's) (default: 0)")
    p.add_argument("--out", "--out-dir", dest="out_dir", required=True, metavar="DIR")
    p.set_defaults(func=_run)

    e = subparsers.add_parser("baseline-env", help="build (or find) the virtual environment of baseline tools")
    e.add_argument("--tool", action="append", required=True, help="tool name (repeat for several; see list-baselines)")
    e.add_argument("--env-cache", help="venv cache folder (default $EPIFLOW_ENV_CACHE or ~/.cache/epiflow/envs)")
    e.add_argument("--envs-dir", help="folder of baseline-<tool>.yaml files (default: the repository's envs/)")
    e.add_argument("--stamp", help="write the env's description (JSON) here (last tool)")
    e.set_defaults(func=_env)

    t = subparsers.add_parser("baselines-table", help="concatenate metrics tables (task, dataset, method, metric, value)")
    t.add_argument("metrics", nargs="+", help="metrics.tsv files of baseline runs")
    t.add_argument("--out", required=True, metavar="FILE", help="the concatenated table (TSV)")
    t.set_defaults(func=_table)

    ls = subparsers.add_parser("list-baselines", help="the baseline tools, their tasks and environments")
    ls.set_defaults(func=_list)
