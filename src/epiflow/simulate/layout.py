"""The synthetic genome: genes, cCREs, GO annotations, programs and their effects.

Coordinates live on the real hg38 chromosome lengths (chr1-22, chrX), cut into 2-kb *bins* grouped
into 300-kb *slots*. Every interval of the simulation (true cCRE, inactive source cCRE, dataset
specific peak) sits in its own bin, centred, and is at most 900 bp wide, so any two intervals are
>= 1 kb apart and a fragment drawn inside one bin can overlap at most the intervals of that bin.
Fragments outside cCREs are drawn in bins that hold no interval at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .presets import SimPreset

HG38_LENGTHS = {
    "chr1": 248956422, "chr2": 242193529, "chr3": 198295559, "chr4": 190214555, "chr5": 181538259,
    "chr6": 170805979, "chr7": 159345973, "chr8": 145138636, "chr9": 138394717, "chr10": 133797422,
    "chr11": 135086622, "chr12": 133275309, "chr13": 114364328, "chr14": 107043718,
    "chr15": 101991189, "chr16": 90338345, "chr17": 83257441, "chr18": 80373285, "chr19": 58617616,
    "chr20": 64444167, "chr21": 46709983, "chr22": 50818468, "chrX": 156040895,
}
CHROMS = list(HG38_LENGTHS)
BIN = 2000
SLOT_BINS = 150          # 300 kb
ENH_WINDOW = 25          # enhancers within +-25 bins (50 kb) of the TSS
MAX_WIDTH = 900

# Program sizes, as fractions of the true cCREs.
PROGRAM_FRACTION = {
    "housekeeping": 0.05, "lineage": 0.07, "sublineage": 0.04, "cell_type": 0.04, "state": 0.02,
    "stim_shared": 0.015, "stim_type": 0.008, "stim_close": 0.004, "cancer_open": 0.025,
    "cancer_close": 0.01, "batch": 0.03,
}
# Logit effects: mean, sd (per cCRE).
BASE_LOGIT = (-4.6, 0.8)
EFFECT = {
    "housekeeping": (6.8, 0.5), "lineage": (5.6, 0.8), "sublineage": (5.6, 0.8),
    "cell_type": (5.6, 0.8), "state": (5.0, 0.5), "stim_shared": (4.5, 0.6), "stim_type": (4.5, 0.6),
    "stim_close": (-3.5, 0.5), "cancer_open": (5.0, 0.6), "cancer_close": (-4.0, 0.5),
    "batch": (3.5, 0.5),
}
GC_COEF_MAX = 0.8        # batch technical shift: beta_b * gc_j, beta_b ~ U(-0.8, 0.8)
KO_DIRECT = -5.0         # knockout: logit effect on the gene's own cCREs
KO_NEIGHBOUR = -5.0      # ... times the GO Jaccard similarity on a GO-neighbour's cCREs
GO_NEIGHBOUR_MIN_JACCARD = 0.2
N_GENERIC_GO = 60


def rng_for(seed: int, name: str) -> np.random.Generator:
    """An independent, named random stream: changing one component leaves the others unchanged."""
    import zlib
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def _distinct_offsets(rng, n_rows: int, candidates: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For row r pick k[r] distinct values of ``candidates`` (vectorised via argsort of uniforms)."""
    k = np.minimum(k, len(candidates))
    order = np.argsort(rng.random((n_rows, len(candidates))), axis=1)
    take = np.arange(len(candidates))[None, :] < k[:, None]
    rows = np.repeat(np.arange(n_rows), k)
    vals = candidates[order[take]]
    return rows, vals


@dataclass
class Layout:
    """Genes, cCREs, GO and programs of one simulation (all arrays aligned with the tables)."""

    ccres: pd.DataFrame          # ccre_id chrom start end bin kind gene in_sources base_logit gc
    genes: pd.DataFrame          # gene chrom start end tss strand module family program
    go: pd.DataFrame             # gene_symbol go_id
    sources: pd.DataFrame        # chrom start end name (ccre_sources.bed)
    occupied_bins: np.ndarray    # sorted global bin ids holding an interval
    chrom_bin_offset: np.ndarray  # first global bin of every chromosome
    programs: pd.DataFrame = field(default=None)  # program level node ccre_idx effect
    jaccard: np.ndarray = field(default=None)     # genes x genes GO Jaccard

    @property
    def n_ccres(self) -> int:
        return len(self.ccres)

    def bin_to_pos(self, gbin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global bin id -> (chromosome index, bin start in bp)."""
        ci = np.searchsorted(self.chrom_bin_offset, gbin, side="right") - 1
        return ci, (gbin - self.chrom_bin_offset[ci]) * BIN

    def free_bins(self, rng, n: int, extra_occupied: np.ndarray | None = None) -> np.ndarray:
        """``n`` distinct global bins that hold no interval (nor any of ``extra_occupied``)."""
        occ = self.occupied_bins if extra_occupied is None else np.union1d(self.occupied_bins, extra_occupied)
        total = int(self.chrom_bin_offset[-1])
        out = np.zeros(0, dtype=np.int64)
        while len(out) < n:
            cand = rng.integers(0, total, size=int(1.2 * (n - len(out))) + 16)
            cand = cand[~np.isin(cand, occ)]
            _, first = np.unique(cand, return_index=True)
            cand = cand[np.sort(first)]
            cand = cand[~np.isin(cand, out)]
            out = np.concatenate([out, cand])
        return out[:n]


def _chrom_tables():
    lens = np.array([HG38_LENGTHS[c] for c in CHROMS], dtype=np.int64)
    nbins = lens // BIN
    bin_off = np.r_[0, np.cumsum(nbins)]
    nslots = nbins // SLOT_BINS - 1          # skip the last, partial slot
    slot_off = np.r_[0, np.cumsum(nslots)]
    return lens, bin_off, nslots, slot_off


def build_layout(p: SimPreset, seed: int) -> Layout:
    rng = rng_for(seed, "layout")
    lens, bin_off, nslots, slot_off = _chrom_tables()
    total_slots = int(slot_off[-1])

    # ---- genes: one per slot, TSS near the slot centre -------------------------------------------
    n_enh = np.clip(rng.poisson(3.2, p.n_genes), 0, 10)
    n_gene_linked = p.n_genes + int(n_enh.sum())
    budget = int(p.n_ccres * 0.55)           # at most ~55% of cCREs are gene-linked
    while n_gene_linked > budget and n_enh.sum() > 0:
        i = int(np.argmax(n_enh))
        n_enh[i] -= 1
        n_gene_linked -= 1
    n_distal = p.n_ccres - n_gene_linked
    n_dslots = max(1, int(np.ceil(n_distal / 5)))
    slots = rng.choice(total_slots, size=p.n_genes + n_dslots, replace=False)
    gene_slots = np.sort(slots[: p.n_genes])
    dist_slots = np.sort(slots[p.n_genes:])

    def slot_first_bin(s):
        ci = np.searchsorted(slot_off, s, side="right") - 1
        return ci, bin_off[ci] + (s - slot_off[ci]) * SLOT_BINS

    g_ci, g_first = slot_first_bin(gene_slots)
    tss_bin = g_first + SLOT_BINS // 2 + rng.integers(-10, 11, p.n_genes)
    strand = np.where(rng.random(p.n_genes) < 0.5, "+", "-")
    gene_len = np.exp(rng.uniform(np.log(5_000), np.log(120_000), p.n_genes)).astype(np.int64)

    # promoter cCRE in the TSS bin; enhancers in distinct bins within +-50 kb
    cand = np.r_[np.arange(-ENH_WINDOW, 0), np.arange(1, ENH_WINDOW + 1)]
    e_gene, e_off = _distinct_offsets(rng, p.n_genes, cand, n_enh)
    # distal clusters
    sizes = rng.multinomial(n_distal, np.full(n_dslots, 1.0 / n_dslots))
    d_slot, d_off = _distinct_offsets(rng, n_dslots, np.arange(2, SLOT_BINS - 2), sizes)
    _, d_first = slot_first_bin(dist_slots)

    bins = np.concatenate([tss_bin, tss_bin[e_gene] + e_off, d_first[d_slot] + d_off])
    kind = np.concatenate([np.full(p.n_genes, "promoter"), np.full(len(e_gene), "enhancer"),
                           np.full(len(d_slot), "distal")]).astype(object)
    gene_of = np.concatenate([np.arange(p.n_genes), e_gene, np.full(len(d_slot), -1)])
    assert len(bins) == p.n_ccres and len(np.unique(bins)) == len(bins)

    n = len(bins)
    width = np.exp(rng.uniform(np.log(200), np.log(MAX_WIDTH), n)).astype(np.int64)
    ci = np.searchsorted(bin_off, bins, side="right") - 1
    centre = (bins - bin_off[ci]) * BIN + BIN // 2 + rng.integers(-100, 101, n)
    start = centre - width // 2
    end = start + width
    base = rng.normal(*BASE_LOGIT, n)
    gc = rng.normal(0, 1, n)
    order = np.lexsort((start, ci))
    ccres = pd.DataFrame({
        "chrom": np.asarray(CHROMS)[ci], "start": start, "end": end, "bin": bins, "kind": kind,
        "gene_idx": gene_of, "base_logit": base, "gc": gc,
    }).iloc[order].reset_index(drop=True)
    ccres.insert(0, "ccre_id", [f"cCRE{i + 1:05d}" for i in range(n)])

    # genes table, named in genome order
    tss = (tss_bin - bin_off[g_ci]) * BIN + BIN // 2 + rng.integers(-50, 51, p.n_genes)
    g_order = np.lexsort((tss, g_ci))      # gene_slots already sorted -> identity, kept for safety
    assert np.array_equal(g_order, np.arange(p.n_genes))
    width_g = len(str(p.n_genes))
    names = np.array([f"GENE{i + 1:0{max(4, width_g)}d}" for i in range(p.n_genes)], dtype=object)
    gstart = np.where(strand == "+", tss, tss + 1 - gene_len)
    gend = np.where(strand == "+", tss + gene_len, tss + 1)
    genes = pd.DataFrame({"gene": names, "chrom": np.asarray(CHROMS)[g_ci], "start": gstart, "end": gend,
                          "tss": tss, "strand": strand})
    ccres["gene"] = np.where(ccres["gene_idx"].to_numpy() >= 0,
                             names[np.maximum(ccres["gene_idx"].to_numpy(), 0)], "")

    # ---- GO: modules of co-annotated genes, families of 3 modules, generic terms ------------------
    grng = rng_for(seed, "go")
    n_mod = max(4, p.n_genes // p.module_size)
    module = np.empty(p.n_genes, dtype=np.int64)
    module[grng.permutation(p.n_genes)] = np.arange(p.n_genes) % n_mod
    family = module // 3
    genes["module"] = module
    genes["family"] = family
    terms_per_module = 4
    mod_terms = np.arange(n_mod * terms_per_module).reshape(n_mod, terms_per_module)
    has = grng.random((p.n_genes, terms_per_module)) < 0.6
    has[np.arange(p.n_genes), grng.integers(0, terms_per_module, p.n_genes)] = True
    g_idx, t_idx = np.nonzero(has)
    pairs = [np.c_[g_idx, mod_terms[module[g_idx], t_idx]]]
    fam_base = n_mod * terms_per_module
    fam_has = np.flatnonzero(grng.random(p.n_genes) < 0.4)
    pairs.append(np.c_[fam_has, fam_base + family[fam_has]])
    gen_base = fam_base + int(family.max()) + 1
    n_gen = grng.poisson(0.7, p.n_genes)
    zipf = 1.0 / np.arange(1, N_GENERIC_GO + 1)
    gen_terms = grng.choice(N_GENERIC_GO, size=int(n_gen.sum()), p=zipf / zipf.sum())
    pairs.append(np.c_[np.repeat(np.arange(p.n_genes), n_gen), gen_base + gen_terms])
    gt = np.unique(np.concatenate(pairs), axis=0)
    go_ids = np.array([f"GO:99{t:05d}" for t in range(gen_base + N_GENERIC_GO)], dtype=object)
    go = pd.DataFrame({"gene_symbol": names[gt[:, 0]], "go_id": go_ids[gt[:, 1]]})
    # Jaccard similarity of GO term sets (as the GEARS gene graph)
    M = np.zeros((p.n_genes, len(go_ids)), dtype=np.float64)
    M[gt[:, 0], gt[:, 1]] = 1
    inter = M @ M.T
    sz = M.sum(1)
    jac = inter / np.maximum(sz[:, None] + sz[None, :] - inter, 1)
    np.fill_diagonal(jac, 0.0)

    # ---- source cCRE set: most true cCREs (narrower, jittered) + inactive elements ---------------
    srng = rng_for(seed, "sources")
    in_src = srng.random(n) < p.source_recall
    ccres["in_sources"] = in_src.astype(np.int64)
    t = ccres[in_src]
    sw = np.minimum(t["end"].to_numpy() - t["start"].to_numpy(), srng.integers(150, 351, len(t)))
    sc = (t["start"].to_numpy() + t["end"].to_numpy()) // 2 + srng.integers(-30, 31, len(t))
    src = pd.DataFrame({"chrom": t["chrom"].to_numpy(), "start": sc - sw // 2, "end": sc - sw // 2 + sw})
    occupied = np.sort(ccres["bin"].to_numpy())
    lay = Layout(ccres=ccres, genes=genes, go=go, sources=src, occupied_bins=occupied,
                 chrom_bin_offset=bin_off, jaccard=jac)
    n_decoy = int(round(p.source_decoy_frac * n))
    dbins = lay.free_bins(srng, n_decoy)
    dci, dbs = lay.bin_to_pos(dbins)
    dw = srng.integers(150, 351, n_decoy)
    dcen = dbs + BIN // 2 + srng.integers(-100, 101, n_decoy)
    decoys = pd.DataFrame({"chrom": np.asarray(CHROMS)[dci], "start": dcen - dw // 2,
                           "end": dcen - dw // 2 + dw})
    src = pd.concat([src, decoys], ignore_index=True)
    src["ci"] = src["chrom"].map({c: i for i, c in enumerate(CHROMS)})
    src = src.sort_values(["ci", "start", "end"], kind="stable").drop(columns="ci").reset_index(drop=True)
    src["name"] = [f"SRC{i + 1:06d}" for i in range(len(src))]
    lay.sources = src
    lay.occupied_bins = np.union1d(occupied, dbins)
    return lay
