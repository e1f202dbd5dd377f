"""Inference: cell embeddings (``obsm["X_epiagent"]``) for an AnnData, a shard or a whole corpus.

Cells are tokenized into rank-ordered sentences (top 8,190 tokens at inference, SPEC §2), sorted by
length and grouped into batches under a padded-token budget, encoded under
``torch.inference_mode`` (bf16 autocast on CUDA, fp32 on CPU), and the embeddings are returned in
the original cell order.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import InputFormatError, VocabularyMismatchError
from ..tokenize import build_input_ids, cell_sentences, global_tfidf, truncate_sentences
from .attention import resolve_backend

if TYPE_CHECKING:
    import anndata

    from .epiagent import EpiAgent

log = logging.getLogger(__name__)

MAX_SENTENCE = 8190
DEFAULT_BATCH_TOKENS = 65_536
READOUTS = ("cls", "mean")


def check_readout(readout: str) -> str:
    """``cls`` (the paper: encoder output at [CLS]) or ``mean`` (mean of the cCRE-token outputs;
    an option, issue #15)."""
    if readout not in READOUTS:
        raise InputFormatError(f"unknown cell-embedding readout {readout!r}", field="readout",
                               fix=f"use one of {', '.join(READOUTS)} (cls = the paper)")
    return readout


def cell_readout(out, input_ids: torch.Tensor, readout: str = "cls") -> torch.Tensor:
    """The cell embedding ``[B, D]`` of a padded model output: ``cls`` = ``out.cell_embedding``,
    ``mean`` = the mean of the outputs at the cCRE tokens (ids > 3; not [CLS], [SEP] or padding)."""
    if readout == "cls":
        return out.cell_embedding
    m = (input_ids >= 4).to(out.hidden.dtype)
    return (out.hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(device: str | torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (fp16 on GPUs without bf16), none on CPU (fp32)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    except Exception:  # pragma: no cover
        return torch.bfloat16


@contextlib.contextmanager
def inference_context(device: str | torch.device) -> Iterator[None]:
    """``torch.inference_mode()`` plus autocast where :func:`autocast_dtype` asks for it."""
    dt = autocast_dtype(device)
    with torch.inference_mode():
        if dt is None:
            yield
        else:
            with torch.autocast(device_type=torch.device(device).type, dtype=dt):
                yield


def token_budget_batches(lengths, batch_tokens: int = DEFAULT_BATCH_TOKENS, max_cells: int = 4096):
    """Groups of cell indices, longest first, each with ``n_cells * padded_len <= batch_tokens``
    (a single longer cell still gets a batch). ``lengths`` include [CLS]/[SEP]. Loops over batches,
    not cells."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    sl = lengths[order]
    batches, i, n = [], 0, len(order)
    while i < n:
        take = max(1, min(int(batch_tokens) // max(int(sl[i]), 1), max_cells))
        batches.append(order[i:i + take])
        i += take
    return batches


def embed_sentences(model: EpiAgent, indptr: np.ndarray, tokens: np.ndarray, *, batch_ids: np.ndarray | None = None,
                    batch_tokens: int = DEFAULT_BATCH_TOKENS, device: str | torch.device | None = None,
                    backend: str | None = None, max_len: int = MAX_SENTENCE,
                    progress: bool = True, desc: str = "embed", readout: str = "cls") -> np.ndarray:
    """Cell embeddings ``[n_cells, dim]`` (float32) of rank-ordered sentences (CSR ``indptr``/``tokens``);
    ``readout`` see :func:`cell_readout`."""
    check_readout(readout)
    device = default_device() if device is None else torch.device(device)
    max_len = min(int(max_len), model.config.max_rank - 2)
    indptr = np.asarray(indptr, dtype=np.int64)
    indptr, tokens = truncate_sentences(indptr, np.asarray(tokens), max_len)
    n = len(indptr) - 1
    out = np.zeros((n, model.config.dim), dtype=np.float32)
    if n == 0:
        return out
    if batch_ids is not None:
        batch_ids = np.asarray(batch_ids, dtype=np.int64)
        if batch_ids.shape != (n,):
            raise InputFormatError(f"batch_ids has shape {batch_ids.shape}, expected ({n},)", field="batch_ids")
    was_training = model.training
    model.eval()
    if next(model.parameters()).device != device:
        model.to(device)
    if backend is not None:
        model.set_backend(backend)
    batches = token_budget_batches(np.diff(indptr) + 2, batch_tokens)
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc=desc, unit="cell", disable=not progress, leave=False)
    try:
        with inference_context(device):
            for rows in batches:
                ids = torch.from_numpy(build_input_ids(indptr, tokens, rows)).to(device, non_blocking=True)
                b = None if batch_ids is None else torch.from_numpy(batch_ids[rows]).to(device)
                emb = cell_readout(model(ids, batch_ids=b), ids, readout)
                out[rows] = emb.float().cpu().numpy()
                bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    log.info("embedded %d cells in %d batches on %s (%s attention)", n, len(batches), device,
             resolve_backend(model.backend, device))
    return out


def _check_n(model, n_ccres: int, what: str, path=None, vocab_id: str | None = None) -> None:
    from ..corpus.shard import check_vocab_id

    if int(n_ccres) != model.n_ccres:
        raise VocabularyMismatchError(
            f"the {what} has {n_ccres} cCREs but the model has {model.n_ccres}",
            path=None if path is None else str(path),
            fix="map the data onto the checkpoint's cCRE vocabulary (same cCREs, same order)")
    check_vocab_id(getattr(model, "vocab_id", None), vocab_id, data=what, path=path)


def _anndata_sentences(adata, model, df, max_len):
    import scipy.sparse as sp

    _check_n(model, adata.n_vars, "AnnData (n_vars)",
             vocab_id=(adata.uns.get("epiflow") or {}).get("vocab_id") if hasattr(adata.uns, "get") else None)
    if df is None:
        if "df" not in adata.var:
            raise InputFormatError("no document frequencies: pass df= (corpus df.npy) or set adata.var['df']",
                                   field="df", fix="use the df.npy of the corpus the model was trained on")
        df = adata.var["df"].to_numpy()
    X = adata.layers["counts"] if "counts" in adata.layers else adata.X
    if X is None:
        raise InputFormatError("the AnnData has no count matrix (X is empty)", field="X")
    tf = global_tfidf(sp.csr_matrix(X), np.asarray(df, dtype=np.float64))
    return cell_sentences(tf, max_len=max_len)


def embed(data: Any, model: EpiAgent, *, df: np.ndarray | None = None, key: str = "X_epiagent",
          batch_ids: np.ndarray | None = None, batch_key: str | None = None,
          batch_tokens: int = DEFAULT_BATCH_TOKENS, device: str | torch.device | None = None, backend: str | None = None,
          max_len: int = MAX_SENTENCE, progress: bool = True, readout: str = "cls") -> anndata.AnnData:
    """Embed cells with ``model`` and return an AnnData with ``obsm[key]``.

    ``data``: an AnnData of raw counts (cells x the model's cCREs; TF-IDF with ``df`` or
    ``adata.var['df']``; the AnnData itself gets ``obsm[key]`` and is returned), a
    :class:`~epiflow.corpus.shard.Shard`, a :class:`~epiflow.corpus.shard.Corpus`, or a path to a corpus
    folder / shard ``.h5`` / ``.h5ad``. Shards and corpora use their stored rank order (top
    ``max_len`` tokens). ``batch_ids`` (int per cell, -1 = none) or ``batch_key`` (an obs column of
    integer batch ids) add the batch token of batch-conditioned models. ``readout``: ``cls`` (the
    paper) or ``mean`` (:func:`cell_readout`).
    """
    import anndata as ad
    import pandas as pd

    from ..corpus.shard import Corpus, Shard, open_corpus, read_shard

    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if p.is_dir():
            data = open_corpus(p)
        elif p.suffix == ".h5ad":
            data = ad.read_h5ad(p)
        else:
            data = read_shard(p)
    kw: dict[str, Any] = dict(batch_tokens=batch_tokens, device=device, backend=backend, max_len=max_len,
                              progress=progress,
                              readout=check_readout(readout))

    def ids_for(obs):
        if batch_ids is not None:
            return batch_ids
        if batch_key is not None:
            if batch_key not in obs:
                raise InputFormatError(f"obs has no column {batch_key!r}", field="batch_key")
            return pd.to_numeric(obs[batch_key]).to_numpy()
        return None

    if isinstance(data, ad.AnnData):
        indptr, tokens = _anndata_sentences(data, model, df, max_len)
        data.obsm[key] = embed_sentences(model, indptr, tokens, batch_ids=ids_for(data.obs), **kw)
        return data
    if isinstance(data, Shard):
        _check_n(model, data.n_ccres, "shard", vocab_id=data.vocab_id)
        emb = embed_sentences(model, data.indptr, data.tokens, batch_ids=ids_for(data.obs), **kw)
        return _result(data.obs, emb, key)
    if isinstance(data, Corpus):
        data.check_model_vocab(model.n_ccres, vocab_id=getattr(model, "vocab_id", None))
        embs, obs = [], []
        for i, shard in enumerate(data.iter_shards()):
            embs.append(embed_sentences(model, shard.indptr, shard.tokens, batch_ids=ids_for(shard.obs),
                                        desc=f"embed shard {i + 1}/{len(data.shard_paths)}", **kw))
            obs.append(shard.obs)
        return _result(pd.concat(obs, ignore_index=True) if obs else pd.DataFrame(),
                       np.concatenate(embs) if embs else np.zeros((0, model.config.dim), np.float32), key)
    raise InputFormatError(f"cannot embed a {type(data).__name__}",
                           fix="pass an AnnData, a Shard, a Corpus or a path to one")


def _result(obs, emb, key):
    import anndata as ad

    obs = obs.copy()
    if "cell_id" in obs:
        obs.index = obs["cell_id"].astype(str).values
    else:
        obs.index = obs.index.astype(str)
    if not obs.index.is_unique:
        obs.index = [f"{c}-{i}" for i, c in enumerate(obs.index)]
    a = ad.AnnData(obs=obs)
    a.obsm[key] = emb
    return a
