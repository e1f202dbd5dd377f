"""The corpus store: shards of tokenized cells plus corpus-level metadata.

A corpus is a folder::

    corpus.json      # {"format": "epiflow-corpus", "version": 1, "n_cells", "n_ccres", "vocab_id",
                     #  "genome", "shards": ["shards/shard_00000.h5", ...], "shard_cells": [...]}
    vocab.bed        # the cCRE vocabulary, BED3 in token order (cCRE j = line j = token j + 4)
    df.npy           # float64 [n_ccres] document frequency over the whole corpus
    shards/shard_00000.h5 ...

A shard is one HDF5 file (default 5,000 cells) holding a compact CSR of rank-ordered sentences:

* ``indptr`` int64 [n_cells + 1]
* ``tokens`` int32 [nnz]: token ids (cCRE j -> j + 4), TF-IDF descending (ties: ascending cCRE)
* ``counts`` float32 [nnz]: the raw count of each token's cCRE in the cell
* ``tfidf``  float32 [nnz]: its global TF-IDF value
* ``obs/<column>``: per-cell metadata (``cell_id``, ``dataset``, ``tissue``, ``batch``, ``cell_type``
  and any other column), stored as UTF-8 strings or numbers
* attributes ``format="epiflow-shard"``, ``version=1``, ``n_ccres``, ``vocab_id``, ``genome``.

Every cCRE accessible in a cell is stored (no cap): the cap of 8,190 tokens is applied when batches
are built (top-k at inference, random rank-preserving subsample in training).

:class:`Shard` is also epiflow's one in-memory container of cells: every task and the training
engine take one (:meth:`Shard.from_any` reads a corpus folder, shard files, an AnnData or an .h5ad;
:meth:`Shard.subset` / :meth:`Shard.concat`; token ids, counts, TF-IDF and obs). Pretraining streams
shards instead (:mod:`epiflow.train.data`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputFormatError, VocabularyMismatchError
from ..io import atomic_path
from ..tokenize import NUM_SPECIAL, cell_sentences, gather_rows, global_tfidf

SHARD_FORMAT = "epiflow-shard"
CORPUS_FORMAT = "epiflow-corpus"


def vocab_id_from_intervals(chrom, start, end) -> str:
    """A short stable identifier of a cCRE vocabulary (hash of its intervals in order)."""
    # same digest as hashing "chrom\tstart\tend\n" line by line, built in one vectorised string
    c = pd.Series(np.asarray(chrom).astype(str), dtype=object)
    s = pd.Series(np.asarray(start).astype(np.int64)).astype(str)
    e = pd.Series(np.asarray(end).astype(np.int64)).astype(str)
    text = (c + "\t" + s.to_numpy(dtype=object) + "\t" + e.to_numpy(dtype=object) + "\n").str.cat() if len(c) else ""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Shard:
    indptr: np.ndarray
    tokens: np.ndarray
    counts: np.ndarray
    tfidf: np.ndarray
    obs: pd.DataFrame
    n_ccres: int
    vocab_id: str = ""
    genome: str = ""
    attrs: dict = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return len(self.indptr) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def sentence(self, i: int) -> np.ndarray:
        return self.tokens[self.indptr[i]:self.indptr[i + 1]]

    def sentences(self, uids) -> tuple[np.ndarray, np.ndarray]:
        """``(indptr, tokens)`` of the cells ``uids`` (what :func:`epiflow.train.data.make_batch` reads)."""
        ptr, tok = gather_rows(self.indptr, uids, self.tokens)
        return ptr, tok.astype(np.int64)

    def counts_csr(self) -> sp.csr_matrix:
        """Raw counts as a cells x cCREs CSR matrix with sorted column indices."""
        m = sp.csr_matrix((self.counts.astype(np.float32), self.tokens.astype(np.int64) - NUM_SPECIAL,
                           self.indptr), shape=(self.n_cells, self.n_ccres))
        m.sort_indices()
        return m

    def tfidf_csr(self) -> sp.csr_matrix:
        m = sp.csr_matrix((self.tfidf.astype(np.float32), self.tokens.astype(np.int64) - NUM_SPECIAL,
                           self.indptr), shape=(self.n_cells, self.n_ccres))
        m.sort_indices()
        return m

    def subset(self, rows) -> "Shard":
        rows = np.asarray(rows, dtype=np.int64)
        ptr, (tokens, counts, tfidf) = gather_rows(self.indptr, rows, self.tokens, self.counts, self.tfidf)
        return Shard(ptr, tokens, counts, tfidf, self.obs.iloc[rows].reset_index(drop=True),
                     self.n_ccres, self.vocab_id, self.genome, dict(self.attrs))

    def binary(self, rows=None) -> sp.csr_matrix:
        """Cells x cCREs 0/1 accessibility (float32 CSR, sorted indices)."""
        cs = self if rows is None else self.subset(rows)
        m = sp.csr_matrix((np.ones(len(cs.tokens), np.float32), cs.tokens.astype(np.int64) - NUM_SPECIAL,
                           cs.indptr), shape=(cs.n_cells, cs.n_ccres))
        m.sort_indices()
        return m

    @classmethod
    def concat(cls, shards) -> "Shard":
        """One Shard holding the cells of ``shards`` (same vocabulary) in order."""
        shards = list(shards)
        if not shards:
            raise InputFormatError("no cells to read (no shard given)", field="shards")
        n = {int(x.n_ccres) for x in shards}
        if len(n) != 1:
            raise InputFormatError(f"shards disagree on the number of cCREs ({sorted(n)})", field="n_ccres",
                                   fix="use shards of one corpus (one vocabulary)")
        ids = {x.vocab_id for x in shards if x.vocab_id}
        if len(ids) > 1:
            raise InputFormatError(f"shards of different cCRE vocabularies read together ({sorted(ids)})",
                                   field="vocab_id", fix="use shards of one corpus (one vocabulary): the corpus "
                                                         "and the downstream folders tokenized onto it")
        if len(shards) == 1:
            return shards[0]
        lens = np.concatenate([x.lengths for x in shards])
        return cls(np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                   np.concatenate([x.tokens for x in shards]), np.concatenate([x.counts for x in shards]),
                   np.concatenate([x.tfidf for x in shards]), pd.concat([x.obs for x in shards], ignore_index=True),
                   n.pop(), shards[0].vocab_id, shards[0].genome, dict(shards[0].attrs))

    @classmethod
    def from_any(cls, data, *, df=None) -> "Shard":
        """The cells of ``data``: a Shard, a corpus folder, a shard file, an AnnData of raw counts or an
        .h5ad path (tokenized with ``df``, ``var['df']`` or these cells' document frequency), or a list of
        those (concatenated)."""
        if isinstance(data, cls):
            return data
        if isinstance(data, (list, tuple)):
            return cls.concat([cls.from_any(x, df=df) for x in data])
        if hasattr(data, "obs") and hasattr(data, "X"):
            return _shard_from_anndata(data, df)
        p = Path(data)
        if (p / "corpus.json").exists():
            return cls.concat(list(open_corpus(p).iter_shards()))
        if p.suffix == ".h5ad":
            if not p.exists():
                raise InputFormatError("file does not exist", path=str(p))
            import anndata as ad

            return _shard_from_anndata(ad.read_h5ad(p), df)
        return read_shard(p)

    def to_anndata(self, var: pd.DataFrame | None = None):
        """AnnData with raw counts in ``X`` (CSR), the TF-IDF in ``layers['tfidf']`` and ``obs``."""
        import anndata as ad

        obs = self.obs.copy()
        obs.index = obs["cell_id"].astype(str).values if "cell_id" in obs else obs.index.astype(str)
        a = ad.AnnData(X=self.counts_csr(), obs=obs, var=var)
        a.layers["tfidf"] = self.tfidf_csr()
        a.uns["epiflow"] = {"vocab_id": self.vocab_id, "genome": self.genome, "n_ccres": int(self.n_ccres)}
        return a


def shard_from_counts(counts, df, obs: pd.DataFrame, *, vocab_id: str = "", genome: str = "") -> Shard:
    """Tokenize a cells x cCREs count matrix with corpus-level ``df`` into a :class:`Shard`."""
    counts = sp.csr_matrix(counts)
    counts.sum_duplicates()
    counts.eliminate_zeros()
    tf = global_tfidf(counts, df)
    indptr, tokens, values = cell_sentences(tf, return_values=True)
    # raw counts aligned with the rank order: look them up by (row, col)
    cols = tokens - NUM_SPECIAL
    rows = np.repeat(np.arange(counts.shape[0]), np.diff(indptr))
    # CSR with sorted indices is ordered by (row, col): a binary search finds each (row, col)
    pos = np.searchsorted(
        np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr)) * counts.shape[1] + counts.indices,
        rows * counts.shape[1] + cols)
    cnt = counts.data[pos].astype(np.float32)
    obs = obs.reset_index(drop=True) if obs is not None else pd.DataFrame(index=range(counts.shape[0]))
    if len(obs) != counts.shape[0]:
        raise InputFormatError(f"obs has {len(obs)} rows but the matrix has {counts.shape[0]} cells",
                               field="obs")
    return Shard(indptr, tokens.astype(np.int32), cnt, values.astype(np.float32), obs,
                 int(counts.shape[1]), vocab_id, genome)


def _shard_from_anndata(adata, df=None, rows=None) -> Shard:
    """Rank-ordered sentences of an AnnData of raw counts (``layers['counts']`` or ``X``), TF-IDF with
    ``df``, ``var['df']`` or the document frequency of these cells; obs gets ``cell_id`` (obs names).
    ``rows``: only these cells are tokenized (the same sentences as the whole AnnData's, then
    :meth:`Shard.subset`: tokenizing is per cell once the document frequency is fixed)."""
    from ..tokenize import document_frequency

    X = sp.csr_matrix(adata.layers["counts"] if "counts" in adata.layers else adata.X)
    if df is None:
        df = adata.var["df"].to_numpy() if "df" in adata.var else document_frequency(X)
    df = np.where(np.asarray(df, dtype=np.float64) > 0, df, 1.0 / max(X.shape[0], 1))
    obs = adata.obs.reset_index(drop=True).copy()
    if "cell_id" not in obs:
        obs["cell_id"] = np.asarray(adata.obs_names).astype(str)
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
        X, obs = X[rows], obs.iloc[rows].reset_index(drop=True)
    return shard_from_counts(X, df, obs)


# the attributes write_shard sets from the shard itself
_SHARD_KEYS = frozenset({"format", "version", "n_ccres", "vocab_id", "genome", "n_cells"})


def write_shard(path: str | os.PathLike, shard: Shard) -> Path:
    """Write a shard atomically (temp file, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = SHARD_FORMAT
            f.attrs["version"] = 1
            f.attrs["n_ccres"] = int(shard.n_ccres)
            f.attrs["vocab_id"] = shard.vocab_id
            f.attrs["genome"] = shard.genome
            f.attrs["n_cells"] = shard.n_cells
            for k, v in shard.attrs.items():
                if k not in _SHARD_KEYS:  # a read shard's own keys (a subset's n_cells is its own)
                    f.attrs[k] = v
            kw = dict(compression="gzip", compression_opts=4, shuffle=True) if len(shard.tokens) > 4096 else {}
            f.create_dataset("indptr", data=np.asarray(shard.indptr, dtype=np.int64))
            f.create_dataset("tokens", data=np.asarray(shard.tokens, dtype=np.int32), **kw)
            f.create_dataset("counts", data=np.asarray(shard.counts, dtype=np.float32), **kw)
            f.create_dataset("tfidf", data=np.asarray(shard.tfidf, dtype=np.float32), **kw)
            g = f.create_group("obs")
            g.attrs["columns"] = json.dumps([str(c) for c in shard.obs.columns])
            for col in shard.obs.columns:
                s = shard.obs[col]
                if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
                    g.create_dataset(str(col), data=s.to_numpy())
                else:
                    g.create_dataset(str(col), data=s.astype(str).to_numpy().astype(object),
                                     dtype=h5py.string_dtype("utf-8"))
    return path


def _open_shard(path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise InputFormatError("shard file does not exist", path=str(path),
                               fix="build the corpus first (epiflow build-corpus)")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputFormatError(f"not a readable HDF5 shard ({exc})", path=str(path),
                               fix="rebuild the corpus; the file is truncated or foreign") from None
    if f.attrs.get("format") != SHARD_FORMAT:
        f.close()
        raise InputFormatError("not an epiflow shard (attribute 'format' missing)", path=str(path),
                               fix="pass a shard written by epiflow build-corpus")
    return f


def _read_obs(f: h5py.File, n_cells: int) -> pd.DataFrame:
    df = pd.DataFrame(index=range(n_cells))
    if "obs" in f:
        g = f["obs"]
        for col in json.loads(g.attrs.get("columns", "[]")):
            d = g[col]
            df[col] = d.asstr()[:] if h5py.check_string_dtype(d.dtype) else d[:]
    return df


def read_shard_obs(path: str | os.PathLike) -> pd.DataFrame:
    """The ``obs`` of a shard file (one row per cell), without reading its tokens, counts or TF-IDF."""
    with _open_shard(path) as f:
        return _read_obs(f, f["indptr"].shape[0] - 1)


def read_shard(path: str | os.PathLike, *, obs: bool = True, rows=None) -> Shard:
    """The shard file ``path``; with ``rows`` only those cells (in that order, as :meth:`Shard.subset` of the
    whole shard would give them): of the tokens, counts and TF-IDF only the span from the first to the last
    of them is read, so a few cells of a shard cost a few cells of memory."""
    with _open_shard(path) as f:
        indptr = f["indptr"][:]
        if rows is None:
            tokens = f["tokens"][:]
            counts = f["counts"][:]
            tfidf = f["tfidf"][:]
        else:
            rows = np.asarray(rows, dtype=np.int64)
            lo, hi = (int(indptr[rows.min()]), int(indptr[rows.max() + 1])) if rows.size else (0, 0)
            indptr, (tokens, counts, tfidf) = gather_rows(indptr - lo, rows, f["tokens"][lo:hi],
                                                          f["counts"][lo:hi], f["tfidf"][lo:hi])
        n_file = f["indptr"].shape[0] - 1
        if obs:
            df = _read_obs(f, n_file)
            if rows is not None:
                df = df.iloc[rows].reset_index(drop=True)
        else:
            df = pd.DataFrame(index=range(len(indptr) - 1))
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    return Shard(indptr, tokens, counts, tfidf, df, int(attrs.pop("n_ccres")), str(attrs.pop("vocab_id", "")),
                 str(attrs.pop("genome", "")), attrs)


def read_shard_rows(paths, rows, obs=None) -> Iterator[Shard]:
    """The cells ``rows[i]`` (``None``: all) of the shard file ``paths[i]``, one :class:`Shard` per file
    (:func:`read_shard` with ``rows``: only the span of the wanted cells is read). ``obs``: the files'
    ``obs`` already read (:func:`read_shard_obs`), attached instead of reading them again."""
    for i, (p, r) in enumerate(zip(paths, rows)):
        if obs is None:
            yield read_shard(p, rows=r)
            continue
        sh = read_shard(p, obs=False, rows=r)
        sh.obs = obs[i] if r is None else obs[i].iloc[np.asarray(r, dtype=np.int64)].reset_index(drop=True)
        yield sh


@dataclass
class Corpus:
    root: Path
    meta: dict

    @property
    def n_ccres(self) -> int:
        return int(self.meta["n_ccres"])

    @property
    def n_cells(self) -> int:
        return int(self.meta["n_cells"])

    @property
    def vocab_id(self) -> str:
        return str(self.meta.get("vocab_id", ""))

    @property
    def shard_paths(self) -> list[Path]:
        return [self.root / p for p in self.meta["shards"]]

    def df(self) -> np.ndarray:
        return np.load(self.root / "df.npy")

    def vocab(self) -> pd.DataFrame:
        return pd.read_csv(self.root / "vocab.bed", sep="\t", header=None, usecols=[0, 1, 2],
                           names=["chrom", "start", "end"], dtype={0: str, 1: np.int64, 2: np.int64})

    def iter_shards(self, obs: bool = True) -> Iterator[Shard]:
        for p in self.shard_paths:
            yield read_shard(p, obs=obs)

    def shard_obs(self) -> list[pd.DataFrame]:
        """The ``obs`` of each shard, in order, without reading any tokens (choose cells from these, then
        :meth:`read_rows` reads only them)."""
        return [read_shard_obs(p) for p in self.shard_paths]

    def read_rows(self, rows, obs: list[pd.DataFrame] | None = None) -> Iterator[Shard]:
        """The cells ``rows[i]`` (``None``: all) of shard ``i``, one Shard per shard file in order
        (:func:`read_shard_rows`; ``obs``: :meth:`shard_obs` when already read)."""
        return read_shard_rows(self.shard_paths, rows, obs)

    def check_model_vocab(self, n_ccres_model: int, what: str = "model", vocab_id: str | None = None) -> None:
        """Raise :class:`VocabularyMismatchError` when a model's cCRE count (or, when the model's
        sidecar records one, its ``vocab_id``) differs from this corpus's vocabulary."""
        check_vocab_id(vocab_id, self.vocab_id, what=what, data=f"corpus ({self.n_ccres} cCREs)",
                       path=self.root / "corpus.json")
        if int(n_ccres_model) != self.n_ccres:
            raise VocabularyMismatchError(
                f"the {what} has {n_ccres_model} cCREs but the corpus vocabulary has {self.n_ccres}",
                path=str(self.root / "corpus.json"),
                fix="use a checkpoint trained on this corpus vocabulary, or map the data onto the "
                    "checkpoint's cCRE set (vocabulary: external)")


def check_vocab_id(model_vocab_id: str | None, data_vocab_id: str | None, *, what: str = "model",
                   data: str = "data", path=None) -> None:
    """Raise :class:`VocabularyMismatchError` when a model and its data both name their cCRE vocabulary
    (``vocab_id``: a hash of the cCRE intervals in order) and the two differ: the same number of
    cCREs is not the same cCREs. Nothing to compare when either is unknown (the authors' weights,
    an AnnData of raw counts)."""
    if model_vocab_id and data_vocab_id and str(model_vocab_id) != str(data_vocab_id):
        raise VocabularyMismatchError(
            f"the {what} was trained on cCRE vocabulary {model_vocab_id} but the {data} is on vocabulary "
            f"{data_vocab_id}: the same number of cCREs is not the same cCREs",
            path=None if path is None else str(path), field="vocab_id",
            fix="use a checkpoint trained on this corpus vocabulary, or rebuild the data on the "
                "checkpoint's cCRE set (--vocabulary-mode external --ccres <its vocab.bed>)")


def open_corpus(root: str | os.PathLike) -> Corpus:
    root = Path(root)
    meta_path = root / "corpus.json"
    if not meta_path.exists():
        raise InputFormatError("corpus.json not found", path=str(meta_path),
                               fix="point at a folder written by epiflow build-corpus")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputFormatError(f"invalid JSON ({exc.msg})", path=str(meta_path), line=exc.lineno) from None
    if meta.get("format") != CORPUS_FORMAT:
        raise InputFormatError("not an epiflow corpus (field 'format')", path=str(meta_path), field="format")
    return Corpus(root, meta)


def write_corpus_meta(root: str | os.PathLike, meta: dict) -> Path:
    root = Path(root)
    meta = {"format": CORPUS_FORMAT, "version": 1, **meta}
    with atomic_path(root / "corpus.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    return root / "corpus.json"
