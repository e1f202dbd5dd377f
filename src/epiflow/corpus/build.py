"""Build a corpus folder from mapped datasets (cells x candidate cCREs), streaming.

Passes over the mapped datasets (each read in blocks of ``block_size`` cells, never whole):

1. **QC + accessibility.** Cells with fewer than ``min_ccres_per_cell`` accessible candidates are
   dropped; over the remaining cells, ``cells_open[j]`` = number of cells in which candidate ``j`` is
   accessible.
2. **Vocabulary.** ``curate``: candidates open in fewer than ``min_cells`` cells are dropped
   (:func:`epiflow.genome.ccre.filter_vocab`, order kept). ``external``: every candidate is kept
   (the candidate file is the external vocabulary, in its file order).
3. **Final QC + document frequency.** Counts are restricted to the vocabulary; cells that now have
   fewer than ``min_ccres_per_cell`` accessible cCREs are dropped too (the SPEC rule holds on the
   final vocabulary). ``df[j]`` = (kept cells in which cCRE j is accessible) / (total kept cells of
   the corpus), or an external df (e.g. the authors' ``cCRE_document_frequency.npy``).
4. **Tokenization and shards.** Kept cells are tokenized with the corpus df
   (:func:`epiflow.corpus.shard.shard_from_counts`) and written in shards of ``shard_size`` cells;
   only one shard-size buffer is in memory.

Everything is written into a temporary folder next to ``out`` that is renamed at the end, so a
failed build leaves no partial corpus.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ConfigError, InputFormatError, VocabularyMismatchError
from ..io import check_output_kind, folder_mode, replace_folder
from .qc import accessible_per_cell, qc_table
from .shard import open_corpus, shard_from_counts, vocab_id_from_intervals, write_corpus_meta, write_shard

log = logging.getLogger(__name__)

STD_OBS = ["cell_id", "dataset", "tissue", "batch", "cell_type"]


@dataclass
class _Mapped:
    path: Path
    n_cells: int
    obs: pd.DataFrame
    report: dict


def _open_mapped(path: Path, n_candidates: int, cand_id: str):
    import anndata as ad

    if not path.exists():
        raise InputFormatError("mapped dataset not found", path=str(path),
                               fix="run epiflow map-dataset for it first")
    try:
        a = ad.read_h5ad(path, backed="r")
    except Exception as exc:
        raise InputFormatError(f"cannot read the mapped dataset ({type(exc).__name__}: {exc})",
                               path=str(path), fix="re-run epiflow map-dataset") from None
    if a.n_vars != n_candidates:
        a.file.close()
        raise VocabularyMismatchError(
            f"the mapped dataset has {a.n_vars} cCREs but the candidate set has {n_candidates}",
            path=str(path), fix="map every dataset onto the same candidate cCRE file (--ccres)")
    rep = {}
    raw = a.uns.get("epiflow_mapping")
    if raw is not None:
        try:
            rep = json.loads(str(raw))
        except json.JSONDecodeError:
            rep = {}
    if rep.get("ccres_id") and rep["ccres_id"] != cand_id:
        a.file.close()
        raise VocabularyMismatchError(
            f"the mapped dataset was mapped onto candidate set {rep['ccres_id']}, not {cand_id}",
            path=str(path), fix="re-run epiflow map-dataset with the same --ccres file")
    return a, rep


def _blocks(a, block_size: int):
    n = a.n_obs
    for i in range(0, n, block_size):
        X = a.X[i:min(i + block_size, n)]
        X = sp.csr_matrix(X)
        if X.nnz:
            d = X.data
            if not np.all(np.isfinite(d)) or d.min() < 0:
                raise InputFormatError("mapped counts contain negative or NaN values",
                                       path=str(a.filename), field="X", fix="re-run epiflow map-dataset")
        yield i, X


def _restrict(X: sp.csr_matrix, colmap: np.ndarray, n_new: int) -> sp.csr_matrix:
    """Keep the columns with ``colmap >= 0``, renumbered to ``colmap`` (vectorised)."""
    X = sp.csr_matrix(X)
    new_col = colmap[X.indices]
    keep = (new_col >= 0) & (X.data > 0)
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))[keep]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=X.shape[0]))]).astype(np.int64)
    out = sp.csr_matrix((X.data[keep].astype(np.float32), new_col[keep], indptr), shape=(X.shape[0], n_new))
    out.sort_indices()
    return out


def _obs_schema(obs_list: list[pd.DataFrame]) -> dict:
    """column -> 'num' | 'str' over all datasets (numeric only if numeric everywhere)."""
    schema: dict[str, str] = {c: "str" for c in STD_OBS}
    for o in obs_list:
        for c in o.columns:
            if c in STD_OBS:
                continue
            num = pd.api.types.is_numeric_dtype(o[c]) and not pd.api.types.is_bool_dtype(o[c])
            prev = schema.get(c)
            schema[c] = "num" if num and prev in (None, "num") else "str"
    return schema


def _conform_obs(obs: pd.DataFrame, schema: dict) -> pd.DataFrame:
    out = {}
    for c, kind in schema.items():
        if c in obs.columns:
            s = obs[c]
            out[c] = s.to_numpy(dtype=np.float64) if kind == "num" and s.dtype.kind == "f" else (
                s.to_numpy() if kind == "num" else s.astype(str).to_numpy())
        else:
            out[c] = np.full(len(obs), np.nan) if kind == "num" else np.full(len(obs), "", dtype=object)
    return pd.DataFrame(out)


def _read_candidates(ccres) -> pd.DataFrame:
    if isinstance(ccres, pd.DataFrame):
        return ccres.reset_index(drop=True)
    from ..genome.bed import read_bed

    return read_bed(ccres)


def build_corpus(ccres, mapped, out, *, genome: str = "", min_cells: int = 100,
                 min_ccres_per_cell: int = 100, shard_size: int = 5000, vocabulary: str = "curate",
                 external_df=None, block_size: int | None = None, overwrite: bool = True,
                 progress: bool = False, role: str = "corpus", fixed_vocab=None, meta_extra: dict | None = None):
    """Build the corpus folder ``out`` from candidate cCREs and mapped datasets (see the module doc).

    ``ccres``: candidate BED path or DataFrame (the external vocabulary itself when
    ``vocabulary='external'``). ``mapped``: paths of ``map-dataset`` outputs. ``external_df``: path
    or array of document frequencies to use instead of the corpus df (external vocabulary only).
    ``vocabulary='fixed'`` (with ``fixed_vocab``, a BED path or DataFrame of candidate intervals in
    token order, and ``external_df``): the vocabulary and df of another corpus, as
    :func:`tokenize_downstream` uses it. ``role``: ``corpus`` refuses datasets mapped with the manifest
    role ``downstream``; recorded in ``corpus.json``.
    Returns the opened :class:`~epiflow.corpus.shard.Corpus`.
    """
    from tqdm.auto import tqdm

    if vocabulary not in ("curate", "external", "fixed"):
        raise ConfigError(f"unknown vocabulary mode '{vocabulary}'", field="vocabulary",
                          fix="use 'curate' or 'external'")
    if shard_size < 1:
        raise ConfigError("shard_size must be >= 1", field="shard_size")
    if external_df is not None and vocabulary == "curate":
        raise ConfigError("an external document frequency needs vocabulary 'external'", field="external_df",
                          fix="pass --vocabulary-mode external, or drop --external-df")
    if vocabulary == "fixed" and (fixed_vocab is None or external_df is None):
        raise ConfigError("a fixed vocabulary needs its cCREs and document frequency", field="vocabulary",
                          fix="pass fixed_vocab (vocab.bed) and external_df (df.npy) of the corpus")
    block_size = int(block_size or shard_size)
    out = Path(out)
    _check_out_folder(out)
    cand = _read_candidates(ccres)
    n_cand = len(cand)
    cand_id = vocab_id_from_intervals(cand["chrom"], cand["start"], cand["end"])
    fixed_index = None
    if vocabulary == "fixed":
        fixed_index = _fixed_vocab_index(cand, _read_candidates(fixed_vocab))
    n_df = n_cand if fixed_index is None else len(fixed_index)
    mapped = [Path(p) for p in mapped]
    if not mapped:
        raise ConfigError("no mapped datasets given", field="mapped", fix="pass the map-dataset outputs")
    if len(set(mapped)) != len(mapped):
        raise ConfigError("a mapped dataset is listed twice", field="mapped")

    if external_df is not None:  # checked before any work
        ext_src = str(external_df) if not isinstance(external_df, np.ndarray) else "array"
        try:
            ext_dfv = np.load(external_df) if not isinstance(external_df, np.ndarray) else external_df
        except (OSError, ValueError) as exc:
            raise InputFormatError(f"cannot read the document frequency ({exc})", path=ext_src,
                                   fix="give a .npy saved with numpy.save") from None
        ext_dfv = np.asarray(ext_dfv, dtype=np.float64).ravel()
        if len(ext_dfv) != n_df:
            raise VocabularyMismatchError(
                f"the external document frequency has {len(ext_dfv)} values, the vocabulary {n_df}",
                path=ext_src, fix="use the df file of the same cCRE set")

    # ---- pass 1: QC on candidates, accessibility --------------------------------------------
    cells_open = np.zeros(n_cand, dtype=np.int64)
    most_open = 0  # the most accessible candidates in one cell
    infos: list[_Mapped] = []
    keep1: list[np.ndarray] = []
    seen_names: dict[str, Path] = {}
    for p in tqdm(mapped, desc="pass 1 (QC, accessibility)", disable=not progress):
        a, rep = _open_mapped(p, n_cand, cand_id)
        if role == "corpus" and rep.get("role") == "downstream":
            a.file.close()
            raise ConfigError(f"dataset '{rep.get('dataset', p.stem)}' has the manifest role 'downstream': "
                              "it must not enter the pretraining corpus", path=str(p), field="role",
                              fix="build the corpus from the corpus-role datasets only; tokenize downstream "
                                  "datasets with 'epiflow tokenize-downstream'")
        try:
            obs = a.obs.copy()
            name = str(obs["dataset"].iloc[0]) if "dataset" in obs and len(obs) else p.stem
            if name in seen_names:
                raise ConfigError(f"dataset '{name}' appears in two mapped files ({seen_names[name]})",
                                  path=str(p), field="dataset", fix="give each dataset once")
            seen_names[name] = p
            k = np.zeros(a.n_obs, dtype=bool)
            for i, X in _blocks(a, block_size):
                n = accessible_per_cell(X)
                most_open = max(most_open, int(n.max(initial=0)))
                kk = n >= max(min_ccres_per_cell, 1)
                k[i:i + X.shape[0]] = kk
                Xk = X[np.flatnonzero(kk)]
                cells_open += np.bincount(Xk.indices[Xk.data > 0], minlength=n_cand)
        finally:
            a.file.close()
        infos.append(_Mapped(p, int(len(obs)), obs, rep))
        keep1.append(k)

    if not any(k.any() for k in keep1):  # the cell filter, not min_cells, left nothing
        raise ConfigError(f"no cell has >= {min_ccres_per_cell} accessible cCREs (the most in one cell: "
                          f"{most_open}): the {'corpus' if role == 'corpus' else 'downstream folder'} is empty",
                          field="min_ccres_per_cell",
                          fix="lower min_ccres_per_cell (--min-ccres-per-cell) or check the mapping")

    # ---- vocabulary ---------------------------------------------------------------------------
    if vocabulary == "curate":
        from ..genome.ccre import filter_vocab

        vocab, keep_index, stats = filter_vocab(cand, cells_open, min_cells)
    elif vocabulary == "fixed":
        keep_index = fixed_index
        vocab = cand[["chrom", "start", "end"]].iloc[keep_index].reset_index(drop=True)
        stats = pd.DataFrame({"chrom": vocab["chrom"], "start": vocab["start"], "end": vocab["end"],
                              "width": vocab["end"] - vocab["start"], "cells_open": cells_open[keep_index],
                              "kept": True})
    else:
        keep_index = np.arange(n_cand, dtype=np.int64)
        vocab = cand[["chrom", "start", "end"]].reset_index(drop=True)
        stats = pd.DataFrame({"chrom": vocab["chrom"], "start": vocab["start"], "end": vocab["end"],
                              "width": vocab["end"] - vocab["start"], "cells_open": cells_open,
                              "kept": True})
    n_voc = len(keep_index)
    if n_voc == 0:
        raise ConfigError(f"no cCRE is open in >= {min_cells} cells: the vocabulary is empty",
                          field="min_cells", fix="lower min_cells or add datasets/cells")
    colmap = np.full(n_cand, -1, dtype=np.int64)
    colmap[keep_index] = np.arange(n_voc)

    # ---- pass 2: final QC on the vocabulary, document frequency ------------------------------
    df_count = np.zeros(n_voc, dtype=np.int64)
    keep2: list[np.ndarray] = []
    qc_rows = []
    import anndata as ad

    for info, k1 in tqdm(list(zip(infos, keep1)), desc="pass 2 (df)", disable=not progress):
        a = ad.read_h5ad(info.path, backed="r")
        k2 = np.zeros(info.n_cells, dtype=bool)
        nacc = np.zeros(info.n_cells, dtype=np.int64)
        try:
            for i, X in _blocks(a, block_size):
                Xv = _restrict(X, colmap, n_voc)
                n = accessible_per_cell(Xv)
                nacc[i:i + X.shape[0]] = n
                kk = k1[i:i + X.shape[0]] & (n >= max(min_ccres_per_cell, 1))
                k2[i:i + X.shape[0]] = kk
                Xk = Xv[np.flatnonzero(kk)]
                df_count += np.bincount(Xk.indices, minlength=n_voc)
        finally:
            a.file.close()
        keep2.append(k2)
        rep = info.report
        obs = info.obs
        frac = np.nan
        if "n_fragments" in obs and "n_fragments_in_ccres" in obs:
            tot = float(obs["n_fragments"].to_numpy()[k2].sum())
            frac = float(obs["n_fragments_in_ccres"].to_numpy()[k2].sum()) / tot if tot else np.nan
        qc_rows.append({
            "dataset": str(obs["dataset"].iloc[0]) if "dataset" in obs and len(obs) else info.path.stem,
            "cells_in": info.n_cells, "cells_kept": int(k2.sum()), "cells_dropped": int(info.n_cells - k2.sum()),
            "cells_dropped_candidates": int((~k1).sum()), "cells_dropped_vocab": int((k1 & ~k2).sum()),
            "median_ccres_per_cell": float(np.median(nacc[k2])) if k2.any() else 0.0,
            "frac_fragments_in_ccres": frac,
            "lift_fraction_lost": rep.get("lift_fraction_lost", np.nan) if rep.get("lifted") else np.nan,
            "genome": rep.get("genome_declared", ""),
        })
    n_total = int(sum(k.sum() for k in keep2))
    if n_total == 0:
        raise ConfigError(f"no cell has >= {min_ccres_per_cell} accessible cCREs: the "
                          f"{'corpus' if role == 'corpus' else 'downstream folder'} is empty",
                          field="min_ccres_per_cell", fix="lower min_ccres_per_cell or check the mapping")
    if external_df is not None:
        df_src, dfv = ext_src, ext_dfv
    else:
        df_src = "corpus"
        dfv = df_count.astype(np.float64) / n_total

    # ---- pass 3: tokenize and write shards ------------------------------------------------------
    vocab_id = vocab_id_from_intervals(vocab["chrom"], vocab["start"], vocab["end"])
    schema = _obs_schema([i.obs for i in infos])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, folder_mode())  # mkdtemp's 0700 -> the mode of a plain mkdir (the umask's)
        (tmp / "shards").mkdir()
        shard_paths, shard_cells = [], []
        buf_X: list[sp.csr_matrix] = []
        buf_obs: list[pd.DataFrame] = []
        buffered = 0

        def flush(final: bool):
            nonlocal buf_X, buf_obs, buffered
            while buffered >= shard_size or (final and buffered > 0):
                X = sp.vstack(buf_X, format="csr")
                obs = pd.concat(buf_obs, ignore_index=True)
                take = min(shard_size, X.shape[0])
                sh = shard_from_counts(X[:take], dfv, obs.iloc[:take].reset_index(drop=True),
                                       vocab_id=vocab_id, genome=genome)
                rel = f"shards/shard_{len(shard_paths):05d}.h5"
                write_shard(tmp / rel, sh)
                shard_paths.append(rel)
                shard_cells.append(int(take))
                rest = X[take:]
                buf_X = [rest] if rest.shape[0] else []
                buf_obs = [obs.iloc[take:].reset_index(drop=True)] if rest.shape[0] else []
                buffered = rest.shape[0]

        for info, k2 in tqdm(list(zip(infos, keep2)), desc="pass 3 (shards)", disable=not progress):
            a = ad.read_h5ad(info.path, backed="r")
            obs_all = _conform_obs(info.obs.reset_index(drop=True), schema)
            try:
                for i, X in _blocks(a, block_size):
                    rows = np.flatnonzero(k2[i:i + X.shape[0]])
                    if len(rows) == 0:
                        continue
                    buf_X.append(_restrict(X[rows], colmap, n_voc))
                    buf_obs.append(obs_all.iloc[i + rows].reset_index(drop=True))
                    buffered += len(rows)
                    flush(False)
            finally:
                a.file.close()
        flush(True)

        from ..genome.ccre import write_vocab, write_vocab_stats

        write_vocab(vocab, tmp / "vocab.bed")
        write_vocab_stats(stats, tmp / "vocab_stats.tsv")
        np.save(tmp / "df.npy", dfv)
        qc = qc_table(qc_rows)
        qc.to_csv(tmp / "qc.tsv", sep="\t", index=False, na_rep="NA")
        meta = {
            "n_cells": n_total, "n_ccres": int(n_voc), "vocab_id": vocab_id, "genome": genome,
            "shards": shard_paths, "shard_cells": shard_cells,
            "datasets": [r["dataset"] for r in qc_rows],
            "vocabulary": vocabulary, "n_candidates": int(n_cand), "candidates_id": cand_id,
            "df_source": df_src, "role": role,
            "params": {"min_cells": int(min_cells), "min_ccres_per_cell": int(min_ccres_per_cell),
                       "shard_size": int(shard_size)},
        }
        meta.update(meta_extra or {})
        write_corpus_meta(tmp, meta)
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("corpus %s: %d cells, %d cCREs, %d shard(s)", out, n_total, n_voc, len(shard_paths))
    return open_corpus(out)


def _fixed_vocab_index(cand: pd.DataFrame, vocab: pd.DataFrame) -> np.ndarray:
    """Candidate row of every vocabulary cCRE (vocabulary order); an error if one is no candidate."""
    key = ["chrom", "start", "end"]
    c = cand[key].astype({"chrom": str, "start": np.int64, "end": np.int64}).reset_index(drop=True)
    v = vocab[key].astype({"chrom": str, "start": np.int64, "end": np.int64}).reset_index(drop=True)
    c["_row"] = np.arange(len(c))
    m = v.merge(c.drop_duplicates(key), on=key, how="left")
    miss = m["_row"].isna().to_numpy()
    if miss.any():
        first = v[miss].iloc[0]
        raise VocabularyMismatchError(
            f"{int(miss.sum())} of the {len(v)} vocabulary cCREs are not candidate cCREs (first: "
            f"{first['chrom']}:{first['start']}-{first['end']})", field="ccres",
            fix="map the dataset onto the candidate cCREs the corpus was built from")
    return m["_row"].to_numpy(np.int64)


def tokenize_downstream(ccres, mapped, out, *, corpus=None, vocab=None, df=None, genome: str = "",
                        min_ccres_per_cell: int = 100, shard_size: int = 5000, overwrite: bool = True,
                        progress: bool = False):
    """Tokenize downstream datasets onto a corpus vocabulary with the corpus document frequency.

    The same streaming passes as :func:`build_corpus` (per-cell QC on the candidates and on the
    vocabulary, global TF-IDF rank-ordered sentences, shards), but the vocabulary and ``df`` are not
    computed from these cells: they come from ``corpus`` (its ``vocab.bed`` and ``df.npy``), or from
    ``vocab`` + ``df`` (e.g. an external vocabulary and its document frequency when no corpus is
    built). ``out`` is a corpus folder of the same format (``corpus.json`` ``role: downstream``), so
    every task reads it like the corpus.
    """
    extra: dict = {}
    if corpus is not None:
        c = open_corpus(corpus)
        vocab = c.root / "vocab.bed" if vocab is None else vocab
        df = c.root / "df.npy" if df is None else df
        genome = genome or c.meta.get("genome", "")
        extra["source_corpus"] = {"path": str(Path(corpus).resolve()), "vocab_id": c.vocab_id,
                                  "datasets": list(c.meta.get("datasets", []))}
    if vocab is None or df is None:
        raise ConfigError("downstream tokenization needs the corpus vocabulary and document frequency",
                          field="corpus", fix="pass --corpus DIR, or --vocab BED and --df NPY")
    extra["vocab_source"] = str(vocab)
    return build_corpus(ccres, mapped, out, genome=genome, min_cells=0, min_ccres_per_cell=min_ccres_per_cell,
                        shard_size=shard_size, vocabulary="fixed", external_df=df, fixed_vocab=vocab,
                        overwrite=overwrite, progress=progress, role="downstream", meta_extra=extra)


def _check_out_folder(out: Path) -> None:
    """The output must be a folder: an existing file there (e.g. one of the inputs) is refused before any work."""
    check_output_kind(out, "folder", "corpus output", field="out",
                      fix="give a folder path (a new folder or an existing corpus folder), or remove the file")


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.is_symlink() or out.exists():
        if not overwrite:
            raise ConfigError("output folder exists", path=str(out), fix="remove it or pass overwrite")
        _check_out_folder(out)
    replace_folder(tmp, out)


# ----------------------------------------------------------------------------------------------
# candidate cCREs (stage 1)
# ----------------------------------------------------------------------------------------------

def candidate_set(entries, genome: str, *, sources=(), external_vocab=None, chain: str | None = None,
                  data_mirror=None) -> tuple[pd.DataFrame, dict]:
    """Candidate cCREs for a corpus in ``genome`` coordinates.

    * ``external_vocab`` given: that BED, in file order, unchanged (SPEC: embed new data with
      published weights); ``sources`` and dataset peaks are ignored.
    * otherwise: union of the ``sources`` BED files (taken to be in ``genome``) and the peaks of the
      manifest datasets (matrix inputs: their peaks; fragment inputs: their ``peaks`` BED when
      given), lifted to ``genome`` where a dataset's build differs, non-primary contigs dropped,
      overlapping intervals merged (:func:`epiflow.genome.ccre.candidate_ccres`).

    Returns ``(candidates, info)`` where ``info`` is a JSON-able summary per source.
    """
    from ..genome.bed import normalize_genome, read_bed
    from ..genome.ccre import candidate_ccres, load_external_vocab
    from .manifest import FRAGMENT_FORMATS, resolve_dataset
    from .mapping import check_chroms
    from .readers import read_peak_intervals

    genome = normalize_genome(genome)
    if external_vocab is not None:
        vocab, _ = load_external_vocab(external_vocab)
        return vocab, {"mode": "external", "external_vocab": str(external_vocab), "genome": genome,
                       "n_candidates": int(len(vocab))}
    sets, info_src = [], []

    def _primary(df, genome_of, path):
        u = np.unique(df["chrom"].to_numpy().astype(str))
        ok = set(u[check_chroms(u, genome=genome_of, path=path)])
        return df[df["chrom"].isin(ok)].reset_index(drop=True)

    for s in sources or ():
        df = _primary(read_bed(s)[["chrom", "start", "end"]], genome, str(s))
        sets.append(df)
        info_src.append({"source": str(s), "n": int(len(df)), "genome": genome})
    skipped = [e.name for e in entries or () if e.role == "downstream"]
    for e in entries or ():
        if e.role == "downstream":  # never seen by the vocabulary: its peaks are no candidates
            continue
        if e.format in FRAGMENT_FORMATS:
            p = e.peaks_path(data_mirror)
            if p is None:
                continue
            df = read_bed(p, name=e.name)[["chrom", "start", "end"]]
        else:
            p = resolve_dataset(e, data_mirror=data_mirror)
            df = read_peak_intervals(p, e.format)
        df = _primary(df, e.genome, str(p))
        rec = {"source": f"{e.name}:{p}", "genome": e.genome}
        if e.genome != genome:
            from ..genome.liftover import lift_intervals, load_chain
            from .mapping import chain_spec

            r = lift_intervals(load_chain(chain_spec(e.genome, genome, chain, where=e.where())),
                               df["chrom"].to_numpy(), df["start"].to_numpy(), df["end"].to_numpy())
            rec.update({"lift_in": int(len(df)), "lift_lost": int((~r.keep).sum()),
                        "lift_fraction_lost": float((~r.keep).mean()) if len(df) else 0.0})
            df = pd.DataFrame({"chrom": r.chrom, "start": r.start, "end": r.end})
        rec["n"] = int(len(df))
        sets.append(df)
        info_src.append(rec)
    if not sets or sum(len(s) for s in sets) == 0:
        raise ConfigError("no interval source for candidate cCREs: no --sources BED and no dataset with "
                          "peaks", field="sources",
                          fix="pass --sources BED files, add a 'peaks' BED to fragment datasets, or use "
                              "--external-vocab")
    cand = candidate_ccres(sets)
    return cand, {"mode": "curate", "genome": genome, "sources": info_src, "n_candidates": int(len(cand)),
                  "downstream_not_used": skipped}
