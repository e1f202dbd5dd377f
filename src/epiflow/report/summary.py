"""One table of everything the workflow measured.

Every task writes its numbers in the long format ``task dataset method metric value`` (see
:mod:`epiflow.tasks.features`). :func:`summarize` concatenates such tables and adds rows describing
the corpus (``corpus.json``: cells, cCREs, shards) and the pretraining run (the last row of its
``metrics.csv``), so ``results/summary.tsv`` is the single place to read a run's outcome.

Column ``seen_in_pretraining`` says per row whether the model saw the cells of its dataset in
pretraining: ``true`` for the pretraining corpus' datasets (``all`` = every corpus cell), ``false``
for downstream datasets (folders of ``epiflow tokenize-downstream``), ``partly`` for a row over
datasets of both kinds, ``unknown`` when the model is an external checkpoint (published or earlier
weights: what they were trained on is not recorded here) or the dataset is in neither list.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Iterable

import pandas as pd

from ..errors import InputFormatError
from ..io import atomic_path
from ..metrics.table import METRIC_COLUMNS, read_metrics

log = logging.getLogger(__name__)

SEEN_COLUMN = "seen_in_pretraining"


def _read_metrics(path: Path) -> pd.DataFrame:
    df = read_metrics(path, extra=[SEEN_COLUMN])
    df["source"] = str(path)
    return df


def _corpus_meta(corpus_dir: Path) -> dict:
    meta_path = corpus_dir / "corpus.json"
    try:
        return json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputFormatError(f"cannot read corpus metadata ({exc})", path=meta_path,
                               fix="pass a corpus folder written by 'epiflow build-corpus'") from None


def _corpus_rows(corpus_dir: Path, dataset: str = "all") -> pd.DataFrame:
    meta_path = corpus_dir / "corpus.json"
    meta = _corpus_meta(corpus_dir)
    rows = []
    for key, value in meta.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        rows.append({"task": "corpus", "dataset": dataset, "method": "-", "metric": key, "value": float(value)})
    shards = sorted((corpus_dir / "shards").glob("shard_*.h5"))
    if shards and not any(r["metric"] == "n_shards" for r in rows):
        rows.append({"task": "corpus", "dataset": dataset, "method": "-", "metric": "n_shards",
                     "value": float(len(shards))})
    out = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    out["source"] = str(meta_path)
    return out


def _pretrain_rows(metrics_csv: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(metrics_csv)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputFormatError(f"cannot read pretraining metrics ({exc})", path=metrics_csv,
                               fix="pass the metrics.csv written by 'epiflow pretrain'") from None
    rows = []
    if len(df):
        # the last value of each numeric column (different columns may be logged at different steps)
        for col in df.columns:
            series = pd.to_numeric(df[col], errors="coerce").dropna()
            if len(series) and math.isfinite(float(series.iloc[-1])):
                rows.append({"task": "pretrain", "dataset": "all", "method": "EpiAgent",
                             "metric": f"last_{col}", "value": float(series.iloc[-1])})
    out = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    out["source"] = str(metrics_csv)
    return out


def seen_in_pretraining(datasets, corpus_datasets, downstream_datasets, *, external: bool = False):
    """``true`` / ``false`` / ``partly`` / ``unknown`` for each entry of ``datasets`` (a name, ``all``,
    or comma-separated names), see the module doc."""
    corpus_set, down_set = set(corpus_datasets), set(downstream_datasets)
    out = []
    for value in datasets:
        if external:
            out.append("unknown")
            continue
        kinds = set()
        for name in str(value).split(","):
            name = name.strip()
            if name == "all" or name in corpus_set:
                kinds.add("true")
            elif name in down_set:
                kinds.add("false")
            else:
                kinds.add("unknown")
        out.append(kinds.pop() if len(kinds) == 1 else ("partly" if kinds == {"true", "false"} else "unknown"))
    return out


def summarize(metrics: Iterable[str | Path] = (), *, corpus: str | Path | None = None,
              pretrain_metrics: str | Path | None = None, out: str | Path | None = None,
              downstream: Iterable[str | Path] = (), external_checkpoint: bool = False,
              corpus_rows: bool = True) -> pd.DataFrame:
    """Concatenate task metrics tables (+ corpus and pretraining facts) into one long table.

    ``corpus``: the corpus folder the model was pretrained on (its datasets were seen);
    ``downstream``: folders of downstream datasets (never seen; their sizes are added as ``corpus``
    rows of that dataset); ``external_checkpoint``: the model is not this run's pretraining (seen:
    unknown); ``corpus_rows=False``: the folders only fill that column (no size rows). Columns: ``task dataset method metric value seen_in_pretraining source``. Written
    atomically to ``out`` (TSV) if given.
    """
    parts = []
    corpus_datasets: list[str] = []
    downstream_datasets: list[str] = []
    if corpus is not None:
        if corpus_rows:
            parts.append(_corpus_rows(Path(corpus)))
        corpus_datasets = [str(d) for d in _corpus_meta(Path(corpus)).get("datasets", [])]
    for folder in downstream:
        names = [str(d) for d in _corpus_meta(Path(folder)).get("datasets", [])] or [Path(folder).name]
        downstream_datasets += names
        if corpus_rows:
            parts.append(_corpus_rows(Path(folder), ",".join(names)))
    if pretrain_metrics is not None:
        parts.append(_pretrain_rows(Path(pretrain_metrics)))
    for path in metrics:
        parts.append(_read_metrics(Path(path)))
    parts = [p for p in parts if len(p)]
    table = (pd.concat(parts, ignore_index=True) if parts
             else pd.DataFrame(columns=METRIC_COLUMNS + [SEEN_COLUMN, "source"]))
    table[SEEN_COLUMN] = seen_in_pretraining(table["dataset"], corpus_datasets, downstream_datasets,
                                             external=external_checkpoint)
    table = table[METRIC_COLUMNS + [SEEN_COLUMN, "source"]]
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            table.to_csv(tmp, sep="\t", index=False, float_format="%.6g", na_rep="nan")
        log.info("wrote %s (%d rows)", out, len(table))
    return table


def read_summary(path: str | Path) -> pd.DataFrame:
    """Read a summary (or any metrics) TSV written by :func:`summarize`."""
    return _read_metrics(Path(path)).drop(columns="source")


_HEADLINE = {
    "corpus": ["n_cells", "n_ccres", "n_shards"],
    "pretrain": ["last_step", "last_loss", "last_cca", "last_sr", "last_rlm_loss"],
}
_TASK_HEADLINE = ["NMI", "ARI", "ASW_cell_type", "accuracy", "macro_F1", "spearman_types", "R2_all",
                  "R2_top1000", "dir_acc@100", "dir_acc@1000", "wasserstein_top1000", "pearson", "kBET",
                  "iLISI", "n_cells"]
_MAX_FALLBACK = 8


def _fmt(v: float) -> str:
    return f"{v:.0f}" if math.isfinite(v) and float(v).is_integer() and abs(v) < 1e15 else f"{v:.4g}"


def format_summary(table: pd.DataFrame, all_metrics: bool = False) -> str:
    """A short plain-text view: per task, one line per (dataset, method) with its headline metrics."""
    if table.empty:
        return "(no results)"
    blocks = []
    for task, part in table.groupby("task", sort=False):
        if not all_metrics:
            keep = _HEADLINE.get(task, _TASK_HEADLINE)
            sel = part[part["metric"].isin(keep)]
            if sel.empty:  # unknown task: its first few overall (not per-group "[...]") metrics
                overall = [m for m in dict.fromkeys(part["metric"]) if "[" not in str(m)]
                sel = part[part["metric"].isin(overall[:_MAX_FALLBACK])]
            part = sel if len(sel) else part
        index = ["dataset", "method"] + ([SEEN_COLUMN] if SEEN_COLUMN in part.columns else [])
        wide = part.pivot_table(index=index, columns="metric", values="value", aggfunc="last", sort=False)
        wide.index = wide.index.rename({SEEN_COLUMN: "seen"})
        order = [m for m in _HEADLINE.get(task, _TASK_HEADLINE) if m in wide.columns]
        wide = wide[order + [c for c in wide.columns if c not in order]]
        with pd.option_context("display.width", 160, "display.max_columns", 40,
                               "display.float_format", _fmt):
            blocks.append(f"== {task} ==\n{wide.to_string()}")
    return "\n\n".join(blocks)
