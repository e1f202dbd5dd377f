"""Semi-synthetic perturbation benchmarks built from real cells (no real perturbation counts offline).

:func:`make_perturbation_benchmark` takes a real cells x peaks count matrix (e.g.
``buenrostro2018_bm0828.h5ad``: 533 sorted bone-marrow progenitors, hg19), a TSS BED of the same build
and GO annotations, and writes two datasets whose perturbation effects are known exactly.

Generative rule (seeded; every parameter is an argument and is saved in ``truth/params.json``)
------------------------------------------------------------------------------------------------
Only peaks open in >= ``min_cells`` cells can carry an effect. Counts are binarised-aware: a peak
"opens" in a cell by setting its count to 1 where it was 0, it "closes" by setting it to 0.

**Stimulation** (``stimulation.h5ad``, obs ``condition`` = ``control`` / ``stimulated``, ``cell_type``):
cell types with >= 2 x ``min_type_cells`` cells are used; each one's cells are split at random in half,
one half stays ``control``, the other half is stimulated:

* a shared opening program: ``n_shared`` peaks (drawn among the moderately open peaks, detection
  rate below the 80th percentile), each opened with probability ``p_open`` in every stimulated cell;
* a cell-type-specific opening program: ``n_specific`` further peaks per type, opened with ``p_open``;
* a shared closing program: ``n_close`` peaks (among the peaks open in >= 10 % of cells), closed with
  probability ``p_close`` in every stimulated cell.

``truth/stimulation.tsv`` lists every (cell type, peak, component, probability, expected change of
the fraction of open cells = ``p_open * (1 - f_ctrl)`` or ``-p_close * f_ctrl`` with the type's
control fraction ``f_ctrl``).

**Genetic knockouts** (``genetic.h5ad``, obs ``perturbation`` = ``control`` or the gene symbol,
``cell_type``): all cells of the data set; ``control_fraction`` of them stay controls, the rest are
assigned evenly to ``n_genes`` knocked-out genes. Candidate genes have a GO annotation and >= ``min_peaks``
effect-capable peaks whose centre lies within ``window`` bp of one of the gene's TSS; the genes are
drawn at random among those with at least one GO neighbour (GEARS graph: Jaccard > 0.1, top 20)
that is also a candidate gene, so that held-out genes have informative neighbours. A knockout of g
closes every peak near g's TSS with probability ``p_direct`` in each of its cells, and every peak
near the TSS of each GO neighbour h of g (among candidate genes) with probability
``min(p_direct / 2, p_neighbour * J(g, h))`` (weaker than the direct effect). ``truth/knockouts.tsv``: gene, peak, relation (direct / go_neighbour),
via_gene, Jaccard, closing probability.

Outputs: ``stimulation.h5ad``, ``genetic.h5ad`` (raw counts CSR int32, var chrom/start/end, obs labels
+ ``cell_id``), optional corpus folders ``stimulation_corpus/`` and ``genetic_corpus/`` (shards over the
same peaks, df of those cells; ready for ``predict-*``) and ``source_corpus/`` (the unmodified input
cells, same peaks: pretrain there so that the model never saw a perturbed cell), ``truth/``,
``go.tsv`` (the GO annotations of the data set's genes), ``README.md``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ConfigError, InputFormatError
from ..io import atomic_path, check_output_kind

log = logging.getLogger(__name__)


def _peak_table(adata) -> pd.DataFrame:
    v = adata.var
    if {"chrom", "start", "end"} <= set(v.columns):
        return pd.DataFrame({"chrom": v["chrom"].astype(str).to_numpy(), "start": v["start"].astype(np.int64).to_numpy(),
                             "end": v["end"].astype(np.int64).to_numpy()})
    parts = pd.Series(adata.var_names.astype(str)).str.extract(r"^(.+?)[:_](\d+)[-_](\d+)$")
    if parts.isna().any().any():
        raise InputFormatError("peaks need var columns chrom/start/end or var_names 'chrom:start-end'",
                               field="var", fix="add chrom/start/end columns to var")
    return pd.DataFrame({"chrom": parts[0], "start": parts[1].astype(np.int64), "end": parts[2].astype(np.int64)})


def read_tss(path) -> pd.DataFrame:
    """TSS BED (chrom, start, end, gene_name, ...) -> chrom, pos, gene."""
    path = Path(path)
    if not path.exists():
        raise InputFormatError("TSS file not found", path=str(path), fix="pass a BED6 of TSS (e.g. hg19_tss.bed.gz)")
    df = pd.read_csv(path, sep="\t", header=None, comment="#", usecols=[0, 1, 3], dtype={0: str, 1: np.int64, 3: str})
    df.columns = ["chrom", "pos", "gene"]
    return df.dropna()


def peaks_near_tss(peaks: pd.DataFrame, tss: pd.DataFrame, window: int) -> pd.DataFrame:
    """Pairs (gene, peak index) with the peak centre within ``window`` bp of a TSS of the gene."""
    centre = ((peaks["start"] + peaks["end"]) // 2).to_numpy()
    out = []
    for chrom, t in tss.groupby("chrom", sort=False):
        pi = np.flatnonzero(peaks["chrom"].to_numpy() == chrom)
        if pi.size == 0:
            continue
        order = np.argsort(centre[pi], kind="stable")
        pi, c = pi[order], centre[pi][order]
        lo = np.searchsorted(c, t["pos"].to_numpy() - window, "left")
        hi = np.searchsorted(c, t["pos"].to_numpy() + window, "right")
        n = hi - lo
        if n.sum() == 0:
            continue
        rep = np.repeat(np.arange(len(t)), n)
        idx = np.repeat(lo, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
        out.append(pd.DataFrame({"gene": t["gene"].to_numpy()[rep], "peak": pi[idx]}))
    if not out:
        return pd.DataFrame({"gene": [], "peak": []})
    return pd.concat(out, ignore_index=True).drop_duplicates().reset_index(drop=True)


def _open(X: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray, p: float, rng) -> sp.csr_matrix:
    """Set X[r, c] = 1 where it is 0, with probability p, for all rows x cols."""
    if len(rows) == 0 or len(cols) == 0:
        return X
    sub = X[rows][:, cols].toarray()
    hit = (sub == 0) & (rng.random(sub.shape) < p)
    r, c = np.nonzero(hit)
    add = sp.csr_matrix((np.ones(len(r), X.dtype), (rows[r], cols[c])), shape=X.shape)
    return (X + add).tocsr()


def _close(X: sp.csr_matrix, rows: np.ndarray, cols, probs, rng) -> sp.csr_matrix:
    """Zero X[r, c] with probability probs[c] (per column) for the given rows."""
    cols = np.asarray(cols, np.int64)
    if len(rows) == 0 or len(cols) == 0:
        return X
    probs = np.broadcast_to(np.asarray(probs, np.float64), cols.shape)
    X = X.tocoo()
    in_rows = np.isin(X.row, rows)
    colp = np.zeros(X.shape[1])
    np.maximum.at(colp, cols, probs)
    drop = in_rows & (rng.random(X.nnz) < colp[X.col])
    return sp.csr_matrix((X.data[~drop], (X.row[~drop], X.col[~drop])), shape=X.shape)


def _write_h5ad(X, obs, peaks, path, uns):
    import anndata as ad

    var = peaks.copy()
    var.index = [f"{c}:{s}-{e}" for c, s, e in zip(var["chrom"], var["start"], var["end"])]
    obs = obs.copy()
    obs.index = obs["cell_id"].astype(str).to_numpy()
    a = ad.AnnData(X=sp.csr_matrix(X, dtype=np.int32), obs=obs, var=var)
    a.uns.update(uns)
    with atomic_path(path) as tmp:
        a.write_h5ad(tmp, compression="gzip")


def write_corpus(out_dir, X, obs, peaks, *, genome: str = "", shard_size: int = 5000) -> Path:
    """A corpus folder over the peaks (document frequency of these cells) for pretrain / predict-*."""
    from ..corpus.shard import shard_from_counts, vocab_id_from_intervals, write_corpus_meta, write_shard
    from ..tokenize import document_frequency

    out = Path(out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    X = sp.csr_matrix(X, dtype=np.float32)
    df = document_frequency(X)
    df = np.where(df > 0, df, 1.0 / max(X.shape[0], 1))
    vid = vocab_id_from_intervals(peaks["chrom"].to_numpy(), peaks["start"].to_numpy(), peaks["end"].to_numpy())
    with atomic_path(out / "vocab.bed") as tmp:
        peaks[["chrom", "start", "end"]].to_csv(tmp, sep="\t", header=False, index=False)
    with atomic_path(out / "df.npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, df.astype(np.float64))
    shards, sizes = [], []
    obs = obs.reset_index(drop=True)
    for i, a in enumerate(range(0, X.shape[0], shard_size)):
        b = min(X.shape[0], a + shard_size)
        sh = shard_from_counts(X[a:b], df, obs.iloc[a:b].astype(str), vocab_id=vid, genome=genome)
        rel = f"shards/shard_{i:05d}.h5"
        write_shard(out / rel, sh)
        shards.append(rel)
        sizes.append(b - a)
    write_corpus_meta(out, {"n_cells": int(X.shape[0]), "n_ccres": int(X.shape[1]), "vocab_id": vid,
                            "genome": genome, "shards": shards, "shard_cells": sizes})
    return out


#: what the benchmark folder holds: an existing --out holding anything else is not replaced
OUTPUT_NAMES = ("stimulation.h5ad", "genetic.h5ad", "truth", "go.tsv", "README.md", "stimulation_corpus",
                "genetic_corpus", "source_corpus")


def _check_out(out: Path) -> None:
    """The output folder is replaced as a whole: refuse a file, or a folder with other entries than the
    benchmark's (hidden ones aside), before any work."""
    if not (out.exists() or out.is_symlink()):
        return
    check_output_kind(out, "folder", "benchmark output", field="out",
                      fix="give a folder path (a new folder or an earlier benchmark's), or remove the file")
    other = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_NAMES and not p.name.startswith("."))
    if other:
        raise ConfigError(f"the folder holds {len(other)} other entr{'y' if len(other) == 1 else 'ies'} than the "
                          f"benchmark's ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}); writing "
                          f"the benchmark replaces the folder", path=str(out), field="out",
                          fix="give a new or empty folder (or an earlier benchmark's), or move those entries")


def make_perturbation_benchmark(adata, tss, go, out_dir, *, cell_type_key: str = "cell_type", seed: int = 0,
                                min_cells: int = 10, min_type_cells: int = 20, n_shared: int = 300,
                                n_specific: int = 150, n_close: int = 200, p_open: float = 0.5,
                                p_close: float = 0.6, n_genes: int = 12, control_fraction: float = 0.25,
                                window: int = 10_000, min_peaks: int = 2, p_direct: float = 0.9,
                                p_neighbour: float = 1.5, write_corpora: bool = True, genome: str | None = None) -> dict:
    """Write the semi-synthetic stimulation and knockout benchmarks (see the module docstring)."""
    import anndata as ad

    from ..genome.gene_graph import build_gene_graph, read_go_annotations

    final = Path(out_dir)
    _check_out(final)  # before any work
    src = None
    if isinstance(adata, (str, os.PathLike)):
        src = str(adata)
        adata = ad.read_h5ad(adata)
    # built under a temporary name beside the target, renamed onto it at the end: a failure leaves nothing
    with atomic_path(final, suffix="") as out:
        (out / "truth").mkdir(parents=True)
        rng = np.random.default_rng(seed)
        X0 = sp.csr_matrix(adata.layers["counts"] if "counts" in adata.layers else adata.X).astype(np.int32)
        X0.eliminate_zeros()
        peaks = _peak_table(adata)
        genome = genome or str(adata.uns.get("genome", ""))
        if cell_type_key not in adata.obs:
            raise InputFormatError(f"obs has no column {cell_type_key!r}", field=cell_type_key)
        ctype = adata.obs[cell_type_key].astype(str).to_numpy()
        cell_id = adata.obs_names.astype(str).to_numpy()
        frac = np.asarray((X0 > 0).mean(0)).ravel()
        capable = np.flatnonzero((X0 > 0).sum(0).A1 >= min_cells)
        params = {k: v for k, v in dict(seed=seed, min_cells=min_cells, min_type_cells=min_type_cells, n_shared=n_shared,
                                          n_specific=n_specific, n_close=n_close, p_open=p_open, p_close=p_close,
                                          n_genes=n_genes, control_fraction=control_fraction, window=window,
                                          min_peaks=min_peaks, p_direct=p_direct, p_neighbour=p_neighbour,
                                          source=src, genome=genome).items()}

        # ---------------- stimulation
        types = [t for t, n in pd.Series(ctype).value_counts().items() if n >= 2 * min_type_cells]
        if len(types) < 2:
            raise InputFormatError(f"need >= 2 cell types with >= {2 * min_type_cells} cells", field=cell_type_key)
        moderate = capable[frac[capable] <= np.quantile(frac[capable], 0.8)]
        open_pool = rng.permutation(moderate)
        shared = np.sort(open_pool[:n_shared])
        specific = {t: np.sort(open_pool[n_shared + i * n_specific: n_shared + (i + 1) * n_specific])
                    for i, t in enumerate(types)}
        closable = np.setdiff1d(capable[frac[capable] >= 0.1], open_pool[: n_shared + len(types) * n_specific])
        close = np.sort(rng.choice(closable, min(n_close, len(closable)), replace=False))
        stim_cells = np.flatnonzero(np.isin(ctype, types))
        cond = np.full(len(ctype), "", dtype=object)
        Xs = X0.copy()
        truth = []
        for t in types:
            rows = np.flatnonzero(ctype == t)
            rows = rng.permutation(rows)
            half = len(rows) // 2
            ctrl_rows, st_rows = np.sort(rows[:half]), np.sort(rows[half:])
            cond[ctrl_rows], cond[st_rows] = "control", "stimulated"
            f_ctrl = np.asarray((X0[ctrl_rows] > 0).mean(0)).ravel()
            Xs = _open(Xs, st_rows, shared, p_open, rng)
            Xs = _open(Xs, st_rows, specific[t], p_open, rng)
            Xs = _close(Xs, st_rows, close, p_close, rng)
            for comp, cols, sign, p in (("shared_open", shared, 1, p_open), ("type_specific_open", specific[t], 1, p_open),
                                        ("shared_close", close, -1, p_close)):
                truth.append(pd.DataFrame({"cell_type": t, "peak": cols, "peak_name": [f"{peaks['chrom'][c]}:{peaks['start'][c]}-{peaks['end'][c]}" for c in cols],
                                           "component": comp, "probability": p,
                                           "expected_change": p * (1 - f_ctrl[cols]) if sign > 0 else -p * f_ctrl[cols]}))
        obs_s = pd.DataFrame({"cell_id": cell_id[stim_cells], "cell_type": ctype[stim_cells],
                              "condition": cond[stim_cells].astype(str), "dataset": "stimulation_benchmark"})
        Xs = Xs[stim_cells]
        _write_h5ad(Xs, obs_s, peaks, out / "stimulation.h5ad", {"genome": genome, "benchmark": "stimulation"})
        with atomic_path(out / "truth" / "stimulation.tsv") as tmp:
            pd.concat(truth, ignore_index=True).to_csv(tmp, sep="\t", index=False, float_format="%.6g")

        # ---------------- genetic knockouts
        tss_df = read_tss(tss)
        go_df = read_go_annotations(go)
        near = peaks_near_tss(peaks, tss_df, window)
        near = near[np.isin(near["peak"].to_numpy(), capable)]
        n_near = near.groupby("gene")["peak"].nunique()
        annotated = set(go_df["gene"])
        cand = sorted(g for g, n in n_near.items() if n >= min_peaks and g in annotated)
        if len(cand) < 4:
            raise InputFormatError(f"only {len(cand)} genes have >= {min_peaks} peaks within {window} bp of their TSS "
                                   "and a GO annotation", field="tss", fix="check that the TSS file matches the genome "
                                   "build of the peaks (hg19 vs hg38), or lower --min-peaks / raise --window")
        graph = build_gene_graph(go_df, genes=cand)
        nb = graph.to_frame()
        has_nb = sorted(set(nb["gene"]))
        pool = has_nb if len(has_nb) >= n_genes else cand
        ko = sorted(rng.choice(pool, min(n_genes, len(pool)), replace=False).tolist())
        n_cells = X0.shape[0]
        perm = rng.permutation(n_cells)
        n_ctrl = int(round(control_fraction * n_cells))
        pert = np.empty(n_cells, dtype=object)
        pert[perm[:n_ctrl]] = "control"
        rest = perm[n_ctrl:]
        pert[rest] = np.asarray(ko, dtype=object)[np.arange(len(rest)) % len(ko)]
        near_by_gene = near.groupby("gene")["peak"].apply(lambda s: np.unique(s.to_numpy()))
        Xg = X0.copy()
        ktruth = []
        for g in ko:
            rows = np.flatnonzero(pert == g)
            cols = [near_by_gene[g]]
            probs = [np.full(len(near_by_gene[g]), p_direct)]
            ktruth.append(pd.DataFrame({"gene": g, "peak": near_by_gene[g], "relation": "direct", "via_gene": g,
                                        "jaccard": 1.0, "probability": p_direct}))
            for _, r in nb[nb["gene"] == g].iterrows():
                h = r["neighbour"]
                p = min(p_direct / 2, p_neighbour * float(r["jaccard"]))
                cols.append(near_by_gene[h])
                probs.append(np.full(len(near_by_gene[h]), p))
                ktruth.append(pd.DataFrame({"gene": g, "peak": near_by_gene[h], "relation": "go_neighbour", "via_gene": h,
                                            "jaccard": float(r["jaccard"]), "probability": p}))
            Xg = _close(Xg, rows, np.concatenate(cols), np.concatenate(probs), rng)
        obs_g = pd.DataFrame({"cell_id": cell_id, "cell_type": ctype, "perturbation": pert.astype(str),
                              "dataset": "genetic_benchmark"})
        _write_h5ad(Xg, obs_g, peaks, out / "genetic.h5ad", {"genome": genome, "benchmark": "genetic"})
        with atomic_path(out / "truth" / "knockouts.tsv") as tmp:
            pd.concat(ktruth, ignore_index=True).to_csv(tmp, sep="\t", index=False, float_format="%.6g")
        with atomic_path(out / "truth" / "gene_graph.tsv") as tmp:
            nb.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
        with atomic_path(out / "go.tsv") as tmp:
            go_df[go_df["gene"].isin(cand)].rename(columns={"gene": "gene_symbol"}).to_csv(tmp, sep="\t", index=False)
        params.update(stim_cell_types=types, knockout_genes=ko, n_candidate_genes=len(cand))
        with atomic_path(out / "truth" / "params.json") as tmp:
            Path(tmp).write_text(json.dumps(params, indent=2, default=str))
        if write_corpora:
            write_corpus(out / "stimulation_corpus", Xs, obs_s, peaks, genome=genome)
            write_corpus(out / "genetic_corpus", Xg, obs_g, peaks, genome=genome)
            # the unmodified input cells over the same peaks: pretrain here, so that the pretrained model has
            # never seen a perturbed cell (the held-out types' perturbed cells in particular)
            obs_0 = pd.DataFrame({"cell_id": cell_id, "cell_type": ctype, "dataset": "source"})
            write_corpus(out / "source_corpus", X0, obs_0, peaks, genome=genome)
        readme = (__doc__ or "").split("Generative rule", 1)[-1]
        with atomic_path(out / "README.md") as tmp:
            Path(tmp).write_text(f"# Semi-synthetic perturbation benchmark (epiflow make-perturbation-benchmark)\n\n"
                                 f"Source: `{src}`; seed {seed}; stimulated cell types {types}; knocked-out genes {ko}.\n\n"
                                 f"## Generative rule{readme}\n\n## Parameters\n\n```\n{json.dumps(params, indent=2, default=str)}\n```\n")
    log.info("benchmark written to %s: stimulation %d cells (%s), genetic %d cells (%d knockouts)", final,
             len(stim_cells), types, n_cells, len(ko))
    return {"stimulation_cells": int(len(stim_cells)), "genetic_cells": int(n_cells), "cell_types": types,
            "knockouts": ko, "out": str(final)}
