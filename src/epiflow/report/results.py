"""Writing a task's :class:`~epiflow.tasks.common.TaskResult` into its output folder (the file side of
every task verb; the task modules compute and return, issue #18). Every file is written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ..io import atomic_path, atomic_write_text
from ..metrics.table import write_metrics, write_tsv


def write_task_result(result, out: str | os.PathLike, *, models: bool = False) -> list[Path]:
    """Write ``<name>.tsv`` for every table, ``train_log.tsv``, the texts, the ``.h5ad`` files,
    (``models=True``) ``<name>.pth`` with its side file, and last ``metrics.tsv``. Returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, df in result.tables.items():
        written.append(write_tsv(df, out / f"{name}.tsv", index=not isinstance(df.index, pd.RangeIndex)))
    if result.history is not None:
        written.append(write_tsv(result.history, out / "train_log.tsv"))
    for name, text in result.texts.items():
        atomic_write_text(out / name, text)
        written.append(out / name)
    for name, adata in result.h5ad.items():
        with atomic_path(out / f"{name}.h5ad", suffix=".h5ad") as tmp:
            adata.write_h5ad(tmp)
        written.append(out / f"{name}.h5ad")
    if models:
        from ..model import save_epiagent_checkpoint

        for name, model in result.models.items():
            written.append(save_epiagent_checkpoint(model, out / f"{name}.pth", write_config=True))
    written.append(write_metrics(result.metrics, out / "metrics.tsv"))  # last: the folder is complete
    return written
