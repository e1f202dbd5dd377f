"""Interval primitives: chromosome names, karyotypic sort, merge and overlap join vs brute force."""

import numpy as np
import pandas as pd

from epiflow.genome.intervals import (chrom_sort_key, merge_intervals, normalize_chrom, overlap_pairs,
                                      sort_intervals)


def test_normalize_chrom():
    got = normalize_chrom(["1", "chr1", "Chr1", "X", "chrx", "MT", "M", "chrMT", "chrM", "22",
                           "chr1_KI270706v1_random", "GL000220.1"])
    assert got.tolist() == ["chr1", "chr1", "chr1", "chrX", "chrX", "chrM", "chrM", "chrM", "chrM",
                            "chr22", "chr1_KI270706v1_random", "chrGL000220.1"]
    assert normalize_chrom(np.array([1, 2])).tolist() == ["chr1", "chr2"]
    assert normalize_chrom([]).size == 0
    big = np.array(["1", "2", "chrX"] * 1000, dtype=object)
    out = normalize_chrom(big)
    assert out.shape == (3000,) and out[:3].tolist() == ["chr1", "chr2", "chrX"]


def test_chrom_sort_key_and_sort():
    key = chrom_sort_key(["chr10", "chr2", "chrM", "chrY", "chrUn_b", "chrUn_a", "chr1"])
    assert key.tolist() == [9, 1, 24, 23, 26, 25, 0]
    df = pd.DataFrame({"chrom": ["chr10", "chr2", "chr2", "chr1"], "start": [5, 9, 1, 3], "end": [6, 10, 2, 4]})
    assert sort_intervals(df)[["chrom", "start"]].values.tolist() == [["chr1", 3], ["chr2", 1], ["chr2", 9],
                                                                       ["chr10", 5]]


def test_merge_and_overlap_vs_brute_force():
    rng = np.random.default_rng(5)
    n = 300
    a = pd.DataFrame({"chrom": rng.choice(["chr1", "chr2"], n), "start": rng.integers(0, 3000, n)})
    a["end"] = a["start"] + rng.integers(1, 60, n)
    m = merge_intervals(a)
    for c in ("chr1", "chr2"):
        cov = np.zeros(3100, bool)
        for r in a[a.chrom == c].itertuples():
            cov[r.start:r.end] = True
        got = np.zeros(3100, bool)
        for r in m[m.chrom == c].itertuples():
            assert not got[r.start:r.end].any()
            got[r.start:r.end] = True
        assert (cov == got).all()
    b = pd.DataFrame({"chrom": rng.choice(["chr1", "chr3"], 200), "start": rng.integers(0, 3000, 200)})
    b["end"] = b["start"] + rng.integers(1, 200, 200)
    ia, ib = overlap_pairs(a.chrom, a.start, a.end, b.chrom, b.start, b.end)
    got = set(zip(ia.tolist(), ib.tolist()))
    want = {(i, j) for i in range(n) for j in range(200)
            if a.chrom[i] == b.chrom[j] and a.start[i] < b.end[j] and b.start[j] < a.end[i]}
    assert got == want and len(ia) == len(want)
