"""epiflow.simulate: determinism, file formats, and the stated properties measured from the files."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from epiflow.errors import ConfigError
from epiflow.genome.intervals import chrom_sort_key, merge_intervals, overlap_pairs
from epiflow.simulate import PRESETS, get_preset, simulate_corpus

MANIFEST_COLUMNS = ["name", "format", "path", "sha256", "genome", "tissue", "barcodes", "labels",
                    "cell_type_key", "batch_key", "peaks", "role"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "corpus"
    simulate_corpus(out, "test", seed=0)
    return out


def _hashes(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def _tsv(path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", keep_default_na=False)


def _truth_counts(sim: Path) -> sp.csr_matrix:
    z = np.load(sim / "truth" / "counts.npz")
    return sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))


def _h5ad(sim: Path, name: str) -> ad.AnnData:
    return ad.read_h5ad(sim / "datasets" / f"{name}.h5ad")


def _ccre_columns(sim: Path, name: str, a: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
    """Peaks of an h5ad that are a whole true cCRE: (peak column, cCRE id), via truth/peaks.tsv."""
    pk = _tsv(sim / "truth" / "peaks.tsv")
    pk = pk[(pk["dataset"] == name) & (pk["kind"] == "whole")]
    key = pk["chrom"] + ":" + pk["start"].astype(str) + "-" + pk["end"].astype(str)
    col = pd.Index(a.var_names).get_indexer(key)
    assert (col >= 0).all()
    return col, pk["ccre_id"].to_numpy()


def _ccre_view(sim: Path, name: str) -> tuple[ad.AnnData, np.ndarray]:
    """The dataset's cells x called true cCREs (whole peaks, and split halves summed) + the cCRE ids."""
    a = _h5ad(sim, name)
    pk = _tsv(sim / "truth" / "peaks.tsv")
    pk = pk[(pk["dataset"] == name) & (pk["kind"] != "extra")]
    key = pk["chrom"] + ":" + pk["start"].astype(str) + "-" + pk["end"].astype(str)
    col = pd.Index(a.var_names).get_indexer(key)
    assert (col >= 0).all()
    ids, j = np.unique(pk["ccre_id"].to_numpy(), return_inverse=True)
    A = sp.csr_matrix((np.ones(len(col)), (col, j)), shape=(a.n_vars, len(ids)))
    return ad.AnnData(X=sp.csr_matrix(a.X @ A), obs=a.obs), ids


def _detect_rate(a: ad.AnnData, cols: np.ndarray, mask: np.ndarray) -> float:
    """Mean over the cells of ``mask`` of the share of a cell's detected features that lie in ``cols``
    (normalised per cell, so that groups of different sequencing depth compare)."""
    X = (a.X[mask] > 0).astype(np.float64)
    tot = np.asarray(X.sum(1)).ravel()
    part = np.asarray(X[:, cols].sum(1)).ravel()
    return float(np.mean(part / np.maximum(tot, 1)))


# ----------------------------------------------------------------------------------------------
def test_same_seed_byte_identical_and_different_seed_differs(sim, tmp_path):
    simulate_corpus(tmp_path / "again", "test", seed=0)
    h0, h1 = _hashes(sim), _hashes(tmp_path / "again")
    assert h0 == h1 and len(h0) > 20
    simulate_corpus(tmp_path / "other", "test", seed=1)
    h2 = _hashes(tmp_path / "other")
    assert set(h2) == set(h0)
    for f in h0:
        if f.startswith("datasets/") or f in ("truth/counts.npz", "ccre_sources.bed", "go.tsv"):
            assert h0[f] != h2[f], f


def test_gzip_header_has_no_timestamp(sim):
    raw = (sim / "datasets" / "pbmc_fragments.tsv.gz").read_bytes()
    assert raw[:4] == b"\x1f\x8b\x08\x04" and raw[4:8] == b"\0\0\0\0"  # BGZF member, mtime 0
    assert raw[12:14] == b"BC"
    assert raw.endswith(bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000"))


def test_manifest_columns_files_and_checksums(sim):
    m = _tsv(sim / "manifest.tsv")
    assert list(m.columns) == MANIFEST_COLUMNS
    assert set(m["format"]) == {"h5ad", "fragments"}
    assert (m["genome"] == "hg38").all() and m["name"].is_unique
    assert {"atlas_b1", "atlas_b2", "pbmc_fragments", "stimulation", "knockout_screen", "tumor_pair"} \
        <= set(m["name"])
    for _, r in m.iterrows():
        path = sim / r["path"]
        assert path.is_file()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == r["sha256"]
        for col in ("barcodes", "labels", "peaks"):
            if r[col]:
                assert r["format"] == "fragments" and (sim / r[col]).is_file()
    for f in ("ccre_sources.bed", "genes.bed", "tss.bed", "go.tsv", "README.md"):
        assert (sim / f).is_file()
    assert "skip" in (sim / "README.md").read_text()   # build detection must be skipped


def test_manifest_loads_with_the_corpus_manifest_reader(sim):
    manifest = pytest.importorskip("epiflow.corpus.manifest")
    entries = manifest.load_manifest(sim / "manifest.tsv")
    assert [e.name for e in entries] == list(_tsv(sim / "manifest.tsv")["name"])
    frag = [e for e in entries if e.format == "fragments"][0]
    assert frag.labels_path().is_file() and frag.barcodes_path().is_file() and frag.peaks_path().is_file()


def test_h5ad_files_are_raw_counts_with_intervals_and_labels(sim):
    extra = {"stimulation": "condition", "knockout_screen": "perturbation", "tumor_pair": "state"}
    for name in ("atlas_b1", "atlas_b2", "stimulation", "knockout_screen", "tumor_pair"):
        a = _h5ad(sim, name)
        assert sp.issparse(a.X) and a.X.dtype == np.int32 and a.X.data.min() >= 1
        assert a.uns["genome"] == "hg38"
        v = a.var
        names = v["chrom"].astype(str) + ":" + v["start"].astype(str) + "-" + v["end"].astype(str)
        assert list(names) == list(a.var_names)
        assert (v["end"] > v["start"]).all() and (v["start"] >= 0).all()
        key = chrom_sort_key(v["chrom"].astype(str).to_numpy())
        order = np.lexsort((v["end"].to_numpy(), v["start"].to_numpy(), key))
        assert np.array_equal(order, np.arange(len(v)))
        for col in ("cell_type", "lineage", "batch", "n_fragments", "frip"):
            assert col in a.obs
        if name in extra:
            assert extra[name] in a.obs
        assert a.obs_names.is_unique
    assert set(_h5ad(sim, "stimulation").obs["condition"]) == {"control", "stimulated"}
    assert set(_h5ad(sim, "tumor_pair").obs["state"]) == {"normal", "cancer"}
    ko = _h5ad(sim, "knockout_screen").obs["perturbation"].astype(str)
    assert "control" in set(ko) and all(g == "control" or g.startswith("GENE") for g in ko)


def test_h5ad_counts_match_truth_at_whole_peaks(sim):
    """A peak that is a whole true cCRE carries exactly that cCRE's truth counts."""
    C = _truth_counts(sim)
    cells = _tsv(sim / "truth" / "cells.tsv")
    ids = _tsv(sim / "truth" / "ccres.tsv")["ccre_id"]
    pos = pd.Index(ids).get_indexer
    a = _h5ad(sim, "atlas_b2")
    rows = np.flatnonzero(cells["dataset"].to_numpy() == "atlas_b2")
    assert list(cells["cell_id"].iloc[rows]) == list(a.obs_names)
    col, cid = _ccre_columns(sim, "atlas_b2", a)
    assert (a.X[:, col] != C[rows][:, pos(cid)]).nnz == 0


def test_fragment_file_parses_and_matches_truth(sim):
    path = sim / "datasets" / "pbmc_fragments.tsv.gz"
    with gzip.open(path, "rt") as fh:
        frag = pd.read_csv(fh, sep="\t", header=None, names=["chrom", "start", "end", "barcode", "count"])
    assert len(frag) > 1000
    assert (frag["end"] > frag["start"]).all() and (frag["count"] >= 1).all()
    assert frag["count"].value_counts().index[0] == 1
    key = chrom_sort_key(frag["chrom"].to_numpy())
    assert np.all(np.diff(key) >= 0)
    same = np.diff(key) == 0
    assert np.all(np.diff(frag["start"].to_numpy())[same] >= 0)
    wl = [ln for ln in (sim / "datasets" / "pbmc_fragments_barcodes.tsv").read_text().splitlines()]
    lab = _tsv(sim / "datasets" / "pbmc_fragments_labels.tsv")
    assert list(lab.columns) == ["barcode", "cell_type", "lineage", "batch"] and list(lab["barcode"]) == wl
    bcs = set(frag["barcode"])
    assert set(wl) <= bcs and len(bcs - set(wl)) > 0          # empty droplets outside the whitelist
    # fragments in true cCREs: each overlaps at most one; per cell they reproduce the truth counts
    cc = _tsv(sim / "truth" / "ccres.tsv")
    ia, ib = overlap_pairs(frag["chrom"], frag["start"], frag["end"], cc["chrom"], cc["start"], cc["end"])
    assert len(np.unique(ia)) == len(ia)
    frip = len(ia) / len(frag)
    assert 0.1 < frip < 0.9
    cells = _tsv(sim / "truth" / "cells.tsv")
    rows = np.flatnonzero(cells["dataset"].to_numpy() == "pbmc_fragments")
    bc_index = pd.Index(cells["cell_id"].iloc[rows])
    fr_cell = bc_index.get_indexer(frag["barcode"].to_numpy()[ia])
    ok = fr_cell >= 0
    got = sp.csr_matrix((np.ones(ok.sum()), (fr_cell[ok], ib[ok])), shape=(len(rows), len(cc)))
    want = _truth_counts(sim)[rows]
    assert abs(got - want).sum() == 0
    # per-cell totals in the truth = fragments of the barcode in the file
    tot = frag["barcode"].value_counts().reindex(bc_index).to_numpy()
    assert np.array_equal(tot, cells["n_fragments"].iloc[rows].to_numpy())


def test_accessible_fraction_depth_and_counts(sim):
    C = _truth_counts(sim)
    cells = _tsv(sim / "truth" / "cells.tsv")
    n_ccres = C.shape[1]
    frac = np.diff(C.indptr) / n_ccres
    assert frac.min() >= 0.02 and frac.max() <= 0.10
    assert np.array_equal(np.diff(C.indptr), cells["n_accessible"].to_numpy())
    d = cells["depth_factor"].to_numpy()
    assert d.max() / d.min() >= 10
    nf = cells["n_fragments"].to_numpy()
    assert nf.max() / nf.min() >= 10                    # sequencing depth over an order of magnitude
    from scipy.stats import spearmanr
    assert spearmanr(d, nf)[0] > 0.9
    assert spearmanr(d, frac)[0] > 0.7
    # counts: mostly 1, some 2+
    ones = (C.data == 1).mean()
    assert 0.7 < ones < 0.99 and (C.data == 2).sum() > 0
    # the depth recorded in the h5ad obs matches the truth
    a = _h5ad(sim, "tumor_pair")
    rows = cells["dataset"].to_numpy() == "tumor_pair"
    assert np.array_equal(a.obs["n_fragments"].to_numpy(), nf[rows])
    # QC threshold of the preset keeps (almost) every cell
    assert (np.diff(C.indptr) >= PRESETS["test"].min_ccres_per_cell).mean() > 0.99


def _lsi(X, k=15):
    from sklearn.decomposition import TruncatedSVD
    X = (X > 0).astype(np.float64)
    idf = np.log1p(X.shape[0] / np.maximum(1, np.asarray(X.sum(0)).ravel()))
    tf = sp.diags(1 / np.maximum(1, np.asarray(X.sum(1)).ravel())) @ X
    Y = (tf @ sp.diags(idf)).tocsr()
    Y.data = np.log1p(Y.data * 1e4)
    Z = TruncatedSVD(k + 1, random_state=0).fit_transform(Y)[:, 1:]
    return Z / np.linalg.norm(Z, axis=1, keepdims=True)


def test_cell_types_separable_by_lsi_knn(sim):
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    for name in ("atlas_b1", "atlas_b2"):
        a = _h5ad(sim, name)
        acc = cross_val_score(KNeighborsClassifier(5), _lsi(a.X), a.obs["cell_type"].astype(str), cv=4).mean()
        assert acc >= 0.85, (name, acc)
    types = _tsv(sim / "truth" / "cell_types.tsv")
    assert len(types) == len(PRESETS["test"].cell_types) and (types["n_cells"] > 0).all()


def test_batch_shift_detectable(sim):
    C = _truth_counts(sim)
    cells = _tsv(sim / "truth" / "cells.tsv")
    ids = pd.Index(_tsv(sim / "truth" / "ccres.tsv")["ccre_id"])
    shift = _tsv(sim / "truth" / "batch_shift.tsv")
    batches = _tsv(sim / "truth" / "batches.tsv")
    assert {"atlas_b1", "atlas_b2"} <= set(batches["batch"])
    atlas = cells["dataset"].str.startswith("atlas_").to_numpy()
    for b in ("atlas_b1", "atlas_b2"):
        cols = ids.get_indexer(shift.loc[shift["batch"] == b, "ccre_id"])
        own = (C[atlas & (cells["batch"] == b).to_numpy()][:, cols] > 0).mean()
        other = (C[atlas & (cells["batch"] != b).to_numpy()][:, cols] > 0).mean()
        assert own > 3 * other, (b, own, other)
    # and in the dataset file itself: a batch classifier on LSI of the shared cells beats chance
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    Z = _lsi(C[atlas], k=20)
    acc = cross_val_score(LogisticRegression(max_iter=2000), Z, cells["batch"][atlas], cv=4).mean()
    assert acc > 0.75


def test_stimulation_changes_truth_ccres(sim):
    a, cid = _ccre_view(sim, "stimulation")
    col = np.arange(len(cid))
    st = _tsv(sim / "truth" / "stimulation.tsv")
    assert set(st["cell_type"]) == set(PRESETS["test"].stim_cell_types)
    ct = a.obs["cell_type"].astype(str).to_numpy()
    cond = a.obs["condition"].astype(str).to_numpy()
    for t in PRESETS["test"].stim_cell_types:
        sub = st[st["cell_type"] == t]
        for comp, up in (("shared", True), ("type_specific", True), ("closing", False)):
            c = col[np.isin(cid, sub.loc[sub["component"] == comp, "ccre_id"])]
            assert len(c) > 0
            ctrl = _detect_rate(a, c, (ct == t) & (cond == "control"))
            stim = _detect_rate(a, c, (ct == t) & (cond == "stimulated"))
            if up:
                assert stim > 3 * ctrl, (t, comp, ctrl, stim)
            else:
                assert stim < 0.6 * ctrl, (t, comp, ctrl, stim)
        # an unaffected cCRE set does not move much
        rest = col[~np.isin(cid, sub["ccre_id"])]
        r0 = _detect_rate(a, rest, (ct == t) & (cond == "control"))
        r1 = _detect_rate(a, rest, (ct == t) & (cond == "stimulated"))
        assert 0.7 < r1 / r0 < 1.3


def test_knockouts_close_truth_ccres(sim):
    a, cid = _ccre_view(sim, "knockout_screen")
    col = np.arange(len(cid))
    ko = _tsv(sim / "truth" / "knockouts.tsv")
    pert = a.obs["perturbation"].astype(str).to_numpy()
    genes = sorted(set(pert) - {"control"})
    assert genes == sorted(set(ko["gene"])) and len(genes) == PRESETS["test"].n_knockouts
    ratios = {"direct": [], "go_neighbour": []}
    for g in genes:
        for rel in ratios:
            sub = ko[(ko["gene"] == g) & (ko["relation"] == rel) & (ko["p_open_control"] > 0.3)]
            c = col[np.isin(cid, sub["ccre_id"])]
            if len(c) == 0:
                continue
            ctrl = _detect_rate(a, c, pert == "control")
            kd = _detect_rate(a, c, pert == g)
            ratios[rel].append(kd / ctrl)
    assert len(ratios["direct"]) == len(genes)
    assert np.median(ratios["direct"]) < 0.3
    assert len(ratios["go_neighbour"]) >= len(genes) // 2
    assert np.median(ratios["go_neighbour"]) < 0.8


def test_go_graph_has_module_structure_and_neighbours_follow_it(sim):
    go = _tsv(sim / "go.tsv")
    assert list(go.columns) == ["gene_symbol", "go_id"] and not go.duplicated().any()
    genes = _tsv(sim / "truth" / "genes.tsv")
    g = pd.Index(genes["gene"])
    terms = pd.Index(sorted(go["go_id"].unique()))
    M = sp.csr_matrix((np.ones(len(go)), (g.get_indexer(go["gene_symbol"]), terms.get_indexer(go["go_id"]))),
                      shape=(len(g), len(terms))).toarray()
    inter = M @ M.T
    sz = M.sum(1)
    J = inter / np.maximum(sz[:, None] + sz[None, :] - inter, 1)
    same = genes["module"].to_numpy()[:, None] == genes["module"].to_numpy()[None, :]
    off = ~np.eye(len(g), dtype=bool)
    assert J[same & off].mean() > 3 * J[~same].mean()
    assert (((J > 0.1) & off).sum(1) > 0).mean() > 0.9   # (almost) every gene has GEARS-graph neighbours
    ko = _tsv(sim / "truth" / "knockouts.tsv")
    nb = ko[ko["relation"] == "go_neighbour"].drop_duplicates(["gene", "via_gene"])
    assert len(nb) > 0
    for _, r in nb.iterrows():
        assert J[g.get_loc(r["gene"]), g.get_loc(r["via_gene"])] == pytest.approx(r["jaccard"], abs=1e-5)


def test_cancer_program_differs_between_states(sim):
    a, cid = _ccre_view(sim, "tumor_pair")
    col = np.arange(len(cid))
    ca = _tsv(sim / "truth" / "cancer.tsv")
    state = a.obs["state"].astype(str).to_numpy()
    up = col[np.isin(cid, ca.loc[ca["direction"] == "open", "ccre_id"])]
    down = col[np.isin(cid, ca.loc[ca["direction"] == "close", "ccre_id"])]
    assert len(up) and len(down)
    assert _detect_rate(a, up, state == "cancer") > 3 * _detect_rate(a, up, state == "normal")
    assert _detect_rate(a, down, state == "cancer") < 0.6 * _detect_rate(a, down, state == "normal")


def test_annotation_files_and_peak_curation_inputs(sim):
    bed = pd.read_csv(sim / "ccre_sources.bed", sep="\t", header=None)
    assert bed.shape[1] == 4 and (bed[2] > bed[1]).all()
    cc = _tsv(sim / "truth" / "ccres.tsv")
    ia, ib = overlap_pairs(bed[0], bed[1], bed[2], cc["chrom"], cc["start"], cc["end"])
    hit = np.zeros(len(cc), bool)
    hit[ib] = True
    assert np.array_equal(hit, cc["in_sources"].to_numpy() == 1)
    assert 0.8 < hit.mean() < 0.97 and len(bed) > len(np.unique(ia))    # + inactive source elements
    genes = pd.read_csv(sim / "genes.bed", sep="\t", header=None)
    tss = pd.read_csv(sim / "tss.bed", sep="\t", header=None)
    assert genes.shape[1] == 6 and tss.shape[1] == 6 and list(genes[3]) == list(tss[3])
    assert ((tss[2] - tss[1]) == 1).all() and set(tss[5]) <= {"+", "-"}
    assert genes[3].str.fullmatch(r"GENE\d{4}").all()
    # the chromosomes are hg38 names within hg38 lengths
    from epiflow.simulate.layout import HG38_LENGTHS
    assert set(cc["chrom"]) <= set(HG38_LENGTHS)
    assert (cc["end"].to_numpy() <= cc["chrom"].map(HG38_LENGTHS).to_numpy()).all()
    # dataset peaks: perturbed cCREs, some split, some dataset-specific; union + merge restores cCREs
    pk = _tsv(sim / "truth" / "peaks.tsv")
    assert {"whole", "split_left", "split_right", "extra"} <= set(pk["kind"])
    width = (pk["end"] - pk["start"])[pk["kind"] == "whole"].groupby(pk["dataset"]).median()
    assert width.nunique() >= 2                             # peak shapes differ between datasets
    union = pd.concat([pk[["chrom", "start", "end"]], bed.rename(columns={0: "chrom", 1: "start", 2: "end"})
                       [["chrom", "start", "end"]]])
    merged = merge_intervals(union, gap=50)
    ia, ib = overlap_pairs(cc["chrom"], cc["start"], cc["end"], merged["chrom"], merged["start"], merged["end"])
    called = cc["n_datasets_called"].to_numpy() > 0
    per_ccre = np.bincount(ia, minlength=len(cc))
    assert (per_ccre[called | (cc["in_sources"].to_numpy() == 1)] == 1).all()


def test_preset_overrides_and_errors(tmp_path):
    p = get_preset("test", n_cells=218)
    assert abs(p.n_cells - 218) <= 10
    with pytest.raises(ConfigError):
        get_preset("test", n_celz=3)
    with pytest.raises(ConfigError):
        get_preset("nope")
    with pytest.raises(ConfigError):
        get_preset("test", perturb_cell_type="Neuron")
    # demo preset fits the brief: 2,000-3,000 cells, 5,000-8,000 cCREs, 2% of cCREs >= the QC threshold
    d = PRESETS["demo"]
    assert 2000 <= d.n_cells <= 3000 and 5000 <= d.n_ccres <= 8000
    assert 0.02 * d.n_ccres >= d.min_ccres_per_cell


def test_cli_and_atomic_output(tmp_path, monkeypatch):
    from epiflow.cli import main
    out = tmp_path / "cli"
    assert main(["simulate", "--out", str(out), "--preset", "test", "--seed", "3", "--n-cells", "200"]) == 0
    cells = _tsv(out / "truth" / "cells.tsv")
    assert abs(len(cells) - 200) <= 10
    before = _hashes(out)
    assert main(["simulate", "--out", str(out), "--preset", "test"]) == 2        # refuses to overwrite
    assert _hashes(out) == before
    # a failure half-way leaves neither the folder nor a temporary one behind
    import epiflow.simulate.readme as readme

    def boom(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(readme, "render_readme", boom)
    with pytest.raises(RuntimeError):
        simulate_corpus(tmp_path / "broken", "test", seed=0)
    assert not (tmp_path / "broken").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_simulated_files_follow_the_umask(tmp_path, umask):
    """As every other output (not a fixed 0755 / 0644)."""
    import os

    old = os.umask(umask)
    try:
        simulate_corpus(tmp_path / "sim", "test", 0, n_cells=60)
    finally:
        os.umask(old)
    assert (tmp_path / "sim").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "sim" / "manifest.tsv").stat().st_mode & 0o777 == 0o666 & ~umask
