"""scvi-tools models: PeakVI and scBasset (run in the ``baseline-peakvi`` / ``baseline-scbasset`` env).

Both train on CPU unless a GPU is there (``accelerator='auto'``); ``max_epochs`` defaults are the
tools' own but every run of the workflow sets them from its config. ``obs['batch']`` is used as the
batch covariate for ``integration`` (PeakVI: ``batch_key``; scBasset: a per-cell batch in ``var``
of the transposed matrix).

scBasset needs the DNA sequence around each feature (1,344 bp centred on it): ``params['fasta']``
names a (plain or gzipped) genome FASTA of the features' build; sequences are read without any
extra package (no genome download at run time).
"""

from __future__ import annotations

import gzip
import logging

import numpy as np
import scipy.sparse as sp

from ...errors import EpiflowError
from ...tokenize.core import binarize
from ..base import BaselineOutput

log = logging.getLogger(__name__)


def _binary(adata):
    import anndata as ad

    x = binarize(adata.X)
    a = ad.AnnData(X=x, obs=adata.obs.copy(), var=adata.var.copy())
    a.obs_names = adata.obs_names.astype(str)
    a.var_names = [f"f{i}" for i in range(a.n_vars)]
    return a


def _seed(params):
    import scvi

    scvi.settings.seed = int(params.get("seed", 0))
    scvi.settings.dl_num_workers = 0


def fit_peakvi(adata, task: str, params: dict) -> BaselineOutput:
    import scvi

    _seed(params)
    a = _binary(adata)
    batch_key = "batch" if task == "integration" or params.get("use_batch") else None
    if batch_key and batch_key not in a.obs:
        raise EpiflowError("PeakVI integration needs obs['batch']", field="obs/batch")
    if batch_key:
        a.obs["batch"] = a.obs["batch"].astype(str).astype("category")
    scvi.model.PEAKVI.setup_anndata(a, batch_key=batch_key)
    model = scvi.model.PEAKVI(a, n_latent=params.get("n_latent"))
    epochs = int(params.get("max_epochs", 500))
    model.train(max_epochs=epochs, batch_size=int(params.get("batch_size", 128)),
                early_stopping=bool(params.get("early_stopping", True)), accelerator=params.get("accelerator", "auto"),
                enable_progress_bar=False)
    emb = model.get_latent_representation()
    hist = model.history.get("elbo_train")
    return BaselineOutput(embedding=np.asarray(emb, np.float32),
                          info={"max_epochs": epochs, "scvi_tools": scvi.__version__,
                                "epochs_run": int(len(hist)) if hist is not None else None,
                                "batch_key": batch_key})


_CODE = np.full(256, -1, dtype=np.int8)
for _i, _c in enumerate("ACGT"):
    _CODE[ord(_c)] = _i
    _CODE[ord(_c.lower())] = _i


def read_fasta(path, chroms=None) -> dict[str, bytes]:
    """``{name: sequence}`` of a (gzipped) FASTA, keeping only ``chroms`` when given."""
    opener = gzip.open if str(path).endswith(".gz") else open
    seqs, name, parts = {}, None, []
    with opener(path, "rb") as fh:
        for line in fh:
            if line.startswith(b">"):
                if name is not None and (chroms is None or name in chroms):
                    seqs[name] = b"".join(parts)
                name, parts = line[1:].split()[0].decode(), []
            elif chroms is None or name in chroms:
                parts.append(line.strip())
    if name is not None and (chroms is None or name in chroms):
        seqs[name] = b"".join(parts)
    return seqs


def dna_codes(var, fasta, seq_len: int = 1344, seed: int = 0) -> np.ndarray:
    """features x ``seq_len`` int8 codes (A0 C1 G2 T3; N and off-chromosome positions random, as scBasset)."""
    from ..preprocess import feature_coords

    coords = feature_coords(var)
    if coords is None:
        raise EpiflowError("scBasset needs feature coordinates (var chrom/start/end or chrom:start-end names)",
                           field="var")
    genome = read_fasta(fasta, set(coords["chrom"]))
    missing = sorted(set(coords["chrom"]) - set(genome))
    if missing:
        raise EpiflowError(f"chromosomes {missing[:5]} are not in the FASTA", path=str(fasta),
                           fix="give the genome FASTA of the features' build")
    rng = np.random.default_rng(seed)
    mid = (coords["start"].to_numpy() + coords["end"].to_numpy()) // 2
    starts = mid - seq_len // 2
    out = np.empty((len(coords), seq_len), dtype=np.int8)
    offs = np.arange(seq_len)
    for chrom in coords["chrom"].unique():
        rows = np.flatnonzero(coords["chrom"].to_numpy() == chrom)
        arr = np.frombuffer(genome[chrom], dtype=np.uint8)
        pos = starts[rows, None] + offs[None, :]
        ok = (pos >= 0) & (pos < len(arr))
        codes = np.full(pos.shape, -1, np.int8)
        codes[ok] = _CODE[arr[pos[ok]]]
        out[rows] = codes
    unk = out < 0
    out[unk] = rng.integers(0, 4, int(unk.sum()))
    return out


def fit_scbasset(adata, task: str, params: dict) -> BaselineOutput:
    import anndata as ad
    import scvi

    fasta = params.get("fasta")
    if not fasta:
        raise EpiflowError("scBasset needs the genome FASTA of the features (param fasta)", field="params.fasta",
                           fix="pass --param fasta=/path/genome.fa[.gz]")
    _seed(params)
    a = _binary(adata)
    codes = dna_codes(adata.var, fasta, int(params.get("seq_len", 1344)), int(params.get("seed", 0)))
    bdata = ad.AnnData(X=sp.csc_matrix(a.X).T.tocsr(), obs=a.var.copy(), var=a.obs.copy())
    bdata.obsm["dna_code"] = codes
    batch_key = None
    if task == "integration":
        bdata.var["batch"] = bdata.var["batch"].astype(str).astype("category")
        batch_key = "batch"
    scvi.external.SCBASSET.setup_anndata(bdata, dna_code_key="dna_code", batch_key=batch_key)
    model = scvi.external.SCBASSET(bdata)
    epochs = int(params.get("max_epochs", 1000))
    model.train(max_epochs=epochs, batch_size=int(params.get("batch_size", 128)),
                early_stopping=bool(params.get("early_stopping", True)), accelerator=params.get("accelerator", "auto"),
                enable_progress_bar=False)
    emb = model.get_latent_representation()
    return BaselineOutput(embedding=np.asarray(emb, np.float32),
                          info={"max_epochs": epochs, "scvi_tools": scvi.__version__, "seq_len": codes.shape[1]})
