"""In-silico cCRE knockout between two cell states (SPEC §5; normal vs cancer in the paper).

1. Optionally fine-tune the model as in feature extraction (SR + CCA, K = 1) on the cells of both states.
2. **OT pairs**: every cell of state A (``normal``) is matched to a cell of state B (``cancer``) by
   exact EMD on the cosine distance of the embeddings (:func:`epiflow.tasks.integration.ot_match`).
3. **Chimeric reference cells**: for a random pair and a *cancerization score* ``s ~ U[0, 1]``, each
   accessible cCRE of the B cell is taken with probability ``s`` and each of the A cell with
   probability ``1 - s`` (union, binary counts), so ``s`` is the expected fraction coming from B.
4. **Query cells**: chimeras at ``s = 0.5``; for every target one copy with its cCREs **added** (set
   accessible) and one with them **removed**. A target is one promoter cCRE (``target_unit: ccre``, the
   SPEC's default) or all promoter cCREs of one gene at once (``target_unit: gene``: the paper's
   per-promoter knockouts of Fig. 5d-e, e.g. VEGFA); ``group`` adds every target cCRE at once ("Group").
5. **Effect** of a knockout on a query cell = mean score of its ``k = 20`` nearest reference cells
   (Euclidean, embeddings) with the target removed minus with it added. The same is done for random
   knockouts of the **same size**: random single cCREs (always), and for a target of ``m > 1`` cCREs
   (a gene, the Group) random sets of ``m`` cCREs removed at once. Per target a one-sided Welch t-test
   compares its per-cell effects with the pooled effects of the random knockouts of its size (default
   ``alternative="less"``: the knockout lowers the score more than a random one of as many cCREs).
6. Tables for the figures (Fig. 5b-e): the UMAP of the reference cells with their scores
   (``reference_cells``); per target and query cell, the position (mean UMAP coordinates of its 20
   nearest reference cells) and score with the target added and removed (``shifts``); the cCREs around
   each target gene's TSS with the fraction of accessible cells in each state (``tss_ccres``,
   :func:`tss_neighbourhood`; its ``target`` column marks each knocked-out cCRE, also with the gene
   unit). The verb draws the reference UMAP coloured by score with one arrow per target (mean position
   of its query cells, added -> removed) and a bar chart of the mean effects with the random control.

Targets come from gene promoters: :func:`promoter_ccres` intersects TSS upstream windows (from
``hg19_tss.bed.gz`` / ``hg38_tss.bed.gz`` BED6 or any GTF) with the cCRE vocabulary
(:func:`knockout_targets` picks them from the settings, one row per cCRE; :func:`knockout_sets` makes
the knocked-out sets and names them: ``GENE:ccre``, ``GENE`` for a whole promoter, ``Group``).

API: :func:`run` (loaded cells + model + :class:`~epiflow.tasks.config.KnockoutConfig` + targets)
returns a :class:`~epiflow.tasks.common.TaskResult`; ``epiflow knockout`` (:mod:`.knockout_cli`) reads
the TSS / vocabulary / df files, writes the result and draws the figures (:mod:`epiflow.plots.knockout`).
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ConfigError, EpiflowError, InputFormatError
from ..metrics.table import metric_rows, metrics_frame
from ..tokenize.core import binarize
from .common import TaskResult, umap_coords
from .zeroshot import obs_column

if TYPE_CHECKING:
    from .config import KnockoutConfig

log = logging.getLogger(__name__)

TASK = "knockout"


# ----------------------------------------------------------------------------- targets
def read_tss(path) -> pd.DataFrame:
    """TSS table ``chrom, tss, strand, gene`` from a BED6 (``chrom, tss, tss+1, gene, ., strand``) or a
    GTF (``gene`` records, else ``transcript``; TSS = start on +, end on -; ``gene_name`` attribute)."""
    from ..errors import decompression_errors
    from ..genome.bed import read_bed
    from ..genome.intervals import normalize_chrom

    path = Path(path)
    name = path.name.lower()
    if name.endswith((".gtf", ".gtf.gz")):
        if not path.is_file():
            raise InputFormatError("TSS / GTF file not found", path=str(path), field="tss",
                                   fix="give a BED6 of TSSs or a GTF")
        op = gzip.open if name.endswith(".gz") else open
        try:
            with decompression_errors(path, "GTF file"), op(path, "rt") as fh:
                g = pd.read_csv(fh, sep="\t", comment="#", header=None, usecols=[0, 2, 3, 4, 6, 8],
                                names=["chrom", "feature", "start", "end", "strand", "attr"], dtype=str)
        except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise InputFormatError(f"not a GTF ({str(exc).splitlines()[0]})", path=str(path),
                                   fix="give a GTF (9 tab-separated columns) or a BED6 of TSSs") from None
        feat = "gene" if (g["feature"] == "gene").any() else "transcript"
        g = g[g["feature"] == feat]
        if g.empty:
            raise InputFormatError("no gene or transcript records in the GTF", path=str(path), field="feature")
        gene = g["attr"].str.extract(r'gene_name "([^"]+)"')[0].fillna(g["attr"].str.extract(r'gene_id "([^"]+)"')[0])
        try:
            start = g["start"].astype(np.int64) - 1  # GTF is 1-based
            end = g["end"].astype(np.int64)
        except (ValueError, TypeError):
            raise InputFormatError("GTF start / end (columns 4, 5) are not all integers", path=str(path),
                                   fix="give a GTF (9 tab-separated columns) or a BED6 of TSSs") from None
        tss = np.where(g["strand"] == "-", end - 1, start)
        out = pd.DataFrame({"chrom": normalize_chrom(g["chrom"].to_numpy()), "tss": tss,
                            "strand": g["strand"].to_numpy(), "gene": gene.to_numpy()})
    else:
        b = read_bed(path, min_columns=6)
        out = pd.DataFrame({"chrom": normalize_chrom(b["chrom"].to_numpy()), "tss": b["start"].to_numpy(),
                            "strand": b["strand"].to_numpy(), "gene": b["name"].to_numpy()})
    return out.dropna(subset=["gene"]).reset_index(drop=True)


def promoter_ccres(tss: pd.DataFrame, vocab: pd.DataFrame, genes=None, *, upstream: int = 2000,
                   downstream: int = 500) -> pd.DataFrame:
    """cCREs of the vocabulary (``chrom, start, end`` in token order) overlapping the promoter window
    ``[TSS - upstream, TSS + downstream)`` (strand-aware) of the given genes (all when ``None``).
    Returns ``gene, ccre, chrom, start, end`` (``ccre`` = vocabulary index), one row per pair."""
    from ..genome.intervals import overlap_pairs

    t = tss
    if genes is not None:
        genes = [str(g) for g in genes]
        t = t[t["gene"].isin(genes)]
        missing = sorted(set(genes) - set(t["gene"]))
        if missing:
            log.warning("genes without a TSS in the annotation: %s", missing)
    plus = t["strand"].to_numpy() != "-"
    lo = np.where(plus, t["tss"] - upstream, t["tss"] - downstream + 1)
    hi = np.where(plus, t["tss"] + downstream, t["tss"] + upstream + 1)
    ia, ib = overlap_pairs(t["chrom"].to_numpy(), np.maximum(lo, 0), hi, vocab["chrom"].to_numpy(),
                           vocab["start"].to_numpy(), vocab["end"].to_numpy())
    out = pd.DataFrame({"gene": t["gene"].to_numpy()[ia], "ccre": ib,
                        "chrom": vocab["chrom"].to_numpy()[ib], "start": vocab["start"].to_numpy()[ib],
                        "end": vocab["end"].to_numpy()[ib]})
    return out.drop_duplicates(["gene", "ccre"]).reset_index(drop=True)


# cCREs this far beyond a gene's promoter windows are listed around its TSS (table tss_ccres, Fig. 5b)
NEIGHBOURHOOD_FLANK = 10_000

TSS_CCRES_COLUMNS = ["gene", "chrom", "tss", "strand", "window", "downstream", "ccre", "start", "end",
                     "rel_start", "rel_end", "target"]


def tss_neighbourhood(cfg: KnockoutConfig, tss: pd.DataFrame | None, vocab: pd.DataFrame | None,
                      targets: pd.DataFrame | None = None, *, flank: int = NEIGHBOURHOOD_FLANK) -> pd.DataFrame:
    """The cCREs of the vocabulary around the TSS of each gene of ``cfg.genes`` (the paper's Fig. 5b).

    The neighbourhood of a gene spans its promoter windows (every TSS of the gene, the gene's upstream
    window of ``GENE:BP`` or ``cfg.promoter_upstream``, ``cfg.promoter_downstream``) plus ``flank`` bp on
    either side.
    Positions are relative to the gene's most upstream TSS (``tss``), strand-aware: ``rel_start`` /
    ``rel_end`` < 0 lie upstream. ``target``: the cCRE is one of ``targets`` of this gene (the promoter
    cCREs that are knocked out). Columns :data:`TSS_CCRES_COLUMNS`, one row per (gene, cCRE), genes in the
    given order, cCREs from upstream to downstream; no rows
    when the targets are cCRE indices (``cfg.target_ccres``) or no TSS table is given."""
    from ..genome.intervals import normalize_chrom, overlap_pairs

    empty = pd.DataFrame({c: pd.Series(dtype=object if c in ("gene", "chrom", "strand") else
                                       bool if c == "target" else np.int64) for c in TSS_CCRES_COLUMNS})
    if cfg.target_ccres or not cfg.genes or tss is None or vocab is None:
        return empty
    vocab = vocab.assign(chrom=normalize_chrom(vocab["chrom"].to_numpy()))
    windows = gene_windows(cfg.genes, cfg.promoter_upstream)
    down = int(cfg.promoter_downstream)
    genes = []
    for gene, win in windows.items():
        t = tss[tss["gene"] == gene]
        if t.empty:
            continue
        strand = str(t["strand"].iloc[0])
        pos = t["tss"].to_numpy(dtype=np.int64)
        if strand == "-":
            ref, lo, hi = int(pos.max()), int(pos.min()) - down + 1, int(pos.max()) + win + 1
        else:
            ref, lo, hi = int(pos.min()), int(pos.min()) - win, int(pos.max()) + down
        genes.append({"gene": gene, "chrom": str(t["chrom"].iloc[0]), "tss": ref, "strand": strand,
                      "window": win, "downstream": down, "lo": max(lo - flank, 0), "hi": hi + flank})
    if not genes:
        return empty
    g = pd.DataFrame(genes)
    ia, ib = overlap_pairs(g["chrom"].to_numpy(), g["lo"].to_numpy(), g["hi"].to_numpy(),
                           vocab["chrom"].to_numpy(), vocab["start"].to_numpy(), vocab["end"].to_numpy())
    out = g.iloc[ia].drop(columns=["lo", "hi"]).reset_index(drop=True)
    out["ccre"] = ib
    out["start"] = vocab["start"].to_numpy(dtype=np.int64)[ib]
    out["end"] = vocab["end"].to_numpy(dtype=np.int64)[ib]
    minus = out["strand"].to_numpy() == "-"
    ref = out["tss"].to_numpy(dtype=np.int64)
    out["rel_start"] = np.where(minus, ref + 1 - out["end"], out["start"] - ref)
    out["rel_end"] = np.where(minus, ref + 1 - out["start"], out["end"] - ref)
    chosen = set()
    if targets is not None and "gene" in targets:
        chosen = set(zip(targets["gene"].astype(str), targets["ccre"].astype(np.int64)))
    out["target"] = [(gn, int(c)) in chosen for gn, c in zip(out["gene"], out["ccre"])]
    order = {gn: i for i, gn in enumerate(windows)}
    out = out.assign(_o=out["gene"].map(order)).sort_values(["_o", "rel_start"], kind="stable")
    return out[TSS_CCRES_COLUMNS].reset_index(drop=True)


def shift_table(tab: pd.DataFrame, xy: np.ndarray, query_knn: np.ndarray, query_scores: np.ndarray) -> pd.DataFrame:
    """Per target (rows of ``tab``, the Group last) and query cell: the position (mean UMAP coordinates
    ``xy`` of its nearest reference cells ``query_knn[i, 0 | 1, q]``) and the mean score of those cells
    with the target added (``*_added``) and removed (``*_removed``). ``knockout``: the target's name (a
    cCRE ``GENE:ccre``, a gene, ``Group``); ``n_ccres``: how many cCREs it removes."""
    parts = []
    for i, (_, row) in enumerate(tab.iterrows()):
        added, removed = xy[query_knn[i, 0]].mean(1), xy[query_knn[i, 1]].mean(1)
        n = added.shape[0]
        parts.append(pd.DataFrame({
            "knockout": target_name(row), "gene": row["gene"] if "gene" in tab else "",
            "ccre": int(row["ccre"]), "n_ccres": int(row["n_ccres"]) if "n_ccres" in tab else 1,
            "query": np.arange(n),
            "umap1_added": added[:, 0], "umap2_added": added[:, 1],
            "umap1_removed": removed[:, 0], "umap2_removed": removed[:, 1],
            "score_added": query_scores[i, 0], "score_removed": query_scores[i, 1]}))
    cols = ["knockout", "gene", "ccre", "n_ccres", "query", "umap1_added", "umap2_added", "umap1_removed", "umap2_removed",
            "score_added", "score_removed"]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)


# ----------------------------------------------------------------------------- chimeras
def chimeric_cells(xa, xb, pairs_a, pairs_b, scores, rng) -> sp.csr_matrix:
    """Binary chimeras: row r takes each cCRE of ``xb[pairs_b[r]]`` w.p. ``scores[r]`` and each of
    ``xa[pairs_a[r]]`` w.p. ``1 - scores[r]`` (union)."""
    scores = np.asarray(scores, dtype=np.float64)
    parts = []
    for x, rows, p in ((xa, pairs_a, 1.0 - scores), (xb, pairs_b, scores)):
        sub = binarize(x[np.asarray(rows)]).tocoo()  # the chosen rows only, not the whole matrix
        keep = rng.random(sub.nnz) < p[sub.row]
        parts.append(sp.csr_matrix((np.ones(int(keep.sum()), np.float32), (sub.row[keep], sub.col[keep])),
                                   shape=(len(scores), x.shape[1])))
    return binarize(parts[0] + parts[1])


def set_column(x: sp.csr_matrix, j, value: bool) -> sp.csr_matrix:
    """Copy of binary ``x`` with column ``j`` (an index, or several) set to 1 (``value``) or 0 in every row."""
    x = sp.csr_matrix(x, copy=True).tolil()
    x[:, np.atleast_1d(np.asarray(j, dtype=np.int64))] = 1.0 if value else 0.0
    return binarize(x.tocsr())


def knn_score(ref_emb, ref_scores, emb, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Mean reference score of the ``k`` nearest reference cells, and their indices."""
    from sklearn.neighbors import NearestNeighbors

    k = int(min(k, len(ref_scores)))
    _, idx = NearestNeighbors(n_neighbors=k).fit(ref_emb).kneighbors(emb)
    return np.asarray(ref_scores)[idx].mean(1), idx


# ----------------------------------------------------------------------------- core
def _no_gene_error() -> ConfigError:
    """The gene unit with targets that have no gene (cCRE indices): one message for every place that
    finds it (:func:`knockout_targets`, :func:`knockout_sets`)."""
    return ConfigError("target_unit gene knocks out the promoter cCREs of each gene together, but the targets are "
                       "cCRE indices (target_ccres), which have no gene", field="target_unit",
                       fix="give --genes with --tss, or use --target-unit ccre with --target-ccres")


def knockout_sets(targets: pd.DataFrame, unit: str = "ccre", *, group: bool = False
                  ) -> tuple[list[np.ndarray], pd.DataFrame]:
    """The cCRE sets that are knocked out, and one row per set describing it.

    ``targets``: DataFrame with a ``ccre`` column (vocabulary index) and optionally ``gene`` (+ ``chrom,
    start, end`` ...), one row per target cCRE (:func:`knockout_targets`). ``unit``: ``ccre`` = each row
    on its own; ``gene`` = all cCREs of a gene at once (one set per gene, genes in their order of first
    appearance; needs the ``gene`` column). ``group``: one more set, every target cCRE (the paper's
    "Group" knockout). The rows: ``knockout`` (the name: ``GENE:ccre`` / the cCRE index for a cCRE,
    the gene for a gene, ``Group``), the other columns of ``targets`` (for a gene: ``chrom`` of its
    first cCRE, ``start`` / ``end`` spanning its cCREs), ``ccre`` (the index; -1 for a gene or the
    Group), ``ccres`` (the set's indices, comma list) and ``n_ccres``."""
    if unit not in ("ccre", "gene"):
        raise ConfigError(f"unknown knockout unit {unit!r}", field="target_unit", fix="use ccre or gene")
    targets = targets.reset_index(drop=True)
    tgt = targets["ccre"].to_numpy(dtype=np.int64)
    extra = targets.drop(columns=["ccre"])
    if unit == "gene":
        if "gene" not in targets or targets["gene"].isna().any():
            raise _no_gene_error()
        genes = list(dict.fromkeys(targets["gene"].astype(str)))
        sets = [np.unique(tgt[targets["gene"].astype(str).to_numpy() == g]) for g in genes]
        rows = []
        for g in genes:
            part = extra[extra["gene"].astype(str) == g]
            row = {c: part[c].iloc[0] for c in extra.columns}
            if "start" in part:
                row["start"] = part["start"].min()
            if "end" in part:
                row["end"] = part["end"].max()
            rows.append(row)
        info = pd.DataFrame(rows, columns=list(extra.columns))
        info["gene"] = genes
        info["ccre"] = -1
    else:
        sets = [np.array([j]) for j in tgt]
        info = extra.assign(ccre=tgt)
    if group and len(tgt):
        sets.append(np.unique(tgt))
        info = pd.concat([info, pd.DataFrame([{"gene": "Group", "ccre": -1} if "gene" in extra else {"ccre": -1}])],
                         ignore_index=True)
    info["ccre"] = info["ccre"].astype(np.int64)
    for c in ("start", "end"):  # the Group has no position: keep the others integers
        if c in info and pd.api.types.is_numeric_dtype(info[c]):
            info[c] = info[c].astype("Int64")
    info["ccres"] = [",".join(str(int(j)) for j in js) for js in sets]
    info["n_ccres"] = [len(js) for js in sets]
    info.insert(0, "knockout", [target_name(r) for _, r in info.iterrows()])
    return sets, info


def knockout_effects(embed_fn, xa, xb, targets: pd.DataFrame, *, n_reference: int = 1000, n_query: int = 50,
                     n_random: int = 50, k: int = 20, alternative: str = "less", seed: int = 0,
                     emb_a=None, emb_b=None, random_pool=None, group: bool = False, unit: str = "ccre") -> dict:
    """The knockout analysis on binary/count matrices of the two states (cells x cCREs).

    ``embed_fn(csr) -> embeddings`` embeds cells given as a count matrix. ``targets``: DataFrame with a
    ``ccre`` column (vocabulary index) and optionally ``gene``; ``unit`` and ``group`` make the knocked
    out sets from them (:func:`knockout_sets`: each cCRE, or all cCREs of a gene at once; ``group``: all
    target cCREs at once, the paper's "Group" row with ``ccre`` -1). ``emb_a`` / ``emb_b``: embeddings of
    the state cells for OT pairing (computed with ``embed_fn`` when absent).

    **Random control, size-matched**: ``n_random`` random single cCREs are always knocked out (the SPEC's
    control; ``random_effects``); for every other set size ``m`` among the targets (a gene's promoter
    cCREs, the Group) ``n_random`` random sets of ``m`` cCREs each are knocked out at once. A target of
    ``m`` cCREs is compared (one-sided Welch t-test on the per-query-cell effects) with the pooled random
    knockouts of its own size, so a gene of three cCREs is tested against random triples, not single
    cCREs. ``random_pool``: the cCREs the random ones are drawn from (default: cCREs accessible in some
    cell of either state).

    Returns a dict with ``table`` (per target: :func:`knockout_sets` columns, ``mean_effect``,
    ``sd_effect``, ``score_added``, ``score_removed``, ``random_mean_effect`` of its size-matched random
    knockouts, ``t``, ``p_value``), ``random`` (per random knockout: ``ccre`` (-1 for a set), ``ccres``,
    ``n_ccres``, ``mean_effect``), ``random_effects`` (per-cell effects of the random single cCREs),
    ``random_effects_by_size`` (set size -> pooled per-cell effects), ``reference_scores``,
    ``reference_embedding``, ``query_knn`` (targets, then random single cCREs, then random sets by size x
    added / removed x query cell x neighbour: reference indices), ``query_scores`` (the same without the
    neighbour axis: mean neighbour score), ``n_targets`` and ``score_r`` (leave-one-out kNN score
    prediction on the reference).
    """
    from scipy.stats import pearsonr, ttest_ind

    from .integration import ot_match

    sets, info = knockout_sets(targets, unit, group=group)
    rng = np.random.default_rng(seed)
    xa, xb = binarize(xa), binarize(xb)
    if xa.shape[0] < 1 or xb.shape[0] < 1:
        raise EpiflowError("both states need cells", field="states")
    if emb_a is None:
        emb_a = embed_fn(xa)
    if emb_b is None:
        emb_b = embed_fn(xb)
    part_a, _, _, _ = ot_match(emb_a, emb_b, seed=seed)
    # reference chimeras
    ra = rng.integers(0, xa.shape[0], n_reference)
    ref_scores = rng.random(n_reference)
    ref = chimeric_cells(xa, xb, ra, part_a[ra], ref_scores, rng)
    ref_emb = embed_fn(ref)
    # leave-one-out check that the embedding carries the score
    loo, _ = knn_score(ref_emb, ref_scores, ref_emb, k + 1)
    loo = (loo * (k + 1) - ref_scores) / k
    score_r = float(pearsonr(loo, ref_scores)[0]) if np.std(loo) > 0 else float("nan")
    # query chimeras at 0.5
    qa = rng.integers(0, xa.shape[0], n_query)
    q = chimeric_cells(xa, xb, qa, part_a[qa], np.full(n_query, 0.5), rng)
    if random_pool is None:
        random_pool = np.flatnonzero(np.asarray((xa.sum(0) + xb.sum(0))).ravel() > 0)
    random_pool = np.asarray(random_pool, dtype=np.int64)
    n_r = min(n_random, len(random_pool))
    rand = rng.choice(random_pool, size=n_r, replace=False)
    n_sets = len(sets)
    rand_sets = [np.array([j]) for j in rand]
    # size-matched random sets for the targets of more than one cCRE (drawn after the single ones, so
    # those stay the same draws)
    for m in sorted({len(js) for js in sets} - {1}):
        rand_sets += [np.sort(rng.choice(random_pool, size=min(m, len(random_pool)), replace=False))
                      for _ in range(n_r)]
    sizes = np.array([len(js) for js in rand_sets], dtype=np.int64)
    sets = sets + rand_sets
    # all variants in one matrix: for each set (a cCRE, a gene's cCREs, the group, a random set), the query
    # with it added, then removed
    mats = []
    for js in sets:
        mats += [set_column(q, js, True), set_column(q, js, False)]
    emb = embed_fn(sp.vstack(mats, format="csr"))
    sc_, idx = knn_score(ref_emb, ref_scores, emb, k)
    sc_ = sc_.reshape(len(sets), 2, n_query)
    eff = sc_[:, 1] - sc_[:, 0]  # removed - added, per query cell
    reff = eff[n_sets:]
    by_size = {int(m): reff[sizes == m].ravel() for m in np.unique(sizes)}
    rows = []
    for i in range(n_sets):
        e = eff[i]
        pool = by_size.get(len(sets[i]), by_size.get(int(min(len(sets[i]), len(random_pool))), np.array([])))
        t, p = ttest_ind(e, pool, equal_var=False, alternative=alternative) if len(pool) > 1 else (np.nan, np.nan)
        rows.append({"mean_effect": float(e.mean()), "sd_effect": float(e.std(ddof=1)) if n_query > 1 else 0.0,
                     "score_added": float(sc_[i, 0].mean()), "score_removed": float(sc_[i, 1].mean()),
                     "random_mean_effect": float(pool.mean()) if len(pool) else float("nan"),
                     "t": float(t), "p_value": float(p)})
    table = pd.concat([info, pd.DataFrame(rows)], axis=1) if n_sets else pd.DataFrame(rows)
    rtab = pd.DataFrame({"ccre": [int(js[0]) if len(js) == 1 else -1 for js in rand_sets],
                         "ccres": [",".join(str(int(j)) for j in js) for js in rand_sets], "n_ccres": sizes,
                         "mean_effect": reff.mean(1)})
    return {"table": table, "random": rtab, "random_effects": by_size.get(1, np.array([])),
            "random_effects_by_size": by_size, "reference_scores": ref_scores,
            "reference_embedding": ref_emb, "query_knn": idx.reshape(len(sets), 2, n_query, -1),
            "query_scores": sc_, "n_targets": n_sets, "score_r": score_r}


# ----------------------------------------------------------------------------- pipeline
def target_name(row) -> str:
    """The name of a knockout target row: its ``knockout`` column when it has one, else ``GENE:ccre`` /
    the cCRE index for a single cCRE, the gene for a gene's cCREs together (``ccre`` -1), or ``Group``."""
    get = row.get if hasattr(row, "get") else (lambda key, default=None: default)
    name = get("knockout")
    if isinstance(name, str) and name:
        return name
    gene = get("gene")
    gene = gene if isinstance(gene, str) and gene else ""
    if int(row["ccre"]) < 0:
        return gene or "Group"
    return f"{gene}:{int(row['ccre'])}" if gene else str(int(row["ccre"]))


def target_label(name, n_ccres=1) -> str:
    """A figure label: the knockout's name, with its number of cCREs when it removes several
    (``VEGFA (3 cCREs)``)."""
    try:
        n = int(n_ccres)
    except (TypeError, ValueError):
        n = 1
    return f"{name} ({n} cCREs)" if n > 1 else str(name)


def gene_windows(genes, upstream: int) -> dict[str, int]:
    """Gene -> upstream window (bp) from ``GENE`` (``upstream``) or ``GENE:BP`` entries (the paper:
    ABCC1 and VEGFA at 2,000 bp, ``EGLN3:5000``)."""
    out: dict[str, int] = {}
    for g in genes:
        name, _, bp = str(g).partition(":")
        try:
            win = int(bp) if bp else int(upstream)
        except ValueError:
            win = -1
        if not name or win < 0:
            raise ConfigError(f"genes entry {g!r} is not GENE or GENE:BP", field="genes",
                              fix="e.g. VEGFA or EGLN3:5000 (an upstream window in bp, >= 0)")
        out[name] = win
    return out


def knockout_targets(cfg: KnockoutConfig, *, tss: pd.DataFrame | None = None,
                     vocab: pd.DataFrame | None = None) -> pd.DataFrame:
    """The target cCREs of the settings, one row per cCRE (``cfg.target_unit`` groups them later, in
    :func:`knockout_sets`): ``cfg.target_ccres`` (vocabulary indices; column ``ccre``; an error with the
    ``gene`` unit), else the
    promoter cCREs of ``cfg.genes`` (``gene, ccre, chrom, start, end``; :func:`promoter_ccres` with the
    ``cfg.promoter_upstream`` / ``cfg.promoter_downstream`` window, or a gene's own upstream window written
    ``GENE:BP``) from ``tss`` (:func:`read_tss`) and the cCRE vocabulary ``vocab`` (``chrom, start, end`` in
    token order: the corpus ``vocab.bed``)."""
    if cfg.target_ccres:
        if cfg.target_unit == "gene":
            raise _no_gene_error()
        return pd.DataFrame({"ccre": np.asarray(list(cfg.target_ccres), dtype=np.int64)})
    if not cfg.genes or tss is None:
        raise EpiflowError("give targets: --target-ccres, or --genes with --tss", field="targets")
    if vocab is None:
        raise EpiflowError("promoter targets need the cCRE vocabulary", field="vocab",
                           fix="pass --vocab <corpus>/vocab.bed")
    from ..genome.intervals import normalize_chrom

    vocab = vocab.assign(chrom=normalize_chrom(vocab["chrom"].to_numpy()))
    windows = gene_windows(cfg.genes, cfg.promoter_upstream)
    parts = [promoter_ccres(tss, vocab, [g for g, w in windows.items() if w == win], upstream=win,
                            downstream=cfg.promoter_downstream) for win in sorted(set(windows.values()))]
    order = {g: i for i, g in enumerate(windows)}
    targets = pd.concat(parts, ignore_index=True)
    targets = targets.sort_values("gene", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)
    if targets.empty:
        raise EpiflowError(f"no cCRE of the vocabulary lies in the promoters of {list(cfg.genes)}", field="genes",
                           fix="check the genome build of --tss and the gene names")
    return targets


def run(cells, model, cfg: KnockoutConfig, targets, *, df: np.ndarray | None = None,
        dataset: str | None = None, neighbourhood: pd.DataFrame | None = None) -> TaskResult:
    """Knockout analysis (module docstring) of the ``cells`` of states ``cfg.state_a`` / ``cfg.state_b``
    (a Shard, :func:`epiflow.tasks.common.load_cells`) with ``model`` (fine-tuned **in place** for
    ``cfg.max_steps`` steps when > 0). ``targets``: a DataFrame with ``ccre`` [+ ``gene`` ...]
    (:func:`knockout_targets`) or a list of vocabulary indices; ``cfg.target_unit`` knocks out each cCRE,
    or each gene's cCREs together (:func:`knockout_sets`). ``df``: the document frequencies of the
    model's corpus, used to tokenize the chimeric cells (None: the fraction of the cells in which each
    cCRE is accessible). ``dataset``: the name of the metrics rows (default: the first cell's dataset,
    else ``all``). ``neighbourhood``: the cCREs around the target genes' TSS (:func:`tss_neighbourhood`);
    the fraction of accessible cells of each state is added to them.

    Returns a :class:`~epiflow.tasks.common.TaskResult`: ``metrics`` (task ``knockout``), ``tables``
    ``knockout`` (per target: a cCRE, a gene or the Group; name in ``knockout``, its cCREs in ``ccres``,
    ``n_ccres``; the mean effect of its size-matched random knockouts in ``random_mean_effect``), ``random``
    (per random knockout: a single cCRE, or a random set of as many cCREs as a target), ``reference_cells`` (``cell, score, umap1,
    umap2``: the chimeric reference cells), ``shifts`` (:func:`shift_table`: per target and query cell,
    position and score with the target added / removed) and ``tss_ccres`` (``neighbourhood`` with
    ``state_a, state_b, fraction_a, fraction_b``; no rows without one); ``models["model"]`` when
    fine-tuned; ``data``: what :func:`knockout_effects` returns besides the tables (``random_effects``,
    ``random_effects_by_size``, ``reference_scores``, ``reference_embedding``, ``query_knn``, ``query_scores``, ``n_targets``,
    ``score_r``), plus ``reference_umap``, ``dataset`` and ``finetune_loss`` (per step).
    """
    from ..corpus.shard import shard_from_counts
    from .integration import embed_cells, finetune_reconstruction

    state_key, state_a, state_b = cfg.state_key, cfg.state_a, cfg.state_b
    states = np.asarray(obs_column(cells, state_key, "state")).astype(str)
    ia, ib = np.flatnonzero(states == state_a), np.flatnonzero(states == state_b)
    if len(ia) == 0 or len(ib) == 0:
        raise EpiflowError(f"need cells of both states '{state_a}' and '{state_b}' in obs['{state_key}'] "
                           f"(have: {sorted(set(states))})", field=f"obs/{state_key}",
                           fix="pass --state-key / --state-a / --state-b")
    if not isinstance(targets, pd.DataFrame):
        targets = pd.DataFrame({"ccre": np.asarray(list(targets), dtype=np.int64)})
    if (targets["ccre"] < 0).any() or (targets["ccre"] >= cells.n_ccres).any():
        raise EpiflowError(f"target cCRE indices must be in 0..{cells.n_ccres - 1}", field="ccre")
    knockout_sets(targets, cfg.target_unit, group=cfg.group)  # a wrong unit fails before any fine-tuning

    device, progress, seed = cfg.device, cfg.progress, cfg.seed
    hist: list[float] = []
    if cfg.max_steps:
        hist = finetune_reconstruction(model, cells, max_steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                                       max_len=cfg.max_len, seed=seed, device=device, progress=progress,
                                       desc="fine-tune")
    if df is None:
        # TF-IDF of modified cells uses the document frequency: recover it from the cells when the
        # corpus df is not given
        x = binarize(cells.counts_csr())
        df = np.maximum(np.asarray(x.mean(0)).ravel(), 1.0 / cells.n_cells)

    def embed_fn(x):
        sh = shard_from_counts(x, df, pd.DataFrame(index=range(x.shape[0])))
        return embed_cells(model, sh, device=device, progress=False)

    counts = cells.counts_csr()
    all_emb = embed_cells(model, cells, device=device, progress=progress)
    res = knockout_effects(embed_fn, counts[ia], counts[ib], targets, n_reference=cfg.n_reference,
                           n_query=cfg.n_query, n_random=cfg.n_random, k=cfg.n_neighbors, alternative=cfg.alternative,
                           seed=seed, emb_a=all_emb[ia], emb_b=all_emb[ib], group=cfg.group,
                           unit=cfg.target_unit)
    ds = dataset or (str(cells.obs["dataset"].iloc[0]) if "dataset" in cells.obs else "all")
    tab = res.pop("table")
    rand = res.pop("random")
    # the tables of Fig. 5b-d: reference UMAP + scores, query shifts, accessibility around the TSS
    xy = np.asarray(umap_coords(res["reference_embedding"], seed=seed), dtype=np.float64)  # 15-NN graph
    ref_tab = pd.DataFrame({"cell": np.arange(len(xy)), "score": res["reference_scores"], "umap1": xy[:, 0],
                            "umap2": xy[:, 1]})
    shifts = shift_table(tab, xy, res["query_knn"][:res["n_targets"]], res["query_scores"][:res["n_targets"]])
    near = tss_neighbourhood(cfg, None, None) if neighbourhood is None else neighbourhood.reset_index(drop=True)
    ccre = near["ccre"].to_numpy(dtype=np.int64)
    if len(ccre) and (ccre.min() < 0 or ccre.max() >= cells.n_ccres):
        raise EpiflowError(f"cCREs around the TSS must be vocabulary indices 0..{cells.n_ccres - 1}", field="ccre",
                           fix="build the neighbourhood from the corpus vocab.bed")
    near = near.assign(state_a=state_a, state_b=state_b,
                       fraction_a=np.asarray(binarize(counts[ia]).mean(0)).ravel()[ccre],
                       fraction_b=np.asarray(binarize(counts[ib]).mean(0)).ravel()[ccre])
    rows = metric_rows(TASK, ds, "EpiAgent", {
        "n_targets": len(tab), "n_random": int((rand["n_ccres"] == 1).sum()), "n_query": cfg.n_query, "n_reference": cfg.n_reference,
        "reference_score_r": res["score_r"], "random_mean_effect": float(np.mean(res["random_effects"])),
        "n_significant": int((tab["p_value"] < 0.05).sum()), "finetune_steps": len(hist)})
    for _, r in tab.iterrows():
        name = target_name(r)
        rows += metric_rows(TASK, ds, "EpiAgent", {f"mean_effect[{name}]": r["mean_effect"],
                                                   f"p_value[{name}]": r["p_value"]})
    return TaskResult(metrics=metrics_frame(rows), tables={"knockout": tab, "random": rand,
                                                          "reference_cells": ref_tab, "shifts": shifts,
                                                          "tss_ccres": near},
                      models={"model": model} if hist else {},
                      data={**res, "reference_umap": xy, "dataset": ds, "finetune_loss": hist})
