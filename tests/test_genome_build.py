"""hg19 / hg38 detection from TSS proximity, on synthetic and real data; mismatch errors."""

import numpy as np
import pandas as pd
import pytest

from epiflow.errors import GenomeBuildError, InputFormatError
from epiflow.genome.build import (BuildReport, check_build, detect_build, intervals_from_var,
                                  load_intervals, tss_fraction)


def _tss_sets(rng):
    chroms = [f"chr{i}" for i in range(1, 4)]
    a = pd.DataFrame({"chrom": np.repeat(chroms, 200), "start": rng.integers(0, 10_000_000, 600)})
    b = a.copy()
    b["start"] = a["start"] + rng.integers(20_000, 500_000, 600)  # the "other build": shifted genes
    for d in (a, b):
        d["end"] = d["start"] + 1
    return a, b


def test_detect_build_synthetic():
    rng = np.random.default_rng(0)
    t19, t38 = _tss_sets(rng)
    # 3,000 peaks: 40 % near hg38 TSS, the rest uniform
    n = 3000
    near = t38.sample(n=1200, replace=True, random_state=1)
    chrom = np.r_[near["chrom"].to_numpy(), rng.choice(["chr1", "chr2", "chr3"], n - 1200)]
    mid = np.r_[near["start"].to_numpy() + rng.integers(-500, 500, 1200), rng.integers(0, 10_000_000, n - 1200)]
    start, end = mid - 250, mid + 250
    rep = detect_build(chrom, start, end, tss={"hg19": t19, "hg38": t38}, window=1000)
    assert rep.build == "hg38" and rep.best == "hg38"
    assert rep.scores["hg38"] > 0.4 and rep.scores["hg19"] < 0.1
    assert rep.margin == pytest.approx(rep.scores["hg38"] - rep.scores["hg19"])
    assert rep.n == n
    check_build("GRCh38", rep)  # alias of the detected build: fine
    with pytest.raises(GenomeBuildError) as ei:
        check_build("hg19", rep, path="x.bed", dataset="pbmc")
    msg = str(ei.value)
    assert "dataset 'pbmc'" in msg and "x.bed" in msg and "hg38 " in msg and "hg19 " in msg
    assert "genome field" in msg and "liftover" in msg
    # uninformative data (uniform intervals): no confident call, check_build trusts the declaration
    u = detect_build(rng.choice(["chr1", "chr2"], 2000), np.arange(2000) * 5000, np.arange(2000) * 5000 + 500,
                     tss={"hg19": t19, "hg38": t38})
    assert u.build == "unknown"
    check_build("hg19", u)
    # too few intervals: unknown
    few = detect_build(chrom[:50], start[:50], end[:50], tss={"hg19": t19, "hg38": t38})
    assert few.build == "unknown"


def test_detect_build_subsamples():
    rng = np.random.default_rng(2)
    t19, t38 = _tss_sets(rng)
    c = rng.choice(["chr1", "chr2"], 5000)
    s = rng.integers(0, 10_000_000, 5000)
    rep = detect_build(c, s, s + 100, tss={"hg19": t19, "hg38": t38}, max_intervals=1000)
    assert rep.n == 1000
    assert rep.to_dict()["n_total"] == 5000


def test_tss_fraction_exact():
    tss = {"chr1": np.array([1000, 5000])}
    mid = np.array([0, 1, 2000, 2001, 4000, 6000, 6001])
    # distances 1000, 999, 1000, 1001, 1000, 1000, 1001
    assert tss_fraction(np.array(["chr1"] * 7), mid, tss, 1000) == pytest.approx(5 / 7)
    assert tss_fraction(np.array(["chr2"] * 7), mid, tss, 1000) == 0.0


def test_intervals_from_var():
    var = pd.DataFrame(index=["chr1:100-600", "chr2_5_505", "chr1_KI270706v1_random:10-20"])
    iv = intervals_from_var(var)
    assert iv["chrom"].tolist() == ["chr1", "chr2", "chr1_KI270706v1_random"]
    assert iv["start"].tolist() == [100, 5, 10] and iv["end"].tolist() == [600, 505, 20]
    var = pd.DataFrame({"chrom": ["1"], "start": [3], "end": [9]}, index=["peak1"])
    assert intervals_from_var(var).iloc[0].tolist() == ["chr1", 3, 9]
    with pytest.raises(InputFormatError, match="cannot find peak coordinates"):
        intervals_from_var(pd.DataFrame(index=["gene1", "gene2"]), path="a.h5ad")


@pytest.fixture(scope="module")
def tss(data_dir):
    return {"hg19": data_dir / "hg19_tss.bed.gz", "hg38": data_dir / "hg38_tss.bed.gz"}


@pytest.mark.realdata
@pytest.mark.parametrize("name, fmt, expected", [
    ("buenrostro2018_bm0828.h5ad", "h5ad", "hg19"),
    ("buenrostro2018_20cells_fragments.tsv.gz", "fragments", "hg19"),
    ("pbmc_multiome_peaks_hg38.bed.gz", "bed", "hg38"),
    ("pbmc_multiome_fragments.tsv.gz", "fragments", "hg38"),
    ("granja2019_bmmc.h5ad", "h5ad", "hg19"),
])
def test_detect_build_real_data(data_dir, tss, name, fmt, expected):
    iv = load_intervals(data_dir / name, "auto", max_lines=100_000)
    rep = detect_build(iv["chrom"], iv["start"], iv["end"], tss=tss)
    print(name, rep.to_dict())
    assert rep.build == expected
    other = "hg38" if expected == "hg19" else "hg19"
    assert rep.scores[expected] > 2 * rep.scores[other]
    check_build(expected, rep, path=data_dir / name)
    with pytest.raises(GenomeBuildError) as ei:
        check_build(other, rep, path=data_dir / name, dataset=name.split(".")[0])
    assert name in str(ei.value) and f"declared {other}" in str(ei.value)


def test_load_intervals_errors(tmp_path):
    with pytest.raises(InputFormatError, match="not found"):
        load_intervals(tmp_path / "none_fragments.tsv.gz")
    p = tmp_path / "bad_fragments.tsv"
    p.write_text("chr1\tabc\t10\tAAA\t1\n")
    with pytest.raises(InputFormatError, match="cannot read fragments"):
        load_intervals(p)
    assert BuildReport("hg19", {"hg19": 0.2}, 0.2).to_dict()["build"] == "hg19"


def test_load_intervals_corrupt_h5ad_names_file(tmp_path):
    p = tmp_path / "g.h5ad"
    p.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(InputFormatError, match="cannot read the h5ad file") as ei:
        load_intervals(p)
    assert str(p) in str(ei.value) and "Fix:" in str(ei.value)
