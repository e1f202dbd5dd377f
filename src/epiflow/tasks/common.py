"""What every task verb needs before its own work: the cells as one
:class:`~epiflow.corpus.shard.Shard`, a trainable copy of the model, the device, the result container
(issue #18: one loader, one model loader, one device resolver, one result type for every task).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import EpiflowError, InputFormatError
from ..train.engine import resolve_device

__all__ = ["TaskResult", "dataset_names", "load_cells", "load_inputs", "load_model", "resolve_device", "corpus_vocab",
           "corpus_df"]


def dataset_names(dataset) -> list[str]:
    """``None`` -> []; ``"a,b"`` or ``["a", "b"]`` -> the names."""
    if dataset is None:
        return []
    if isinstance(dataset, str):
        return [d.strip() for d in dataset.split(",") if d.strip()]
    return [str(d) for d in dataset]


def load_cells(source, *, df=None, dataset=None, max_cells: int | None = None, seed: int = 0):
    """The cells of ``source`` as one Shard (rank-ordered sentences, counts, TF-IDF, obs).

    ``source``: a Shard, a corpus folder, a shard ``.h5``, an ``.h5ad`` path or AnnData of raw counts
    (tokenized with ``df``: an array or a ``df.npy`` path, else ``var['df']``; a model must see the
    document frequency of the corpus it was trained on, so an h5ad without either is an error), or a
    list of those. ``dataset`` keeps the cells whose ``obs['dataset']`` is one of the names (a list or a
    comma-separated string; corpus order kept); ``max_cells`` draws a random subset (``seed``).

    The cells are chosen from the inputs' ``obs`` first; then only those cells are read (of each shard,
    the span of its chosen cells) or tokenized, so a selection costs the memory of what it keeps.
    """
    from ..corpus.shard import Shard

    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    if not sources:
        raise InputFormatError("no input given", field="corpus", fix="pass at least one corpus folder or file")
    inputs = [_open_input(x, df) for x in sources]
    if len(inputs) > 1 and any(len(x.obs) == 0 for x in inputs):
        raise InputFormatError("no cells in the input", field="cells")
    obs = inputs[0].obs if len(inputs) == 1 else pd.concat([x.obs for x in inputs], ignore_index=True)
    rows = _chosen_rows(obs, dataset_names(dataset), max_cells, seed)
    sh = Shard.concat([x.read(r) for x, r in zip(inputs, _split_rows(rows, [len(x.obs) for x in inputs]))])
    if sh.n_cells == 0:
        raise InputFormatError("no cells in the input", field="cells")
    return sh


@dataclass
class _Input:
    """One input of :func:`load_cells`: the ``obs`` of all its cells (what the cells are chosen from) and
    ``read(rows)``, the Shard of the chosen cells (``None``: all)."""

    obs: pd.DataFrame
    read: Any


def _split_rows(rows, sizes) -> list:
    """Sorted global ``rows`` (``None``: all) -> the local rows of each of consecutive parts of ``sizes``."""
    if rows is None:
        return [None] * len(sizes)
    ends = np.cumsum(sizes)
    cut = np.searchsorted(rows, ends)
    return [rows[lo:hi] - (e - n) for lo, hi, e, n in zip(np.concatenate([[0], cut[:-1]]), cut, ends, sizes)]


def _chosen_rows(obs: pd.DataFrame, names: list[str], max_cells, seed) -> np.ndarray | None:
    """The (sorted) rows of ``obs`` that ``dataset`` and ``max_cells`` keep; ``None`` for all of them."""
    rows = None
    if names:
        if "dataset" not in obs:
            raise InputFormatError("obs has no 'dataset' column to select a dataset", field="obs/dataset")
        have_col = obs["dataset"].astype(str).to_numpy()
        missing = [n for n in names if not (have_col == n).any()]
        if missing:
            raise EpiflowError(f"no cell of dataset {', '.join(repr(m) for m in missing)} "
                               f"(have: {sorted(set(have_col))})", field="dataset",
                               fix="pass datasets that the input holds")
        rows = np.flatnonzero(np.isin(have_col, names))
    n = len(obs) if rows is None else len(rows)
    if max_cells is not None and n > max_cells:
        pick = random_rows(n, int(max_cells), seed)
        rows = pick if rows is None else rows[pick]
    return rows


def random_rows(n: int, max_cells: int, seed: int = 0) -> np.ndarray:
    """The sorted random subset of ``max_cells`` of ``n`` rows that a task's ``max_cells`` keeps (the
    baselines draw the same one: :func:`epiflow.baselines.run.canonical_input`)."""
    return np.sort(np.random.default_rng(seed).choice(n, int(max_cells), replace=False))


def _open_input(source, df) -> _Input:
    """Check one input of :func:`load_cells` and read its ``obs`` (not its cells yet)."""
    from ..corpus.shard import Shard, _shard_from_anndata, open_corpus, read_shard_obs, read_shard_rows

    if isinstance(source, (list, tuple)):  # a nested list: read whole, as before
        sh = load_cells(source, df=df)
        return _Input(sh.obs, lambda rows: sh if rows is None else sh.subset(rows))
    src_path = str(source) if isinstance(source, (str, os.PathLike)) else None
    df_path = str(df) if isinstance(df, (str, os.PathLike)) else None
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if not p.exists():
            raise InputFormatError("input does not exist", path=str(p),
                                   fix="pass a corpus folder, a shard .h5 or an .h5ad of raw counts")
        if p.is_dir() and not (p / "corpus.json").exists():
            raise InputFormatError("not a corpus folder (no corpus.json)", path=str(p),
                                   fix="pass the folder written by epiflow build-corpus / tokenize-downstream")
        if p.suffix == ".h5ad":
            import anndata as ad

            source = ad.read_h5ad(p)
    if isinstance(df, (str, os.PathLike)):
        try:
            df = np.load(df)
        except (OSError, ValueError) as exc:
            raise InputFormatError(f"cannot read the document frequencies ({exc})", path=str(df),
                                   fix="pass the df.npy of the model's corpus") from None
    if isinstance(source, Shard):
        sh = source
        return _Input(sh.obs, lambda rows: sh if rows is None else sh.subset(rows))
    if hasattr(source, "obs") and hasattr(source, "X"):
        if df is None and "df" not in source.var:
            raise InputFormatError("no document frequencies for an h5ad input", field="df",
                                   fix="pass --df <corpus>/df.npy (the corpus the model was trained on)")
        if df is not None and np.shape(df) != (source.n_vars,):
            raise InputFormatError(f"df has {np.shape(df)[0]} entries but the h5ad"
                                   f"{f' {src_path}' if src_path else ''} has {source.n_vars} cCREs",
                                   path=df_path, field="df",
                                   fix="use the df.npy of the corpus whose vocabulary the h5ad uses")
        adata = source
        return _Input(adata.obs.reset_index(drop=True), lambda rows: _shard_from_anndata(adata, df, rows=rows))
    p = Path(source)
    if (p / "corpus.json").exists():
        corpus = open_corpus(p)
        obs = corpus.shard_obs()
        if not obs:
            Shard.concat([])  # the error of a corpus without shards
        return _Input(obs[0] if len(obs) == 1 else pd.concat(obs, ignore_index=True),
                      lambda rows: Shard.concat(corpus.read_rows(_split_rows(rows, [len(o) for o in obs]), obs)))
    obs1 = read_shard_obs(p)
    return _Input(obs1, lambda rows: next(read_shard_rows([p], [rows], [obs1])))


def _first_of(source, read, what: str):
    """``read`` of one input, or of the first of several after checking that they all agree."""
    if not isinstance(source, (list, tuple)):
        return read(source)
    values = [read(x) for x in source]
    first = values[0]
    for x, v in zip(source[1:], values[1:]):
        same = (v is None) == (first is None) and (
            v is None or (v.equals(first) if isinstance(v, pd.DataFrame) else np.array_equal(v, first)))
        if not same:
            raise InputFormatError(f"the inputs read together have different {what}s", path=str(x),
                                   fix=f"read together only folders of one corpus (same {what}: the corpus and the "
                                       "downstream folders tokenized onto it)")
    return first


def corpus_vocab(source) -> pd.DataFrame | None:
    """The ``vocab.bed`` of a corpus folder (None for other inputs or when absent); of several folders, their
    common one (an error when they differ)."""
    def read(src):
        if isinstance(src, (str, os.PathLike)) and (Path(src) / "vocab.bed").exists():
            from ..genome.bed import read_bed

            return read_bed(Path(src) / "vocab.bed")
        return None

    return _first_of(source, read, "vocab.bed")


def corpus_df(source) -> np.ndarray | None:
    """The ``df.npy`` of a corpus folder (None for other inputs or when absent); of several folders, their
    common one (an error when they differ)."""
    def read(src):
        if isinstance(src, (str, os.PathLike)) and (Path(src) / "df.npy").exists():
            return np.load(Path(src) / "df.npy")
        return None

    return _first_of(source, read, "df.npy")


def load_model(checkpoint, *, n_ccres: int | None = None, vocab_id: str | None = None, num_heads: int | None = None,
               backend: str = "auto", device=None, dropout: float | None = None):
    """A trainable float32 copy of a checkpoint (a path, or an :class:`~epiflow.model.EpiAgent` that is
    deep-copied) on ``device`` (None: CPU) with attention ``backend`` (auto: packed while training on
    CPU, padded sdpa for inference; flash-attn on CUDA when installed). ``n_ccres`` / ``vocab_id``:
    the data's cCRE vocabulary, checked against the model's."""
    import torch

    from ..corpus.shard import check_vocab_id
    from ..errors import VocabularyMismatchError
    from ..model import EpiAgent, load_epiagent_checkpoint

    if isinstance(checkpoint, EpiAgent):
        model = copy.deepcopy(checkpoint)
        if n_ccres is not None and model.n_ccres != int(n_ccres):
            raise VocabularyMismatchError(f"the model has {model.n_ccres} cCREs but the data has {n_ccres}",
                                          field="n_ccres", fix="use a model trained on this cCRE vocabulary")
        check_vocab_id(getattr(model, "vocab_id", None), vocab_id)
    else:
        p = Path(checkpoint)
        if not p.exists():
            raise InputFormatError("checkpoint does not exist", path=str(p),
                                   fix="pass checkpoint.pth written by epiflow pretrain (or the authors' file)")
        kw = {} if dropout is None else {"dropout": float(dropout)}
        model = load_epiagent_checkpoint(p, num_heads=num_heads, n_ccres=n_ccres, vocab_id=vocab_id, mmap=False,
                                         dtype=torch.float32, backend=backend, **kw)
    model.to(resolve_device(device) if device is not None else torch.device("cpu"))
    model.set_backend(backend)
    return model


def load_inputs(corpus, checkpoint, settings, *, df=None, dataset=None, max_cells: int | None = None):
    """``(cells, model)`` of a task verb: the cells (:func:`load_cells`) and a trainable copy of the
    checkpoint on their vocabulary with the settings' ``num_heads``, ``backend`` and ``device``
    (:func:`load_model`; an unknown device is an error before anything loads)."""
    resolve_device(settings.device)
    cells = load_cells(corpus, df=df, dataset=dataset, max_cells=max_cells, seed=settings.seed)
    model = load_model(checkpoint, n_ccres=cells.n_ccres, vocab_id=cells.vocab_id, num_heads=settings.num_heads,
                       backend=settings.backend, device=settings.device)
    return cells, model


@dataclass
class TaskResult:
    """What a task's ``run`` returns; :func:`epiflow.report.results.write_task_result` writes it.

    - ``metrics``: the long metrics table (``metrics.tsv``);
    - ``tables``: name -> DataFrame, written as ``<name>.tsv`` (e.g. predictions, knockout; with the
      index when it is not a plain range);
    - ``history``: the per-step training log (``train_log.tsv``), if the task trained;
    - ``models``: name -> fine-tuned model, written as ``<name>.pth`` (+ side file) when asked;
    - ``h5ad``: name -> AnnData, written as ``<name>.h5ad``;
    - ``texts``: file name -> text (e.g. ``classes.json``), written as is;
    - ``data``: arrays the figures draw (embeddings, scores ...), not written.
    """

    metrics: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    history: pd.DataFrame | None = None
    models: dict[str, Any] = field(default_factory=dict)
    h5ad: dict[str, Any] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


def umap_coords(x, *, n_neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """UMAP coordinates ``[n, 2]`` of the rows of ``x``: scanpy's UMAP on the kNN graph of
    :func:`epiflow.metrics.knn_graph` (``n_neighbors``, ``seed``), as the integration and zero-shot
    tasks draw them."""
    import anndata as ad
    import scanpy as sc

    from ..metrics import knn_graph

    x = np.asarray(x, dtype=np.float32)
    a = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(len(x))]))
    a.obsm["X_e"] = x
    knn_graph(a, use_rep="X_e", n_neighbors=n_neighbors, seed=seed)
    sc.tl.umap(a, random_state=seed)
    return np.asarray(a.obsm["X_umap"])
