"""cCRE vocabulary: external sets kept in file order, curation (union, merge, min_cells filter)."""

import numpy as np
import pandas as pd
import pytest

from epiflow.errors import InputFormatError
from epiflow.genome.bed import read_bed
from epiflow.genome.ccre import (STATS_COLUMNS, candidate_ccres, filter_vocab, load_external_vocab,
                                 vocab_summary, write_vocab, write_vocab_stats)


def _df(rows):
    return pd.DataFrame(rows, columns=["chrom", "start", "end"])


def test_candidate_ccres_union_merge_sorted():
    a = _df([("chr2", 100, 200), ("chr1", 500, 600), ("chr10", 0, 50), ("chrX", 10, 20)])
    b = _df([("chr1", 550, 700), ("chr1", 700, 800), ("chr2", 150, 160), ("chr1", 5, 10)])
    cand = candidate_ccres([a, b])
    assert cand.columns.tolist() == ["chrom", "start", "end", "n_merged"]
    # karyotypic order; overlaps merged into longer intervals; book-ended ones kept apart
    assert list(cand.itertuples(index=False, name=None)) == [
        ("chr1", 5, 10, 1), ("chr1", 500, 700, 2), ("chr1", 700, 800, 1), ("chr2", 100, 200, 2),
        ("chr10", 0, 50, 1), ("chrX", 10, 20, 1)]
    gap = candidate_ccres([a, b], gap=1)
    assert ("chr1", 500, 800, 3) in list(gap.itertuples(index=False, name=None))
    with pytest.raises(ValueError):
        candidate_ccres([])


def test_candidate_ccres_matches_brute_force():
    rng = np.random.default_rng(3)
    sets = []
    for k in range(3):
        s = rng.integers(0, 5000, 200)
        sets.append(_df(list(zip(rng.choice(["chr1", "chr2"], 200), s, s + rng.integers(1, 80, 200)))))
    cand = candidate_ccres(sets)
    allint = pd.concat(sets)
    for c in ("chr1", "chr2"):
        cover = np.zeros(6000, dtype=bool)
        for _, r in allint[allint.chrom == c].iterrows():
            cover[r.start:r.end] = True
        got = np.zeros(6000, dtype=bool)
        sub = cand[cand.chrom == c]
        for _, r in sub.iterrows():
            got[r.start:r.end] = True
        assert (cover == got).all()
        assert (sub["start"].to_numpy()[1:] >= sub["end"].to_numpy()[:-1]).all()  # sorted, disjoint
    assert cand["n_merged"].sum() == len(allint)


def test_filter_vocab_min_cells_stable_order_stats():
    cand = _df([("chr1", 10, 20), ("chr1", 30, 50), ("chr2", 5, 9), ("chr3", 0, 100)])
    cand["n_merged"] = [1, 3, 1, 2]
    cells = np.array([150, 99, 100, 0])
    vocab, keep, stats = filter_vocab(cand, cells, min_cells=100)
    assert keep.tolist() == [0, 2]
    assert list(vocab.itertuples(index=False, name=None)) == [("chr1", 10, 20), ("chr2", 5, 9)]
    assert stats.columns.tolist() == STATS_COLUMNS
    assert stats["width"].tolist() == [10, 20, 4, 100]
    assert stats["kept"].tolist() == [True, False, True, False]
    assert stats["cells_open"].tolist() == cells.tolist()
    assert stats["n_merged"].tolist() == [1, 3, 1, 2]
    summ = vocab_summary(stats)
    assert summ["n_kept"] == 2 and summ["n_dropped"] == 2 and summ["width_median"] == 7.0
    v0, k0, _ = filter_vocab(cand, cells, min_cells=0)
    assert k0.tolist() == [0, 1, 2, 3] and len(v0) == 4
    _, _, st = filter_vocab(cand.drop(columns="n_merged"), cells)
    assert st["n_merged"].tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError):
        filter_vocab(cand, cells[:3])


def test_write_vocab_and_stats(tmp_path):
    cand = _df([("chr1", 10, 20), ("chr2", 5, 9)])
    vocab, _, stats = filter_vocab(cand, np.array([200, 300]))
    write_vocab(vocab, tmp_path / "vocab.bed")
    write_vocab_stats(stats, tmp_path / "vocab_stats.tsv")
    assert (tmp_path / "vocab.bed").read_text() == "chr1\t10\t20\nchr2\t5\t9\n"
    back = pd.read_csv(tmp_path / "vocab_stats.tsv", sep="\t")
    assert back.columns.tolist() == STATS_COLUMNS and back["kept"].all()


def test_load_external_vocab_keeps_file_order(tmp_path):
    bed = tmp_path / "cCRE.bed"
    # deliberately NOT sorted: the file order defines the token ids
    bed.write_text("chr2\t100\t200\nchr1\t5\t50\nchr1\t1\t3\n")
    dfp = tmp_path / "df.npy"
    np.save(dfp, np.array([0.1, 0.2, 0.3], dtype=np.float32))
    vocab, df = load_external_vocab(bed, dfp)
    assert vocab["chrom"].tolist() == ["chr2", "chr1", "chr1"] and vocab["start"].tolist() == [100, 5, 1]
    assert df.dtype == np.float64 and np.allclose(df, [0.1, 0.2, 0.3])
    v2, none = load_external_vocab(bed)
    assert none is None and len(v2) == 3
    np.save(dfp, np.array([0.1, 0.2]))
    with pytest.raises(InputFormatError, match="2 values but the vocabulary"):
        load_external_vocab(bed, dfp)
    np.save(dfp, np.array([0.1, np.nan, 0.3]))
    with pytest.raises(InputFormatError, match="non-finite"):
        load_external_vocab(bed, dfp)
    np.save(dfp, np.ones((3, 2)))
    with pytest.raises(InputFormatError, match="1-D"):
        load_external_vocab(bed, dfp)
    (tmp_path / "junk.npy").write_text("not numpy")
    with pytest.raises(InputFormatError, match="cannot read"):
        load_external_vocab(bed, tmp_path / "junk.npy")


@pytest.mark.realdata
def test_curate_from_real_peak_sets(data_dir):
    """Union of the PBMC hg38 peaks with themselves shifted: merge keeps coverage; filter keeps order."""
    peaks = read_bed(data_dir / "pbmc_multiome_peaks_hg38.bed.gz")
    shifted = peaks.assign(start=peaks.start + 100, end=peaks.end + 100)
    cand = candidate_ccres([peaks, shifted])
    assert cand["n_merged"].sum() == 2 * len(peaks)
    # candidates are sorted and disjoint per chromosome, and every input lies inside one of them
    both = pd.concat([peaks, shifted], ignore_index=True)
    for c, sub in cand.groupby("chrom", sort=False):
        cs, ce = sub["start"].to_numpy(), sub["end"].to_numpy()
        assert (cs[1:] >= ce[:-1]).all()
        x = both[both.chrom == c]
        j = np.searchsorted(cs, x["start"].to_numpy(), side="right") - 1
        assert (j >= 0).all() and (x["end"].to_numpy() <= ce[j]).all()
    rng = np.random.default_rng(0)
    cells = rng.integers(0, 300, len(cand))
    vocab, keep, stats = filter_vocab(cand, cells, min_cells=100)
    assert len(vocab) == int((cells >= 100).sum())
    assert (np.diff(keep) > 0).all()
    assert (stats.loc[stats.kept, ["chrom", "start", "end"]].reset_index(drop=True) == vocab).all().all()
