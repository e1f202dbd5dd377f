import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from epiflow.corpus.manifest import load_manifest
from epiflow.corpus.mapping import CcreIndex, map_dataset, map_fragments, map_peaks, peak_incidence
from epiflow.corpus.readers import FragmentReader
from epiflow.errors import ConfigError, GenomeBuildError, InputFormatError
from epiflow.genome.intervals import overlap_pairs


def _random_intervals(rng, n, chroms=("chr1", "chr2", "chrX"), span=5000, maxlen=300):
    c = rng.choice(chroms, n)
    s = rng.integers(0, span, n)
    return pd.DataFrame({"chrom": c, "start": s, "end": s + rng.integers(1, maxlen, n)})


def _ccres(rng, n=60, overlapping=False):
    if overlapping:
        return _random_intervals(rng, n, maxlen=400)
    # non-overlapping sorted set
    rows = []
    for c in ("chr1", "chr2", "chrX"):
        pos = np.sort(rng.choice(np.arange(0, 5000, 100), n // 3, replace=False))
        for p in pos:
            rows.append((c, p, p + rng.integers(20, 100)))
    return pd.DataFrame(rows, columns=["chrom", "start", "end"])


def _pairs(ia, ib):
    return sorted(zip(ia.tolist(), ib.tolist()))


@pytest.mark.parametrize("overlapping", [False, True])
def test_index_matches_overlap_pairs(overlapping):
    rng = np.random.default_rng(0)
    cc = _ccres(rng, overlapping=overlapping)
    q = _random_intervals(rng, 500)
    idx = CcreIndex.from_frame(cc)
    got = idx.query(q["chrom"], q["start"], q["end"])
    ref = overlap_pairs(q["chrom"], q["start"], q["end"], cc["chrom"], cc["start"], cc["end"])
    assert _pairs(*got) == _pairs(*ref)
    assert len(ref[0]) > 50


def _brute_counts(frags, cc, barcodes, use_count):
    M = np.zeros((len(barcodes), len(cc)))
    bi = {b: i for i, b in enumerate(barcodes)}
    for f in frags.itertuples():
        for j, c in enumerate(cc.itertuples()):
            if f.chrom == c.chrom and f.start < c.end and c.start < f.end:
                M[bi[f.barcode], j] += f.count if use_count else 1
    return M


def _write_frags(path, frags):
    frags.to_csv(path, sep="\t", header=False, index=False)
    return path


@pytest.mark.parametrize("use_count", [False, True])
@pytest.mark.parametrize("chunksize", [7, 10_000])
def test_map_fragments_against_brute_force(tmp_path, use_count, chunksize):
    rng = np.random.default_rng(1)
    cc = _ccres(rng, overlapping=True)
    fr = _random_intervals(rng, 300)
    fr["barcode"] = rng.choice(["c1", "c2", "c3", "c4"], len(fr))
    fr["count"] = rng.integers(1, 4, len(fr))
    p = _write_frags(tmp_path / "f.tsv", fr)
    res = map_fragments(FragmentReader(p, chunksize=chunksize), CcreIndex.from_frame(cc), use_count_column=use_count)
    ref = _brute_counts(fr, cc, list(res.barcodes), use_count)
    np.testing.assert_array_equal(res.counts.toarray(), ref)
    hit = [any(f.chrom == c.chrom and f.start < c.end and c.start < f.end for c in cc.itertuples())
           for f in fr.itertuples()]
    assert res.n_in_ccres.sum() == sum(hit) and res.n_fragments.sum() == len(fr)
    assert res.stats["frac_fragments_in_ccres"] == pytest.approx(sum(hit) / len(fr))


def test_fragment_spanning_two_ccres_counts_for_both(tmp_path):
    cc = pd.DataFrame({"chrom": ["chr1", "chr1", "chr1"], "start": [100, 200, 1000], "end": [150, 250, 1100]})
    p = tmp_path / "f.tsv"
    p.write_text("chr1\t120\t220\tA\t5\nchr1\t150\t200\tA\t1\nchr1\t149\t150\tB\t1\n")
    r = map_fragments(FragmentReader(p), CcreIndex.from_frame(cc), use_count_column=False)
    assert r.counts.toarray().tolist() == [[1, 1, 0], [1, 0, 0]]  # book-ended 150-200 overlaps nothing
    r = map_fragments(FragmentReader(p), CcreIndex.from_frame(cc))  # default: count column, as the authors
    assert r.counts.toarray().tolist() == [[5, 5, 0], [1, 0, 0]]


def test_map_peaks_incidence():
    cc = pd.DataFrame({"chrom": ["chr1", "chr1", "chr2"], "start": [100, 300, 0], "end": [200, 400, 50]})
    peaks = pd.DataFrame({"chrom": ["chr1", "chr1", "chr1", "chr3"], "start": [150, 120, 500, 0],
                          "end": [350, 130, 600, 10]})
    A = peak_incidence(peaks, CcreIndex.from_frame(cc))
    assert A.toarray().tolist() == [[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]]
    X = sp.csr_matrix(np.array([[2, 1, 7, 1], [0, 3, 0, 0]]))
    out, st = map_peaks(X, peaks, CcreIndex.from_frame(cc))
    assert out.toarray().tolist() == [[3, 2, 0], [3, 0, 0]]
    assert st["peaks_overlapping_ccres"] == 2 and st["frac_counts_in_ccres"] == pytest.approx(6 / 14)


# ---------------------------------------------------------------- map_dataset

def _manifest(tmp_path, rows):
    head = "name\tformat\tpath\tgenome\ttissue\tlabels\tbarcodes\n"
    m = tmp_path / "manifest.tsv"
    m.write_text(head + "".join("\t".join(r) + "\n" for r in rows))
    return load_manifest(m)


def test_map_dataset_fragments_with_labels_and_whitelist(tmp_path):
    cc = pd.DataFrame({"chrom": ["chr1", "chr1"], "start": [100, 300], "end": [200, 400]})
    (tmp_path / "f.tsv").write_text("chr1\t110\t120\tA\t1\nchr1\t310\t320\tB\t1\nchr1\t150\t350\tC\t1\n"
                                    "chrUn_KI270302v1\t1\t5\tA\t1\n")
    (tmp_path / "lab.tsv").write_text("barcode\tcell_type\tdonor\nA\tT\td1\nB\tB\td2\n")
    (tmp_path / "wl.txt").write_text("A\nB\n")
    (e,) = _manifest(tmp_path, [["ds", "fragments", "f.tsv", "hg19", "blood", "lab.tsv", "wl.txt"]])
    a, rep = map_dataset(e, cc, "hg19")
    assert a.obs["barcode"].tolist() == ["A", "B"] and a.obs["cell_type"].tolist() == ["T", "B"]
    assert a.obs["cell_id"].tolist() == ["ds:A", "ds:B"] and (a.obs["batch"] == "ds").all()
    assert a.obs["donor"].tolist() == ["d1", "d2"] and (a.obs["tissue"] == "blood").all()
    assert a.X.toarray().tolist() == [[1, 0], [0, 1]]
    assert rep["dropped_other_contigs"] == 1 and rep["skipped_not_whitelisted"] == 1


def test_unknown_chromosome_is_an_error(tmp_path):
    cc = pd.DataFrame({"chrom": ["chr1"], "start": [100], "end": [200]})
    (tmp_path / "f.tsv").write_text("chr1\t110\t120\tA\t1\nchrZ9\t1\t5\tA\t1\n")
    (e,) = _manifest(tmp_path, [["ds", "fragments", "f.tsv", "hg19", "x", "", ""]])
    with pytest.raises(InputFormatError, match=r"f.tsv.*chrZ9"):
        map_dataset(e, cc, "hg19")


def test_missing_obs_key_is_a_config_error(tmp_path):
    import anndata as ad

    a = ad.AnnData(X=sp.csr_matrix(np.ones((2, 1))), obs=pd.DataFrame(index=["x", "y"]),
                   var=pd.DataFrame(index=["chr1:100-200"]))
    a.write_h5ad(tmp_path / "a.h5ad")
    m = tmp_path / "m.tsv"
    m.write_text("name\tformat\tpath\tgenome\tcell_type_key\nds\th5ad\ta.h5ad\thg19\tcelltype\n")
    (e,) = load_manifest(m)
    with pytest.raises(ConfigError, match="line 2.*field 'cell_type_key'.*'celltype' not found"):
        map_dataset(e, pd.DataFrame({"chrom": ["chr1"], "start": [0], "end": [500]}), "hg19")


def test_genome_build_mismatch(tmp_path, data_dir):
    """Fragments put at hg38 TSS positions but declared hg19 are caught before any output."""
    import gzip

    rng = np.random.default_rng(0)
    tss = pd.read_csv(data_dir / "hg38_tss.bed.gz", sep="\t", header=None, usecols=[0, 1])
    tss = tss[tss[0].isin(["chr1", "chr2", "chr3"])].sample(3000, random_state=0)
    s = tss[1].to_numpy() + rng.integers(-100, 100, len(tss))
    fr = pd.DataFrame({"c": tss[0].to_numpy(), "s": s, "e": s + 150, "b": "A", "n": 1})
    with gzip.open(tmp_path / "f.tsv.gz", "wt") as fh:
        fr.to_csv(fh, sep="\t", header=False, index=False)
    (e,) = _manifest(tmp_path, [["ds", "fragments", "f.tsv.gz", "hg19", "x", "", ""]])
    tssd = {"hg19": data_dir / "hg19_tss.bed.gz", "hg38": data_dir / "hg38_tss.bed.gz"}
    cc = pd.DataFrame({"chrom": ["chr1"], "start": [0], "end": [10 ** 6]})
    with pytest.raises(GenomeBuildError, match="declared hg19 but .*look like hg38"):
        map_dataset(e, cc, "hg19", tss=tssd)
    (e38,) = _manifest(tmp_path, [["ds", "fragments", "f.tsv.gz", "hg38", "x", "", ""]])
    a, rep = map_dataset(e38, cc, "hg38", tss=tssd, min_frac_in_ccres=0)
    assert rep["build_detected"] == "hg38"


def test_chain_in_the_wrong_direction_is_an_error(tmp_path):
    cc = pd.DataFrame({"chrom": ["chr1"], "start": [100], "end": [200]})
    (tmp_path / "f.tsv").write_text("chr1\t110\t120\tA\t1\n")
    (e,) = _manifest(tmp_path, [["ds", "fragments", "f.tsv", "hg19", "x", "", ""]])
    with pytest.raises(ConfigError, match=r"line 2.*field 'chain'.*hg38 -> Hg19.*hg19 -> hg38"):
        map_dataset(e, cc, "hg38", chain="builtin:hg38ToHg19")


def test_region_filter_without_tabix(tmp_path):
    p = tmp_path / "f.tsv"
    p.write_text("chr1\t10\t20\tA\t1\nchr1\t150\t160\tB\t1\nchr2\t150\t160\tC\t1\n")
    chunks = list(FragmentReader(p, region=("1", 100, 200)))
    assert sum(len(c) for c in chunks) == 1 and chunks[0].start.tolist() == [150]


def test_geometric_merge_gives_the_same_counts(tmp_path, monkeypatch):
    import epiflow.corpus.mapping as mapping

    rng = np.random.default_rng(5)
    cc = _ccres(rng, overlapping=True)
    fr = _random_intervals(rng, 400)
    fr["barcode"] = rng.choice([f"c{i}" for i in range(30)], len(fr))
    fr["count"] = rng.integers(1, 4, len(fr))
    p = _write_frags(tmp_path / "f.tsv", fr)
    ref = map_fragments(FragmentReader(p), CcreIndex.from_frame(cc))
    monkeypatch.setattr(mapping, "MERGE_MIN_NNZ", 3)  # merge after almost every chunk
    got = map_fragments(FragmentReader(p, chunksize=11), CcreIndex.from_frame(cc))
    assert list(got.barcodes) == list(ref.barcodes)
    assert (got.counts != ref.counts).nnz == 0 and got.counts.shape == ref.counts.shape


@pytest.mark.parametrize("overlapping", [False, True])
@pytest.mark.parametrize("sort", [True, False])
def test_compiled_counting_matches_vectorised_overlaps(tmp_path, overlapping, sort):
    """map_fragments (compiled galloping search) == CcreIndex.query_codes (numpy searchsorted) +
    a scipy COO sum, on coordinate-sorted and shuffled fragments, with fragments on chromosomes
    absent from the cCRE set."""
    rng = np.random.default_rng(11)
    if overlapping:
        cc = _random_intervals(rng, 400, span=200_000, maxlen=3000)
    else:
        rows = []
        for c in ("chr1", "chr2", "chrX"):
            pos = np.sort(rng.choice(np.arange(0, 200_000, 700), 150, replace=False))
            rows += [(c, p, p + rng.integers(50, 600)) for p in pos]
        cc = pd.DataFrame(rows, columns=["chrom", "start", "end"])
    fr = _random_intervals(rng, 20_000, chroms=("chr1", "chr2", "chrX", "chr5"), span=200_000, maxlen=900)
    fr["barcode"] = rng.choice([f"c{i}" for i in range(50)], len(fr))
    fr["count"] = rng.integers(1, 5, len(fr))
    if sort:
        fr = fr.sort_values(["chrom", "start"], kind="stable").reset_index(drop=True)
    p = _write_frags(tmp_path / "f.tsv", fr)
    idx = CcreIndex.from_frame(cc)
    got = map_fragments(FragmentReader(p, chunksize=3_001), idx)
    iq, ic = idx.query(fr["chrom"].to_numpy(), fr["start"].to_numpy(), fr["end"].to_numpy())
    rows = pd.Index(got.barcodes).get_indexer(fr["barcode"].to_numpy())
    ref = sp.coo_matrix((fr["count"].to_numpy()[iq].astype(np.float32), (rows[iq], ic)),
                        shape=got.counts.shape).tocsr()
    assert (got.counts != ref).nnz == 0 and got.counts.nnz > 1000
    assert got.counts.has_canonical_format
    hit = np.zeros(len(fr), bool)
    hit[iq] = True
    np.testing.assert_array_equal(got.n_in_ccres, np.bincount(rows[hit], minlength=len(got.barcodes)))
