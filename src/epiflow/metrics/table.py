"""The common long metrics table of every task, baseline and report (``task, dataset, method,
metric, value``): building rows, writing (atomically) and reading it back with a clear error."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from ..errors import EpiflowError, InputFormatError
from ..io import atomic_path

METRIC_COLUMNS = ["task", "dataset", "method", "metric", "value"]


def metric_rows(task: str, dataset: str, method: str, values: Mapping[str, float]) -> list[dict]:
    """One row per metric of ``values`` (floats)."""
    return [{"task": task, "dataset": dataset, "method": method, "metric": str(k), "value": float(v)}
            for k, v in values.items()]


def dataset_label(cells, dataset: str | None = None, default: str = "all") -> str:
    """The ``dataset`` column of a task's metrics rows: ``dataset`` when given, else the one
    ``obs['dataset']`` value of the cells (anything with ``.obs``: a Shard, an AnnData), else ``default``."""
    if dataset:
        return str(dataset)
    ds = cells.obs["dataset"].astype(str).unique() if "dataset" in cells.obs else []
    return str(ds[0]) if len(ds) == 1 else default


def metrics_frame(rows: Iterable[Mapping]) -> pd.DataFrame:
    """The long metrics table from rows (columns ``task, dataset, method, metric, value``)."""
    df = pd.DataFrame(list(rows), columns=METRIC_COLUMNS)
    df["value"] = df["value"].astype(float)
    return df


def write_metrics(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a metrics table atomically as TSV (``%.6g`` floats, ``nan`` for missing)."""
    missing = [c for c in METRIC_COLUMNS if c not in df.columns]
    if missing:
        raise EpiflowError(f"metrics table lacks columns {missing}", field="metrics")
    path = Path(path)
    with atomic_path(path) as tmp:
        df[METRIC_COLUMNS].to_csv(tmp, sep="\t", index=False, float_format="%.6g", na_rep="nan")
    return path


def read_metrics(path: str | os.PathLike, *, extra: Iterable[str] = ()) -> pd.DataFrame:
    """Read one metrics table (the five columns, plus those of ``extra`` that it has; ``value`` as
    float, missing values such as ``nan``, ``NA`` or an empty cell as NaN). A file that is not one,
    or a value that is not a number: :class:`InputFormatError` naming it (and the line)."""
    try:
        df = pd.read_csv(path, sep="\t")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputFormatError(f"cannot read metrics table ({exc})", path=path,
                               fix="pass a metrics.tsv written by an epiflow task verb") from None
    missing = [c for c in METRIC_COLUMNS if c not in df.columns]
    if missing:
        raise InputFormatError(f"metrics table lacks column(s) {', '.join(missing)}", path=path, line=1,
                               fix=f"the header must be: {' '.join(METRIC_COLUMNS)}")
    df = df[METRIC_COLUMNS + [c for c in extra if c in df.columns]].copy()
    value = pd.to_numeric(df["value"], errors="coerce")
    bad = (value.isna() & df["value"].notna()).to_numpy()
    if bad.any():
        i = int(bad.nonzero()[0][0])
        raise InputFormatError(f"metric value {df['value'].iloc[i]!r} is not a number ({int(bad.sum())} such row(s))",
                               path=path, line=i + 2, field="value",
                               fix="write a number (or nan for a missing value) in the value column")
    df["value"] = value
    return df


def write_tsv(df: pd.DataFrame, path: str | os.PathLike, index: bool = False) -> Path:
    """Write any result table atomically as TSV (``%.6g`` floats, ``nan`` for missing)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=index, float_format="%.6g", na_rep="nan")
    return path
