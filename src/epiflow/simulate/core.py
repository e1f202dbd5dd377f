"""``simulate_corpus``: write the synthetic scATAC corpus (raw inputs + ground truth) to a folder.

See ``docs/simulate.md`` and the ``README.md`` written into every output folder.
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

from ..errors import ConfigError
from ..io import folder_mode, sha256_file
from .layout import BIN, CHROMS, Layout, build_layout, rng_for
from .model import CellDesign, Effects, build_effects, expected_open, sample_cells
from .presets import SimPreset, get_preset
from .writers import bgzf_bytes, df_text, write_h5ad, write_npz, write_tsv

log = logging.getLogger(__name__)

FRAGMENT_DATASET = "pbmc_fragments"
STIM_DATASET = "stimulation"
KO_DATASET = "knockout_screen"
CANCER_DATASET = "tumor_pair"
PEAK_STYLES = ("fixed500", "variable", "summit300")
MANIFEST_COLUMNS = ["name", "format", "path", "sha256", "genome", "tissue", "barcodes", "labels",
                    "cell_type_key", "batch_key", "peaks", "role"]


@dataclass
class Dataset:
    name: str
    fmt: str                 # h5ad | fragments
    tissue: str
    design: CellDesign
    obs: pd.DataFrame        # label columns (cell_type, batch, condition/perturbation/state)
    peak_style: str
    counts: sp.csr_matrix = None
    cells: pd.DataFrame = None
    barcodes: np.ndarray = None
    peaks: pd.DataFrame = None


# --------------------------------------------------------------------------------------------------
# cells per dataset
# --------------------------------------------------------------------------------------------------
def _split(n: int, k: int) -> np.ndarray:
    return np.array([len(a) for a in np.array_split(np.arange(n), k)], dtype=np.int64)


def _composition(rng, n: int, k: int, min_each: int = 2) -> np.ndarray:
    """Cell-type counts of a sample: Dirichlet proportions, largest-remainder rounding, >= min_each."""
    prop = rng.dirichlet(np.full(k, 6.0))
    free = n - min_each * k
    raw = prop * free
    cnt = np.floor(raw).astype(np.int64)
    cnt[np.argsort(-(raw - cnt), kind="stable")[: free - cnt.sum()]] += 1
    return cnt + min_each


def _barcodes(rng, n: int) -> np.ndarray:
    out = np.zeros(0, dtype=object)
    while len(out) < n:
        codes = rng.integers(0, 4, (n + 8, 16))
        letters = np.frombuffer(b"ACGT", dtype=np.uint8)[codes]
        s = letters.view("S16").ravel().astype(str).astype(object) + "-1"
        out = np.concatenate([out, s])
        _, first = np.unique(out, return_index=True)
        out = out[np.sort(first)]
    return out[:n]


def _design_datasets(p: SimPreset, seed: int) -> list[Dataset]:
    rng = rng_for(seed, "design")
    types = list(p.type_names)
    lineages = [path.split("/")[0] for path in p.cell_types]
    nt = len(types)
    batches = dataset_batches(p)
    out = []

    def mk(name, fmt, tissue, type_idx, style, stimulated=None, ko_idx=None, cancer=None, extra=None):
        n = len(type_idx)
        perm = rng.permutation(n)       # cells in random order, as in a real file
        type_idx = np.asarray(type_idx)[perm]
        st = np.zeros(n, bool) if stimulated is None else np.asarray(stimulated)[perm]
        ko = np.zeros(n, np.int64) if ko_idx is None else np.asarray(ko_idx)[perm]
        ca = np.zeros(n, bool) if cancer is None else np.asarray(cancer)[perm]
        d = CellDesign(type_idx=type_idx, batch_idx=np.full(n, batches.index(name)), stimulated=st,
                       ko_idx=ko, cancer=ca)
        obs = pd.DataFrame({"cell_type": np.asarray(types, dtype=object)[type_idx],
                            "lineage": np.asarray(lineages, dtype=object)[type_idx], "batch": name})
        for col, vals in (extra or {}).items():
            obs[col] = np.asarray(vals, dtype=object)[perm]
        out.append(Dataset(name=name, fmt=fmt, tissue=tissue, design=d, obs=obs, peak_style=style))

    for k, n in enumerate(p.atlas_batch_cells):
        cnt = _composition(rng, n, nt)
        mk(f"atlas_b{k + 1}", "h5ad", "blood", np.repeat(np.arange(nt), cnt), PEAK_STYLES[k % 3])
    cnt = _composition(rng, p.n_fragment_cells, nt, min_each=1)
    mk(FRAGMENT_DATASET, "fragments", "blood", np.repeat(np.arange(nt), cnt), "variable")

    st_types = [types.index(t) for t in p.stim_cell_types]
    sizes = _split(p.n_stim_cells, 2 * len(st_types))
    t_idx = np.repeat(np.repeat(st_types, 2), sizes)
    stim = np.repeat(np.tile([False, True], len(st_types)), sizes)
    mk(STIM_DATASET, "h5ad", "blood", t_idx, "fixed500", stimulated=stim,
       extra={"condition": np.where(stim, "stimulated", "control")})

    n_ctrl = max(2, int(round(p.control_fraction * p.n_perturb_cells)))
    sizes = np.r_[n_ctrl, _split(p.n_perturb_cells - n_ctrl, p.n_knockouts)]
    ko = np.repeat(np.arange(p.n_knockouts + 1), sizes)
    mk(KO_DATASET, "h5ad", "blood", np.full(len(ko), types.index(p.perturb_cell_type)), "summit300",
       ko_idx=ko, extra={"perturbation": ko})   # replaced by gene names once known

    sizes = _split(p.n_cancer_cells, 2)
    ca = np.repeat([False, True], sizes)
    mk(CANCER_DATASET, "h5ad", "lymph_node", np.full(len(ca), types.index(p.cancer_cell_type)), "variable",
       cancer=ca, extra={"state": np.where(ca, "cancer", "normal")})
    return out


def dataset_batches(p: SimPreset) -> list[str]:
    """Batch names (one per dataset; the atlas has one dataset per batch)."""
    return ([f"atlas_b{k + 1}" for k in range(len(p.atlas_batch_cells))]
            + [FRAGMENT_DATASET, STIM_DATASET, KO_DATASET, CANCER_DATASET])


# --------------------------------------------------------------------------------------------------
# peaks of a dataset and its cell x peak matrix
# --------------------------------------------------------------------------------------------------
def _call_peaks(lay: Layout, p: SimPreset, ds: Dataset, rng) -> pd.DataFrame:
    cc = lay.ccres
    n_det = np.bincount(ds.counts.indices, minlength=lay.n_ccres)
    called = np.flatnonzero((n_det >= 2) & (rng.random(lay.n_ccres) < 0.97))
    s = cc["start"].to_numpy()[called]
    e = cc["end"].to_numpy()[called]
    c = (s + e) // 2
    if ds.peak_style == "fixed500":
        c = c + np.round(rng.normal(0, 30, len(c))).astype(np.int64)
        ps, pe = c - 250, c + 250
    elif ds.peak_style == "summit300":
        c = c + np.round(rng.normal(0, 20, len(c))).astype(np.int64)
        ps, pe = c - 150, c + 150
    else:
        ps = s + np.round(rng.normal(0, 50, len(c))).astype(np.int64)
        pe = e + np.round(rng.normal(0, 50, len(c))).astype(np.int64)
        pe = np.maximum(pe, ps + 100)
    kind = np.full(len(called), "whole", dtype=object)
    split = (pe - ps >= 300) & (rng.random(len(called)) < p.split_peak_frac)
    cut = (ps + pe) // 2 + rng.integers(-30, 31, len(called))
    gap = rng.integers(0, 31, len(called))
    chrom = cc["chrom"].to_numpy()[called]
    parts = [pd.DataFrame({"chrom": chrom[~split], "start": ps[~split], "end": pe[~split],
                           "ccre_idx": called[~split], "kind": kind[~split]}),
             pd.DataFrame({"chrom": chrom[split], "start": ps[split], "end": cut[split],
                           "ccre_idx": called[split], "kind": "split_left"}),
             pd.DataFrame({"chrom": chrom[split], "start": cut[split] + gap[split], "end": pe[split],
                           "ccre_idx": called[split], "kind": "split_right"})]
    n_extra = max(1, int(round(p.extra_peak_frac * len(called))))
    xb = lay.free_bins(rng, n_extra)
    lay.occupied_bins = np.union1d(lay.occupied_bins, xb)   # background fragments avoid them
    xci, xbs = lay.bin_to_pos(xb)
    xc = xbs + BIN // 2 + rng.integers(-100, 101, n_extra)
    parts.append(pd.DataFrame({"chrom": np.asarray(CHROMS)[xci], "start": xc - 250, "end": xc + 250,
                               "ccre_idx": -1, "kind": "extra"}))
    peaks = pd.concat(parts, ignore_index=True)
    peaks["ci"] = peaks["chrom"].map({ch: i for i, ch in enumerate(CHROMS)})
    return peaks.sort_values(["ci", "start", "end"], kind="stable").drop(columns="ci").reset_index(drop=True)


def _peak_matrix(ds: Dataset, n_ccres: int, rng) -> sp.csr_matrix:
    """Cells x peaks counts from the cells x cCREs truth: uncalled cCREs lost, split peaks share the
    fragments of their cCRE (binomial), dataset-specific peaks get sparse background counts."""
    pk = ds.peaks
    X = ds.counts.tocoo()
    r, c, v = X.row, X.col, X.data.astype(np.int64)
    idx = pk["ccre_idx"].to_numpy()
    kind = pk["kind"].to_numpy()
    whole = np.full(n_ccres, -1)
    left = np.full(n_ccres, -1)
    right = np.full(n_ccres, -1)
    pid = np.arange(len(pk))
    whole[idx[kind == "whole"]] = pid[kind == "whole"]
    left[idx[kind == "split_left"]] = pid[kind == "split_left"]
    right[idx[kind == "split_right"]] = pid[kind == "split_right"]
    rows, cols, vals = [], [], []
    m = whole[c] >= 0
    rows.append(r[m]); cols.append(whole[c[m]]); vals.append(v[m])
    m = left[c] >= 0
    vl = rng.binomial(v[m], 0.5)
    rows += [r[m], r[m]]; cols += [left[c[m]], right[c[m]]]; vals += [vl, v[m] - vl]
    extra = pid[kind == "extra"]
    n = ds.counts.shape[0]
    hit = rng.random((n, len(extra))) < (0.01 * ds.cells["capture"].to_numpy()[:, None])
    er, ec = np.nonzero(hit)
    rows.append(er); cols.append(extra[ec]); vals.append(np.ones(len(er), np.int64))
    r2, c2, v2 = (np.concatenate(a) for a in (rows, cols, vals))
    keep = v2 > 0
    M = sp.csr_matrix((v2[keep].astype(np.int32), (r2[keep], c2[keep])), shape=(n, len(pk)))
    M.sum_duplicates()
    M.sort_indices()
    return M


# --------------------------------------------------------------------------------------------------
# fragments
# --------------------------------------------------------------------------------------------------
def _fragment_lengths(rng, n: int) -> np.ndarray:
    comp = rng.choice(3, size=n, p=[0.65, 0.28, 0.07])
    nfr = 40 + rng.exponential(45, n)
    mono = rng.normal(200, 25, n)
    di = rng.normal(380, 30, n)
    L = np.where(comp == 0, np.minimum(nfr, 150), np.where(comp == 1, np.clip(mono, 150, 300),
                                                           np.clip(di, 300, 500)))
    return np.round(L).astype(np.int64)


def _in_ccre_fragments(lay: Layout, rng, ccre_idx: np.ndarray):
    cc = lay.ccres
    s = cc["start"].to_numpy()[ccre_idx]
    e = cc["end"].to_numpy()[ccre_idx]
    w = e - s
    centre = (s + e) // 2 + np.round((rng.random(len(s)) - 0.5) * (w // 2)).astype(np.int64)
    L = _fragment_lengths(rng, len(s))
    fs = centre - L // 2
    ci = cc["chrom"].map({ch: i for i, ch in enumerate(CHROMS)}).to_numpy()[ccre_idx]
    return ci, fs, fs + L


def _background_fragments(lay: Layout, rng, n: int):
    total = int(lay.chrom_bin_offset[-1])
    got = []
    k = 0
    while k < n:
        cand = rng.integers(0, total, size=int(1.1 * (n - k)) + 16)
        cand = cand[~np.isin(cand, lay.occupied_bins)]
        got.append(cand[: n - k])
        k += len(got[-1])
    b = np.concatenate(got) if got else np.zeros(0, np.int64)
    ci, bs = lay.bin_to_pos(b)
    L = _fragment_lengths(rng, n)
    fs = bs + (rng.random(n) * (BIN - L)).astype(np.int64)
    return ci, fs, fs + L


def _fragment_table(lay: Layout, p: SimPreset, ds: Dataset, rng) -> tuple[pd.DataFrame, np.ndarray]:
    """All fragments of the fragment dataset (cells + empty droplets), sorted; per-cell totals."""
    X = ds.counts.tocoo()
    rep = X.data.astype(np.int64)
    cell = np.repeat(X.row, rep)
    ccre = np.repeat(X.col, rep)
    ci1, s1, e1 = _in_ccre_fragments(lay, rng, ccre)
    d = ds.cells["depth_factor"].to_numpy()
    n_bg = rng.poisson(p.background_rate * lay.n_ccres * d)
    cell_bg = np.repeat(np.arange(len(d)), n_bg)
    ci2, s2, e2 = _background_fragments(lay, rng, int(n_bg.sum()))
    # empty droplets: a few ambient fragments, mostly outside cCREs
    n_empty = int(round(p.empty_barcode_frac * len(d)))
    n_e = 1 + rng.poisson(12, n_empty)
    e_cell = len(d) + np.repeat(np.arange(n_empty), n_e)
    in_c = rng.random(len(e_cell)) < 0.2
    ci3a, s3a, e3a = _in_ccre_fragments(lay, rng, rng.integers(0, lay.n_ccres, int(in_c.sum())))
    ci3b, s3b, e3b = _background_fragments(lay, rng, int((~in_c).sum()))
    empty = _barcodes(rng, n_empty + 8)
    empty = empty[~np.isin(empty, ds.barcodes)][:n_empty]
    all_bc = np.concatenate([ds.barcodes, empty])
    cells = np.concatenate([cell, cell_bg, e_cell[in_c], e_cell[~in_c]])
    ci = np.concatenate([ci1, ci2, ci3a, ci3b])
    fs = np.concatenate([s1, s2, s3a, s3b])
    fe = np.concatenate([e1, e2, e3a, e3b])
    dup = 1 + (rng.random(len(fs)) < 0.10) + (rng.random(len(fs)) < 0.02)
    bc = all_bc[cells].astype(str)
    order = np.lexsort((bc, fe, fs, ci))
    frag = pd.DataFrame({"chrom": np.asarray(CHROMS)[ci[order]], "start": fs[order], "end": fe[order],
                         "barcode": bc[order], "count": dup[order].astype(np.int64)})
    totals = np.bincount(cells, minlength=len(all_bc))[: len(d)]
    return frag, totals


# --------------------------------------------------------------------------------------------------
# truth tables
# --------------------------------------------------------------------------------------------------
def _truth_tables(lay: Layout, p: SimPreset, eff: Effects, datasets: list[Dataset]) -> dict[str, pd.DataFrame]:
    cc = lay.ccres
    ids = cc["ccre_id"].to_numpy()
    types = list(p.type_names)
    prog = eff.programs
    t = {}
    t["programs"] = pd.DataFrame({"program": prog["program"], "level": prog["level"], "node": prog["node"],
                                  "ccre_id": ids[prog["ccre_idx"].to_numpy()], "logit_effect": prog["effect"]})
    memb = prog.groupby("ccre_idx")["program"].agg(",".join)
    counts_all = sp.vstack([d.counts for d in datasets]).tocsr()
    n_cells_det = np.bincount(counts_all.indices, minlength=lay.n_ccres)
    n_called = np.zeros(lay.n_ccres, np.int64)
    for d in datasets:
        idx = np.unique(d.peaks["ccre_idx"].to_numpy())
        n_called[idx[idx >= 0]] += 1
    t["ccres"] = pd.DataFrame({
        "ccre_id": ids, "chrom": cc["chrom"], "start": cc["start"], "end": cc["end"], "kind": cc["kind"],
        "gene": cc["gene"], "in_sources": cc["in_sources"], "n_datasets_called": n_called,
        "n_cells_detected": n_cells_det, "base_logit": cc["base_logit"], "gc": cc["gc"],
        "programs": memb.reindex(np.arange(lay.n_ccres)).fillna("").to_numpy(),
    })
    g = lay.genes
    t["genes"] = pd.DataFrame({"gene": g["gene"], "chrom": g["chrom"], "tss": g["tss"], "strand": g["strand"],
                               "module": g["module"], "family": g["family"], "program": g["program"],
                               "n_ccres": np.bincount(cc["gene_idx"].to_numpy()[cc["gene_idx"] >= 0],
                                                      minlength=len(g))})
    ct_n = pd.concat([d.obs["cell_type"] for d in datasets]).value_counts()
    t["cell_types"] = pd.DataFrame({"cell_type": types, "lineage": [c.split("/")[0] for c in p.cell_types],
                                    "path": list(p.cell_types),
                                    "n_cells": [int(ct_n.get(x, 0)) for x in types]})
    lineage_of = {ty: path.split("/")[0] for ty, path in zip(types, p.cell_types)}
    rows = []
    for d in datasets:
        df = pd.DataFrame({"dataset": d.name, "cell_id": d.barcodes})
        for col in ("cell_type", "batch", "condition", "perturbation", "state"):
            df[col] = d.obs[col].to_numpy() if col in d.obs else ""
        df["lineage"] = df["cell_type"].map(lineage_of).to_numpy()
        rows.append(pd.concat([df, d.cells.reset_index(drop=True)], axis=1))
    t["cells"] = pd.concat(rows, ignore_index=True)
    batches = dataset_batches(p)
    bp = prog[prog["level"] == "batch"]
    t["batches"] = pd.DataFrame({"batch": batches, "dataset": batches, "gc_coef": eff.batch_gc,
                                 "n_specific_ccres": [int((bp["node"] == b).sum()) for b in batches]})
    t["batch_shift"] = pd.DataFrame({"batch": bp["node"], "ccre_id": ids[bp["ccre_idx"].to_numpy()],
                                     "shift": bp["effect"]})
    # stimulation: per cell type, the cCREs with a stimulation effect
    rows = []
    for ty in p.stim_cell_types:
        ti = types.index(ty)
        ctrl = expected_open(eff, ti)
        stim = expected_open(eff, ti, stimulated=True)
        for lvl, comp in (("stim_shared", "shared"), ("stim_type", "type_specific"), ("stim_close", "closing")):
            sub = prog[(prog["level"] == lvl) & ((prog["node"] == ty) | (lvl == "stim_shared"))]
            j = sub["ccre_idx"].to_numpy()
            rows.append(pd.DataFrame({"cell_type": ty, "ccre_id": ids[j], "component": comp,
                                      "logit_effect": sub["effect"].to_numpy(),
                                      "log2fc": np.log2((stim[j] + 1e-3) / (ctrl[j] + 1e-3)),
                                      "p_open_control": ctrl[j], "p_open_stimulated": stim[j]}))
    t["stimulation"] = pd.concat(rows, ignore_index=True)
    # knockouts
    ko = eff.ko_truth
    pti = types.index(p.perturb_cell_type)
    ctrl = expected_open(eff, pti)
    kos = []
    for r, gname in enumerate(eff.ko_genes, start=1):
        sub = ko[ko["gene"] == gname]
        j = sub["ccre_idx"].to_numpy()
        pk = expected_open(eff, pti, ko_idx=r)
        kos.append(pd.DataFrame({"gene": gname, "ccre_id": ids[j], "relation": sub["relation"].to_numpy(),
                                 "via_gene": sub["via_gene"].to_numpy(), "jaccard": sub["jaccard"].to_numpy(),
                                 "logit_effect": sub["logit_effect"].to_numpy(),
                                 "p_open_control": ctrl[j], "p_open_knockout": pk[j]}))
    t["knockouts"] = pd.concat(kos, ignore_index=True)
    cti = types.index(p.cancer_cell_type)
    norm = expected_open(eff, cti)
    canc = expected_open(eff, cti, cancer=0.8)
    sub = prog[prog["level"].isin(["cancer_open", "cancer_close"])]
    j = sub["ccre_idx"].to_numpy()
    t["cancer"] = pd.DataFrame({"ccre_id": ids[j],
                                "direction": np.where(sub["level"] == "cancer_open", "open", "close"),
                                "logit_effect": sub["effect"].to_numpy(),
                                "log2fc": np.log2((canc[j] + 1e-3) / (norm[j] + 1e-3)),
                                "p_open_normal": norm[j], "p_open_cancer": canc[j]})
    pk = []
    for d in datasets:
        q = d.peaks
        pk.append(pd.DataFrame({"dataset": d.name, "chrom": q["chrom"], "start": q["start"], "end": q["end"],
                                "ccre_id": np.where(q["ccre_idx"] >= 0, ids[np.maximum(q["ccre_idx"], 0)], ""),
                                "kind": q["kind"]}))
    t["peaks"] = pd.concat(pk, ignore_index=True)
    return t


# --------------------------------------------------------------------------------------------------
# main entry
# --------------------------------------------------------------------------------------------------
def simulate_corpus(out_dir, preset: str | SimPreset = "demo", seed: int = 0, *, overwrite: bool = False,
                    downstream=(), **overrides) -> dict:
    """Write the synthetic corpus to ``out_dir`` (atomically) and return the paths written.

    ``preset`` is ``'demo'`` / ``'test'`` or a :class:`SimPreset`; ``overrides`` change preset fields
    (``n_cells`` rescales every dataset). ``downstream``: dataset names given the manifest role
    ``downstream`` (the others: ``corpus``). Same preset + seed -> byte-identical files.
    """
    p = preset.replace(**overrides) if isinstance(preset, SimPreset) else get_preset(preset, **overrides)
    seed = int(seed)
    downstream = [str(d) for d in (downstream or ())]
    unknown = sorted(set(downstream) - set(dataset_batches(p)))
    if unknown:
        raise ConfigError(f"--downstream names {', '.join(unknown)}, which the simulation does not write",
                          field="downstream", fix=f"use dataset names of: {', '.join(dataset_batches(p))}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output folder {out} exists and is not empty", path=str(out),
                          fix="choose another --out or pass --force (overwrite=True)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _write_all(tmp, p, seed, downstream)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(out, folder_mode())
    return _paths(out, p)


def _paths(out: Path, p: SimPreset) -> dict:
    d = {"out": out, "manifest": out / "manifest.tsv", "readme": out / "README.md",
         "ccre_sources": out / "ccre_sources.bed", "genes": out / "genes.bed", "tss": out / "tss.bed",
         "go": out / "go.tsv", "truth": out / "truth"}
    for name in dataset_batches(p):
        d[name] = out / "datasets" / (f"{name}.tsv.gz" if name == FRAGMENT_DATASET else f"{name}.h5ad")
    return d


def _write_all(tmp: Path, p: SimPreset, seed: int, downstream=()) -> None:
    from tqdm import tqdm

    steps = tqdm(total=5, desc="simulate", disable=not log.isEnabledFor(logging.INFO), leave=False)
    lay = build_layout(p, seed)
    eff = build_effects(lay, p, dataset_batches(p), seed)
    datasets = _design_datasets(p, seed)
    steps.update()
    ko_names = np.asarray(["control"] + eff.ko_genes, dtype=object)
    for ds in datasets:
        rng = rng_for(seed, "cells-" + ds.name)
        ds.counts, ds.cells = sample_cells(eff, p, ds.design, rng)
        ds.barcodes = _barcodes(rng, len(ds.obs))
        if "perturbation" in ds.obs:
            ds.obs["perturbation"] = ko_names[ds.obs["perturbation"].to_numpy().astype(np.int64)]
    steps.update()
    for ds in datasets:
        ds.peaks = _call_peaks(lay, p, ds, rng_for(seed, "peaks-" + ds.name))
    steps.update()

    dsdir = tmp / "datasets"
    dsdir.mkdir()
    manifest = []
    for ds in datasets:
        rng = rng_for(seed, "write-" + ds.name)
        d_rel = ds.cells["depth_factor"].to_numpy()
        if ds.fmt == "fragments":
            frag, totals = _fragment_table(lay, p, ds, rng)
            path = dsdir / f"{ds.name}.tsv.gz"
            path.write_bytes(bgzf_bytes(df_text(frag, header=False).encode()))
            ds.cells["n_fragments"] = totals
            (dsdir / f"{ds.name}_barcodes.tsv").write_text("".join(f"{b}\n" for b in ds.barcodes))
            lab = pd.DataFrame({"barcode": ds.barcodes, "cell_type": ds.obs["cell_type"].to_numpy(),
                                "lineage": ds.obs["lineage"].to_numpy(), "batch": ds.obs["batch"].to_numpy()})
            write_tsv(dsdir / f"{ds.name}_labels.tsv", lab)
            write_tsv(dsdir / f"{ds.name}_peaks.bed", ds.peaks[["chrom", "start", "end"]], header=False)
            aux = {"barcodes": f"datasets/{ds.name}_barcodes.tsv", "labels": f"datasets/{ds.name}_labels.tsv",
                   "peaks": f"datasets/{ds.name}_peaks.bed"}
        else:
            n_bg = rng.poisson(p.background_rate * lay.n_ccres * d_rel)
            ds.cells["n_fragments"] = ds.cells["n_ccre_fragments"].to_numpy() + n_bg
            M = _peak_matrix(ds, lay.n_ccres, rng)
            pk = ds.peaks
            var = pd.DataFrame({"chrom": pk["chrom"].to_numpy(), "start": pk["start"].to_numpy(),
                                "end": pk["end"].to_numpy()})
            var.index = (var["chrom"] + ":" + var["start"].astype(str) + "-" + var["end"].astype(str)).to_numpy()
            obs = ds.obs.copy()
            obs.index = ds.barcodes.astype(str)
            obs["n_fragments"] = ds.cells["n_fragments"].to_numpy().astype(np.int64)
            obs["frip"] = np.round(ds.cells["n_ccre_fragments"].to_numpy() / obs["n_fragments"].to_numpy(), 4)
            path = dsdir / f"{ds.name}.h5ad"
            write_h5ad(path, M, obs, var, {"genome": "hg38", "coordinates": "0-based half-open (BED)",
                                           "source": "epiflow.simulate (synthetic)", "preset": p.name,
                                           "seed": seed, "peak_style": ds.peak_style})
            aux = {}
        ds.cells["frip"] = ds.cells["n_ccre_fragments"] / ds.cells["n_fragments"]
        manifest.append({"name": ds.name, "format": ds.fmt, "path": f"datasets/{path.name}",
                         "sha256": sha256_file(path), "genome": "hg38", "tissue": ds.tissue,
                         "barcodes": aux.get("barcodes", ""), "labels": aux.get("labels", ""),
                         "cell_type_key": "cell_type", "batch_key": "batch", "peaks": aux.get("peaks", ""),
                         "role": "downstream" if ds.name in downstream else "corpus"})
    write_tsv(tmp / "manifest.tsv", pd.DataFrame(manifest, columns=MANIFEST_COLUMNS))
    steps.update()

    # annotation files
    write_tsv(tmp / "ccre_sources.bed", lay.sources[["chrom", "start", "end", "name"]], header=False)
    g = lay.genes
    write_tsv(tmp / "genes.bed", pd.DataFrame({"chrom": g["chrom"], "start": g["start"], "end": g["end"],
                                               "name": g["gene"], "score": ".", "strand": g["strand"]}),
              header=False)
    write_tsv(tmp / "tss.bed", pd.DataFrame({"chrom": g["chrom"], "start": g["tss"], "end": g["tss"] + 1,
                                             "name": g["gene"], "score": ".", "strand": g["strand"]}),
              header=False)
    write_tsv(tmp / "go.tsv", lay.go)

    # truth
    tdir = tmp / "truth"
    tdir.mkdir()
    tables = _truth_tables(lay, p, eff, datasets)
    for name, df in tables.items():
        write_tsv(tdir / f"{name}.tsv", df)
    C = sp.vstack([d.counts for d in datasets]).tocsr()
    write_npz(tdir / "counts.npz", {"indptr": C.indptr.astype(np.int64), "indices": C.indices.astype(np.int32),
                                    "data": C.data.astype(np.int32), "shape": np.asarray(C.shape, np.int64)})
    params = {"seed": seed, "preset": p.to_dict(), "genome": "hg38", "version": 1}
    from . import layout as L
    params["model"] = {"program_fraction": L.PROGRAM_FRACTION, "base_logit": L.BASE_LOGIT, "effect": L.EFFECT,
                       "gc_coef_max": L.GC_COEF_MAX, "ko_direct": L.KO_DIRECT, "ko_neighbour": L.KO_NEIGHBOUR,
                       "go_neighbour_min_jaccard": L.GO_NEIGHBOUR_MIN_JACCARD, "bin": L.BIN}
    (tdir / "params.json").write_text(json.dumps(params, indent=1, sort_keys=True, default=list) + "\n")
    from .readme import render_readme
    (tmp / "README.md").write_text(render_readme(p, seed, lay, eff, datasets, tables))
    steps.update()
    steps.close()
    mode = folder_mode()  # what a plain mkdir / open give under the umask
    for f in sorted(tmp.rglob("*")):
        os.chmod(f, mode if f.is_dir() else mode & 0o666)
