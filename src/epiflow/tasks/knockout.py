"""In-silico cCRE knockout between two cell states (SPEC §5; normal vs cancer in the paper).

1. Optionally fine-tune the model as in feature extraction (SR + CCA, K = 1) on the cells of both states.
2. **OT pairs**: every cell of state A (``normal``) is matched to a cell of state B (``cancer``) by
   exact EMD on the cosine distance of the embeddings (:func:`epiflow.tasks.integration.ot_match`).
3. **Chimeric reference cells**: for a random pair and a *cancerization score* ``s ~ U[0, 1]``, each
   accessible cCRE of the B cell is taken with probability ``s`` and each of the A cell with
   probability ``1 - s`` (union, binary counts), so ``s`` is the expected fraction coming from B.
4. **Query cells**: chimeras at ``s = 0.5``; for every target cCRE one copy with the cCRE **added**
   (set accessible) and one with it **removed**.
5. **Effect** of a knockout on a query cell = mean score of its ``k = 20`` nearest reference cells
   (Euclidean, embeddings) with the cCRE removed minus with it added. The same is done for random
   cCREs; per target a one-sided Welch t-test compares its per-cell effects with the pooled random
   effects (default ``alternative="less"``: the knockout lowers the score more than a random one).
6. Figures: the reference UMAP coloured by score with one arrow per target (mean position of its
   query cells with the cCRE added -> removed; query positions are the mean UMAP coordinates of
   their 20 nearest reference cells), and a bar chart of the mean effects with the random control.

Targets come from gene promoters: :func:`promoter_ccres` intersects TSS upstream windows (from
``hg19_tss.bed.gz`` / ``hg38_tss.bed.gz`` BED6 or any GTF) with the cCRE vocabulary.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import EpiflowError, InputFormatError
from ..io import atomic_path
from ..metrics.table import metric_rows, metrics_frame, write_metrics
from .common import load_cells, load_model
from .zeroshot import obs_column

log = logging.getLogger(__name__)

TASK = "knockout"


# ----------------------------------------------------------------------------- targets
def read_tss(path) -> pd.DataFrame:
    """TSS table ``chrom, tss, strand, gene`` from a BED6 (``chrom, tss, tss+1, gene, ., strand``) or a
    GTF (``gene`` records, else ``transcript``; TSS = start on +, end on -; ``gene_name`` attribute)."""
    from ..genome.bed import read_bed
    from ..genome.intervals import normalize_chrom

    path = Path(path)
    name = path.name.lower()
    if name.endswith((".gtf", ".gtf.gz")):
        op = gzip.open if name.endswith(".gz") else open
        with op(path, "rt") as fh:
            g = pd.read_csv(fh, sep="\t", comment="#", header=None, usecols=[0, 2, 3, 4, 6, 8],
                            names=["chrom", "feature", "start", "end", "strand", "attr"], dtype=str)
        feat = "gene" if (g["feature"] == "gene").any() else "transcript"
        g = g[g["feature"] == feat]
        if g.empty:
            raise InputFormatError("no gene or transcript records in the GTF", path=str(path), field="feature")
        gene = g["attr"].str.extract(r'gene_name "([^"]+)"')[0].fillna(g["attr"].str.extract(r'gene_id "([^"]+)"')[0])
        start = g["start"].astype(np.int64) - 1  # GTF is 1-based
        end = g["end"].astype(np.int64)
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


# ----------------------------------------------------------------------------- chimeras
def _binary(x) -> sp.csr_matrix:
    x = sp.csr_matrix(x, dtype=np.float32, copy=True)
    x.data[:] = 1.0
    x.eliminate_zeros()
    return x


def chimeric_cells(xa, xb, pairs_a, pairs_b, scores, rng) -> sp.csr_matrix:
    """Binary chimeras: row r takes each cCRE of ``xb[pairs_b[r]]`` w.p. ``scores[r]`` and each of
    ``xa[pairs_a[r]]`` w.p. ``1 - scores[r]`` (union)."""
    scores = np.asarray(scores, dtype=np.float64)
    parts = []
    for x, rows, p in ((xa, pairs_a, 1.0 - scores), (xb, pairs_b, scores)):
        sub = _binary(x)[np.asarray(rows)].tocoo()
        keep = rng.random(sub.nnz) < p[sub.row]
        parts.append(sp.csr_matrix((np.ones(int(keep.sum()), np.float32), (sub.row[keep], sub.col[keep])),
                                   shape=(len(scores), x.shape[1])))
    return _binary(parts[0] + parts[1])


def set_column(x: sp.csr_matrix, j: int, value: bool) -> sp.csr_matrix:
    """Copy of binary ``x`` with column ``j`` set to 1 (``value``) or 0 in every row."""
    x = sp.csr_matrix(x, copy=True).tolil()
    x[:, j] = 1.0 if value else 0.0
    return _binary(x.tocsr())


def knn_score(ref_emb, ref_scores, emb, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Mean reference score of the ``k`` nearest reference cells, and their indices."""
    from sklearn.neighbors import NearestNeighbors

    k = int(min(k, len(ref_scores)))
    _, idx = NearestNeighbors(n_neighbors=k).fit(ref_emb).kneighbors(emb)
    return np.asarray(ref_scores)[idx].mean(1), idx


# ----------------------------------------------------------------------------- core
def knockout_effects(embed_fn, xa, xb, targets: pd.DataFrame, *, n_reference: int = 1000, n_query: int = 50,
                     n_random: int = 50, k: int = 20, alternative: str = "less", seed: int = 0,
                     emb_a=None, emb_b=None, random_pool=None) -> dict:
    """The knockout analysis on binary/count matrices of the two states (cells x cCREs).

    ``embed_fn(csr) -> embeddings`` embeds cells given as a count matrix. ``targets``: DataFrame with a
    ``ccre`` column (vocabulary index) and optionally ``gene``. ``emb_a`` / ``emb_b``: embeddings of the
    state cells for OT pairing (computed with ``embed_fn`` when absent). ``random_pool``: cCRE indices
    to draw the random knockouts from (default: cCREs accessible in some cell of either state).
    Returns a dict with ``table`` (per target), ``random`` (per random cCRE), ``reference`` (scores,
    embeddings), ``query`` arrays and ``score_r`` (leave-one-out kNN score prediction on the reference).
    """
    from scipy.stats import pearsonr, ttest_ind

    from .integration import ot_match

    rng = np.random.default_rng(seed)
    xa, xb = _binary(xa), _binary(xb)
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
    rand = rng.choice(random_pool, size=min(n_random, len(random_pool)), replace=False)
    tgt = targets["ccre"].to_numpy(dtype=np.int64)
    all_ccres = np.concatenate([tgt, rand])
    # all variants in one matrix: for each cCRE, the query with it added, then removed
    mats = []
    for j in all_ccres:
        mats += [set_column(q, int(j), True), set_column(q, int(j), False)]
    emb = embed_fn(sp.vstack(mats, format="csr"))
    sc_, idx = knn_score(ref_emb, ref_scores, emb, k)
    sc_ = sc_.reshape(len(all_ccres), 2, n_query)
    eff = sc_[:, 1] - sc_[:, 0]  # removed - added, per query cell
    rand_eff = eff[len(tgt):].ravel()
    rows = []
    for i, j in enumerate(tgt):
        e = eff[i]
        t, p = ttest_ind(e, rand_eff, equal_var=False, alternative=alternative) if len(rand_eff) > 1 else (np.nan,
                                                                                                            np.nan)
        rows.append({"ccre": int(j), "mean_effect": float(e.mean()), "sd_effect": float(e.std(ddof=1)) if n_query > 1
                     else 0.0, "score_added": float(sc_[i, 0].mean()), "score_removed": float(sc_[i, 1].mean()),
                     "t": float(t), "p_value": float(p)})
    table = pd.DataFrame(rows)
    if len(table):
        extra = targets.reset_index(drop=True).drop(columns=["ccre"], errors="ignore")
        table = pd.concat([extra, table], axis=1)
    rtab = pd.DataFrame({"ccre": rand, "mean_effect": eff[len(tgt):].mean(1)})
    return {"table": table, "random": rtab, "random_effects": rand_eff, "reference_scores": ref_scores,
            "reference_embedding": ref_emb, "query_knn": idx.reshape(len(all_ccres), 2, n_query, -1),
            "n_targets": len(tgt), "score_r": score_r}


# ----------------------------------------------------------------------------- figures
def knockout_figures(res: dict, out: Path, *, title: str = "", seed: int = 0) -> None:
    import anndata as ad
    import scanpy as sc

    from ..metrics import knn_graph
    from ..plots import save_figure
    from ..plots.embedding import _figure

    ref_emb = res["reference_embedding"]
    a = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(len(ref_emb))]))
    a.obsm["X_e"] = np.asarray(ref_emb, dtype=np.float32)
    knn_graph(a, use_rep="X_e", n_neighbors=15, seed=seed)
    sc.tl.umap(a, random_state=seed)
    xy = a.obsm["X_umap"]
    tab = res["table"]
    nt = res["n_targets"]
    fig = _figure(6.4, 5.2)
    ax = fig.add_subplot(1, 1, 1)
    pts = ax.scatter(xy[:, 0], xy[:, 1], c=res["reference_scores"], cmap="coolwarm", s=6, linewidths=0,
                     rasterized=True)
    fig.colorbar(pts, ax=ax, label="cancerization score")
    knn = res["query_knn"]
    for i in range(nt):
        start = xy[knn[i, 0]].mean(1).mean(0)  # added
        end = xy[knn[i, 1]].mean(1).mean(0)    # removed
        ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", lw=1.5, color="black"))
        lab = str(tab["gene"].iloc[i]) if "gene" in tab else str(tab["ccre"].iloc[i])
        ax.text(start[0], start[1], lab, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP1")
    ax.set_ylabel("UMAP2")
    ax.set_title(title or "in-silico knockout: query cells, cCRE added -> removed", fontsize=9)
    save_figure(fig, out / "knockout_umap.png")

    fig = _figure(1.5 + 0.45 * (nt + 1), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    names = [(f"{g}:{c}" if "gene" in tab else str(c)) for g, c in
             zip(tab["gene"] if "gene" in tab else tab["ccre"], tab["ccre"])] + ["random"]
    means = list(tab["mean_effect"]) + [float(np.mean(res["random_effects"]))]
    sds = list(tab["sd_effect"]) + [float(np.std(res["random_effects"]))]
    cols = ["#c0392b" if p < 0.05 else "#7f8c8d" for p in tab["p_value"]] + ["#bdc3c7"]
    ax.bar(range(len(means)), means, yerr=sds, color=cols, capsize=2)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(means)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("change of mean score (removed - added)")
    ax.set_title("knockout effects (red: p < 0.05 vs random)", fontsize=9)
    save_figure(fig, out / "knockout_effects.png")


# ----------------------------------------------------------------------------- pipeline
def run_knockout(checkpoint, cells, *, out_dir, state_key: str = "state", state_a: str = "normal",
                 state_b: str = "cancer", genes=None, tss=None, targets=None, vocab=None, upstream: int = 2000,
                 downstream: int = 500, num_heads: int | None = None, finetune_steps: int = 0,
                 batch_size: int = 16, lr: float = 1e-4, n_reference: int = 1000, n_query: int = 50,
                 n_random: int = 50, k: int = 20, alternative: str = "less", seed: int = 0, device=None,
                 dataset: str | None = None, figures: bool = True, progress: bool = True) -> dict:
    """Knockout analysis with an EpiAgent checkpoint (module docstring). Targets: ``targets`` (DataFrame
    with ``ccre`` [+ ``gene``], or a list of vocabulary indices), or ``genes`` with a ``tss`` file
    (BED6 / GTF) and the corpus ``vocab`` (BED3 path or DataFrame). Writes ``knockout.tsv``,
    ``random.tsv``, ``knockout_umap.png``, ``knockout_effects.png`` and ``metrics.tsv``."""
    from ..corpus.shard import shard_from_counts
    from .integration import embed_cells, finetune_reconstruction

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src_path = cells if isinstance(cells, (str, Path)) else None
    cells = load_cells(cells)
    states = np.asarray(obs_column(cells, state_key, "state")).astype(str)
    ia, ib = np.flatnonzero(states == state_a), np.flatnonzero(states == state_b)
    if len(ia) == 0 or len(ib) == 0:
        raise EpiflowError(f"need cells of both states '{state_a}' and '{state_b}' in obs['{state_key}'] "
                           f"(have: {sorted(set(states))})", field=f"obs/{state_key}",
                           fix="pass --state-key / --state-a / --state-b")
    if targets is None:
        if genes is None or tss is None:
            raise EpiflowError("give targets: --ccres, or --genes with --tss", field="targets")
        if vocab is None and src_path is not None and (Path(src_path) / "vocab.bed").exists():
            vocab = Path(src_path) / "vocab.bed"
        if vocab is None:
            raise EpiflowError("promoter targets need the cCRE vocabulary", field="vocab",
                               fix="pass --vocab <corpus>/vocab.bed")
        if not isinstance(vocab, pd.DataFrame):
            from ..genome.bed import read_bed

            vocab = read_bed(vocab)
        from ..genome.intervals import normalize_chrom

        vocab = vocab.assign(chrom=normalize_chrom(vocab["chrom"].to_numpy()))
        targets = promoter_ccres(read_tss(tss), vocab, genes, upstream=upstream, downstream=downstream)
        if targets.empty:
            raise EpiflowError(f"no cCRE of the vocabulary lies in the promoters of {list(genes)}", field="genes",
                               fix="check the genome build of --tss and the gene names")
    elif not isinstance(targets, pd.DataFrame):
        targets = pd.DataFrame({"ccre": np.asarray(list(targets), dtype=np.int64)})
    if (targets["ccre"] < 0).any() or (targets["ccre"] >= cells.n_ccres).any():
        raise EpiflowError(f"target cCRE indices must be in 0..{cells.n_ccres - 1}", field="ccre")

    model = load_model(checkpoint, num_heads=num_heads, n_ccres=cells.n_ccres)
    hist = []
    if finetune_steps:
        hist = finetune_reconstruction(model, cells, max_steps=finetune_steps, batch_size=batch_size, lr=lr,
                                       seed=seed, device=device, progress=progress, desc="fine-tune")
    df = None
    # TF-IDF of modified cells uses the corpus document frequency: recover it from the stored cells
    # (tfidf = count-based tf * idf(df)); the corpus df.npy is preferred when the source is a corpus
    if src_path is not None and (Path(src_path) / "df.npy").exists():
        df = np.load(Path(src_path) / "df.npy")
    if df is None:
        x = _binary(cells.counts_csr())
        df = np.maximum(np.asarray(x.mean(0)).ravel(), 1.0 / cells.n_cells)

    def embed_fn(x):
        sh = shard_from_counts(x, df, pd.DataFrame(index=range(x.shape[0])))
        return embed_cells(model, sh, device=device, progress=False)

    counts = cells.counts_csr()
    all_emb = embed_cells(model, cells, device=device, progress=progress)
    res = knockout_effects(embed_fn, counts[ia], counts[ib], targets, n_reference=n_reference, n_query=n_query,
                           n_random=n_random, k=k, alternative=alternative, seed=seed,
                           emb_a=all_emb[ia], emb_b=all_emb[ib])
    ds = dataset or (str(cells.obs["dataset"].iloc[0]) if "dataset" in cells.obs else "all")
    tab = res["table"]
    rows = metric_rows(TASK, ds, "EpiAgent", {
        "n_targets": len(tab), "n_random": len(res["random"]), "n_query": n_query, "n_reference": n_reference,
        "reference_score_r": res["score_r"], "random_mean_effect": float(np.mean(res["random_effects"])),
        "n_significant": int((tab["p_value"] < 0.05).sum()), "finetune_steps": len(hist)})
    for _, r in tab.iterrows():
        name = f"{r['gene']}:{int(r['ccre'])}" if "gene" in tab else str(int(r["ccre"]))
        rows += metric_rows(TASK, ds, "EpiAgent", {f"mean_effect[{name}]": r["mean_effect"],
                                                   f"p_value[{name}]": r["p_value"]})
    with atomic_path(out / "knockout.tsv") as tmp:
        tab.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    with atomic_path(out / "random.tsv") as tmp:
        res["random"].to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    if figures:
        knockout_figures(res, out, title=f"{state_a} -> {state_b}: in-silico knockout on {ds}", seed=seed)
    table = metrics_frame(rows)
    write_metrics(table, out / "metrics.tsv")
    res["metrics"] = table
    return res
