import gzip
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from epiflow.corpus.readers import (
    FragmentReader,
    parse_peak_names,
    read_barcode_list,
    read_fragments,
    read_labels,
    read_matrix,
)
from epiflow.errors import InputFormatError

LINES = [
    "chr1\t100\t200\tAAA\t1",
    "chr1\t150\t300\tBBB\t2",
    "1\t400\t500\tAAA\t1",
    "chrX\t10\t20\tCCC\t3",
    "chr2\t5\t5\tBBB\t1",
]


def _frag(tmp_path: Path, lines, name="f.tsv", gz=False, header=()):
    text = "".join(h + "\n" for h in header) + "".join(ln + "\n" for ln in lines)
    p = tmp_path / name
    if gz:
        with gzip.open(p, "wt") as fh:
            fh.write(text)
    else:
        p.write_text(text)
    return p


@pytest.mark.parametrize("gz", [False, True])
def test_fragments_plain_gzip_header_and_chunks(tmp_path, gz):
    p = _frag(tmp_path, LINES, gz=gz, name="f.tsv.gz" if gz else "f.tsv", header=["# id=x", "# v=2"])
    one = read_fragments(p)
    many = read_fragments(p, chunksize=2)
    pd.testing.assert_frame_equal(one, many)
    assert one["chrom"].tolist() == ["chr1", "chr1", "chr1", "chrX", "chr2"]  # '1' normalised
    assert one["barcode"].tolist() == ["AAA", "BBB", "AAA", "CCC", "BBB"]
    assert one["count"].tolist() == [1, 2, 1, 3, 1]
    rd = FragmentReader(p, chunksize=2)
    list(rd)
    assert list(rd.barcodes) == ["AAA", "BBB", "CCC"]  # order of first appearance
    assert rd.stats["lines"] == 5


def test_bgzip_like_multimember_gzip_and_four_columns(tmp_path):
    p = tmp_path / "m.tsv.gz"
    with open(p, "wb") as fh:  # BGZF is a series of gzip members
        fh.write(gzip.compress(b"chr1\t1\t10\tA\n"))
        fh.write(gzip.compress(b"chr1\t5\t20\tB\n"))
    df = read_fragments(p)
    assert len(df) == 2 and df["count"].tolist() == [1, 1]


def test_whitelist_filters_and_orders(tmp_path):
    p = _frag(tmp_path, LINES)
    rd = FragmentReader(p, whitelist=["CCC", "AAA"], chunksize=2)
    chunks = list(rd)
    assert list(rd.barcodes) == ["CCC", "AAA"]
    assert sum(len(c) for c in chunks) == 3 and rd.stats["skipped_not_whitelisted"] == 2
    codes = np.concatenate([c.barcode for c in chunks])
    assert codes.tolist() == [1, 1, 0]


def test_duplicate_barcodes_in_whitelist(tmp_path):
    wl = tmp_path / "wl.txt"
    wl.write_text("AAA\nBBB\nAAA\n")
    with pytest.raises(InputFormatError, match=r"wl.txt.*line 3.*duplicate barcode 'AAA'"):
        read_barcode_list(wl)
    with pytest.raises(InputFormatError, match="duplicate barcode"):
        FragmentReader(_frag(tmp_path, LINES), whitelist=wl)


@pytest.mark.parametrize("bad,line,what", [
    ("chr1\tx10\t20\tAAA\t1", 3, "not integers"),
    ("chr1\t10\t20", 3, "fields"),
    ("chr1\t30\t20\tAAA\t1", 3, "start 30 > end 20"),
    ("chr1\t-5\t20\tAAA\t1", 3, "negative start"),
    ("chr1\t10\t20\tAAA\t-1", 3, "count"),
    ("chr1\t10\t20\tAAA\tnan", 3, "count"),
    ("chr1\t10\t20\tAAA\t1\textra", 3, "fields"),
])
@pytest.mark.parametrize("chunksize", [1000, 2])
def test_malformed_lines_name_file_and_line(tmp_path, bad, line, what, chunksize):
    lines = LINES[:2] + [bad] + LINES[2:]
    p = _frag(tmp_path, lines)
    with pytest.raises(InputFormatError) as ei:
        read_fragments(p, chunksize=chunksize)
    msg = str(ei.value)
    assert str(p) in msg and f"line {line}" in msg and what in msg and "Fix:" in msg


def test_line_numbers_count_header_lines(tmp_path):
    p = _frag(tmp_path, LINES[:3] + ["chr1\t9\t8\tA\t1"], header=["# a", "# b"])
    with pytest.raises(InputFormatError, match="line 6"):
        read_fragments(p, chunksize=2)


def test_truncated_last_line_and_truncated_gzip(tmp_path):
    p = tmp_path / "t.tsv"
    p.write_text("\n".join(LINES) + "\nchr1\t100")  # cut in the middle of a line
    with pytest.raises(InputFormatError, match="line 6"):
        read_fragments(p)
    g = tmp_path / "t.tsv.gz"
    data = gzip.compress(("\n".join(LINES * 2000) + "\n").encode())
    g.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFormatError, match="t.tsv.gz.*(truncated|ends early|corrupt)"):
        read_fragments(g)


def test_empty_and_header_only_files(tmp_path):
    e = tmp_path / "e.tsv"
    e.write_text("")
    with pytest.raises(InputFormatError, match="e.tsv.*empty"):
        FragmentReader(e)
    h = _frag(tmp_path, [], name="h.tsv", header=["# only header"])
    with pytest.raises(InputFormatError, match="no fragments"):
        FragmentReader(h)
    with pytest.raises(InputFormatError, match="not found"):
        FragmentReader(tmp_path / "absent.tsv")


def test_labels_table(tmp_path):
    p = tmp_path / "l.tsv"
    p.write_text("barcode\tcell_type\nA\tT\nB\tB\n")
    assert read_labels(p).loc["B", "cell_type"] == "B"
    p.write_text("barcode\tcell_type\nA\tT\nA\tB\n")
    with pytest.raises(InputFormatError, match="line 3.*duplicate barcode 'A'"):
        read_labels(p)


# ---------------------------------------------------------------- matrices

def test_parse_peak_names_styles_and_errors():
    df = parse_peak_names(["chr1:100-200", "chr2_5_50", "X-7-9", "chrUn_KI270302v1_10_20"])
    assert df["chrom"].tolist() == ["chr1", "chr2", "chrX", "chrUn_KI270302v1"]
    assert df["start"].tolist() == [100, 5, 7, 10] and df["end"].tolist() == [200, 50, 9, 20]
    assert parse_peak_names(["chr1:101-200"], one_based=True)["start"].tolist() == [100]
    with pytest.raises(InputFormatError, match=r"field 'var_names'.*peak name 'geneA' \(feature 2\)"):
        parse_peak_names(["chr1:1-2", "geneA"], path="x.h5ad")
    with pytest.raises(InputFormatError, match="start 50 and end 10"):
        parse_peak_names(["chr1:50-10"])


def _adata(var_names, X=None, obs_names=None, var=None):
    X = sp.csr_matrix(np.array([[1, 0, 2], [0, 3, 0]], dtype=np.int32)) if X is None else X
    a = ad.AnnData(X=X, obs=pd.DataFrame(index=obs_names or ["c1", "c2"]),
                   var=var if var is not None else pd.DataFrame(index=var_names))
    return a


@pytest.mark.parametrize("names", [["chr1:10-20", "chr1:30-40", "chr2:5-9"],
                                   ["chr1_10_20", "chr1_30_40", "chr2_5_9"],
                                   ["chr1-10-20", "chr1-30-40", "chr2-5-9"]])
def test_h5ad_peak_names(tmp_path, names):
    p = tmp_path / "a.h5ad"
    _adata(names).write_h5ad(p)
    a = read_matrix(p, "h5ad")
    assert a.var["start"].tolist() == [10, 30, 5] and a.var["chrom"].tolist() == ["chr1", "chr1", "chr2"]
    assert a.X.toarray().tolist() == [[1, 0, 2], [0, 3, 0]]


def test_h5ad_columns_win_over_names(tmp_path):
    var = pd.DataFrame({"chrom": ["1", "1", "2"], "start": [1, 2, 3], "end": [5, 6, 7]},
                       index=["p1", "p2", "p3"])
    p = tmp_path / "a.h5ad"
    _adata(None, var=var).write_h5ad(p)
    a = read_matrix(p, "h5ad")
    assert a.var["chrom"].tolist() == ["chr1", "chr1", "chr2"] and a.var["end"].tolist() == [5, 6, 7]


def test_h5ad_bad_inputs(tmp_path):
    p = tmp_path / "bad.h5ad"
    _adata(["chr1:1-2", "peak7", "chr2:1-9"]).write_h5ad(p)
    with pytest.raises(InputFormatError, match="bad.h5ad.*'peak7'"):
        read_matrix(p, "h5ad")
    _adata(["chr1:1-2", "chr1:3-4", "chr2:1-9"], obs_names=["c1", "c1"]).write_h5ad(p)
    with pytest.raises(InputFormatError, match="duplicate barcode 'c1'"):
        read_matrix(p, "h5ad")
    for val in (-1.0, np.nan):
        X = sp.csr_matrix(np.array([[1, 0, val], [0, 3, 0]], dtype=np.float32))
        _adata(["chr1:1-2", "chr1:3-4", "chr2:1-9"], X=X).write_h5ad(p)
        with pytest.raises(InputFormatError, match="(negative|NaN)"):
            read_matrix(p, "h5ad")
    (tmp_path / "junk.h5ad").write_text("not hdf5")
    with pytest.raises(InputFormatError, match="junk.h5ad"):
        read_matrix(tmp_path / "junk.h5ad", "h5ad")


def _write_10x_h5(path, X, barcodes, names, ftypes):
    M = sp.csc_matrix(sp.csr_matrix(X).T)  # features x barcodes, stored CSC
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = M.data, M.indices, M.indptr
        g["shape"] = np.array(M.shape)
        g["barcodes"] = np.array(barcodes, dtype="S")
        fg = g.create_group("features")
        fg["id"] = np.array(names, dtype="S")
        fg["name"] = np.array(names, dtype="S")
        fg["feature_type"] = np.array(ftypes, dtype="S")


def test_10x_h5_multiome_keeps_peaks(tmp_path):
    X = np.array([[1, 5, 0, 2], [0, 7, 3, 0]])
    p = tmp_path / "filtered_feature_bc_matrix.h5"
    _write_10x_h5(p, X, ["A-1", "B-1"], ["chr1:1-10", "GENE1", "chr2:5-50", "chrX:1-3"],
                  ["Peaks", "Gene Expression", "Peaks", "Peaks"])
    a = read_matrix(p, "10x_h5")
    assert a.obs_names.tolist() == ["A-1", "B-1"]
    assert a.var["chrom"].tolist() == ["chr1", "chr2", "chrX"]
    assert a.X.toarray().tolist() == [[1, 0, 2], [0, 3, 0]]


def test_10x_h5_bad_peak_name(tmp_path):
    p = tmp_path / "x.h5"
    _write_10x_h5(p, np.eye(2), ["A", "B"], ["chr1:1-10", "oops"], ["Peaks", "Peaks"])
    with pytest.raises(InputFormatError, match="'oops'"):
        read_matrix(p, "10x_h5")


@pytest.mark.parametrize("gz", [False, True])
def test_10x_mtx_folder(tmp_path, gz):
    d = tmp_path / "mtx"
    d.mkdir()
    X = sp.coo_matrix(np.array([[1, 0, 4], [0, 2, 0]]).T)  # peaks x barcodes
    scipy.io.mmwrite(str(d / "matrix.mtx"), X)
    (d / "barcodes.tsv").write_text("A\nB\n")
    (d / "peaks.bed").write_text("chr1\t1\t10\nchr1\t20\t30\nchr2\t1\t5\n")
    if gz:
        for n in ("matrix.mtx", "barcodes.tsv", "peaks.bed"):
            (d / (n + ".gz")).write_bytes(gzip.compress((d / n).read_bytes()))
            (d / n).unlink()
    a = read_matrix(d, "10x_mtx")
    assert a.X.toarray().tolist() == [[1, 0, 0], [0, 2, 0]][:0] or a.X.toarray().tolist() == [[1, 0, 0], [0, 2, 0]] \
        or a.X.toarray().tolist() == X.toarray().T.tolist()
    assert a.X.toarray().tolist() == X.toarray().T.tolist()
    assert a.var["end"].tolist() == [10, 30, 5]


def test_10x_mtx_truncated_barcodes(tmp_path):
    d = tmp_path / "mtx"
    d.mkdir()
    scipy.io.mmwrite(str(d / "matrix.mtx"), sp.coo_matrix(np.ones((3, 2))))
    (d / "barcodes.tsv.gz").write_bytes(gzip.compress("".join(f"BC{i}\n" for i in range(20000)).encode())[:500])
    (d / "peaks.bed").write_text("chr1\t1\t10\nchr1\t20\t30\nchr2\t1\t5\n")
    with pytest.raises(InputFormatError, match="barcodes.tsv.gz.*truncated or not gzip"):
        read_matrix(d, "10x_mtx")


def test_10x_mtx_mismatch(tmp_path):
    d = tmp_path / "mtx"
    d.mkdir()
    scipy.io.mmwrite(str(d / "matrix.mtx"), sp.coo_matrix(np.ones((3, 2))))
    (d / "barcodes.tsv").write_text("A\nB\nC\n")
    (d / "peaks.bed").write_text("chr1\t1\t10\nchr1\t20\t30\nchr2\t1\t5\n")
    with pytest.raises(InputFormatError, match="does not match"):
        read_matrix(d, "10x_mtx")


# ---------------------------------------------------------------- compiled parser vs general parser

def _py_parse(text: str):
    """Reference: plain Python parse of canonical lines (chrom, start, end, barcode, count)."""
    rows = [ln.rstrip("\r").split("\t") for ln in text.splitlines() if ln and not ln.startswith("#")]
    return [(r[0], int(r[1]), int(r[2]), r[3], int(float(r[4])) if len(r) > 4 else 1) for r in rows]


def _as_rows(df):
    return list(zip(df["chrom"], df["start"], df["end"], df["barcode"], df["count"]))


@pytest.mark.parametrize("chunksize", [3, 50, 100_000])
@pytest.mark.parametrize("gz", [False, True])
def test_many_barcodes_long_and_short_and_many_contigs(tmp_path, chunksize, gz):
    """Thousands of barcodes (1 to 60 bytes, shared prefixes, > 24 bytes compared byte-wise), 150
    contigs: the string tables grow several times; codes follow the order of first appearance."""
    rng = np.random.default_rng(3)
    pref = "ACGTACGTACGTACGTACGTACGTACGT"  # long common prefix: words equal, tail differs
    bcs = ([f"{pref}{i}" for i in range(700)] + [f"B{i}" for i in range(900)]
           + ["x" * k for k in range(1, 60)] + [f"{i:016d}-1" for i in range(600)])
    contigs = [f"chr{i}" for i in range(1, 23)] + [f"chrUn_contig{i}_random" for i in range(128)]
    n = 6000
    lines = [f"{contigs[rng.integers(len(contigs))]}\t{s}\t{s + rng.integers(0, 500)}\t"
             f"{bcs[rng.integers(len(bcs))]}\t{rng.integers(1, 9)}"
             for s in rng.integers(0, 10 ** 9, n)]
    p = _frag(tmp_path, lines, gz=gz, name="f.tsv.gz" if gz else "f.tsv", header=["# h"])
    df = read_fragments(p, chunksize=chunksize)
    ref = _py_parse("\n".join(lines))
    norm = {c: ("chr" + c[3:]) for c in contigs}
    assert _as_rows(df) == [(norm[c], s, e, b, k) for c, s, e, b, k in ref]
    rd = FragmentReader(p, chunksize=chunksize)
    codes = np.concatenate([c.barcode for c in rd])
    first = list(dict.fromkeys(r[3] for r in ref))
    assert list(rd.barcodes) == first
    assert [first[i] for i in codes] == [r[3] for r in ref]


def test_whitelist_with_long_barcodes(tmp_path):
    long_a, long_b = "Q" * 30 + "A", "Q" * 30 + "B"  # equal first 24 bytes
    p = _frag(tmp_path, [f"chr1\t1\t5\t{long_a}\t1", f"chr1\t2\t5\t{long_b}\t2", "chr1\t3\t5\tS\t3"])
    rd = FragmentReader(p, whitelist=[long_b, "S"])
    chunks = list(rd)
    assert np.concatenate([c.barcode for c in chunks]).tolist() == [0, 1]
    assert np.concatenate([c.count for c in chunks]).tolist() == [2, 3]
    assert rd.stats["skipped_not_whitelisted"] == 1


@pytest.mark.parametrize("chunksize", [2, 1000])
def test_non_canonical_lines_read_like_pandas(tmp_path, chunksize):
    """CRLF line ends and counts like '2.0' are not the compiled parser's form: those parts of the
    file go through pandas, with the same meaning and continuous line numbers."""
    canon = [f"chr1\t{i}\t{i + 10}\tC{i % 3}\t{1 + i % 2}" for i in range(20)]
    odd = ["chr2\t5\t9\tD\t2.0", "chr2\t6\t9\tC1\t3\r", "chr2\t7\t9\tE\t1"]
    lines = canon[:10] + odd + canon[10:]
    p = _frag(tmp_path, lines)
    df = read_fragments(p, chunksize=chunksize)
    assert _as_rows(df) == _py_parse("\n".join(lines))
    crlf = tmp_path / "crlf.tsv"
    crlf.write_bytes(("\r\n".join(ln.rstrip("\r") for ln in lines) + "\r\n").encode())
    pd.testing.assert_frame_equal(read_fragments(crlf, chunksize=chunksize), df)
    bad = tmp_path / "bad.tsv"
    bad.write_text("\n".join(lines + ["chr1\t9\t3\tC1\t1"] + canon) + "\n")
    with pytest.raises(InputFormatError, match=r"line 24: start 9 > end 3"):
        read_fragments(bad, chunksize=chunksize)


def test_no_trailing_newline_and_long_file_in_small_reads(tmp_path, monkeypatch):
    import epiflow.corpus.readers as readers

    monkeypatch.setattr(readers, "READ_BYTES_MAX", 1 << 16)  # many reads, lines cut across reads
    lines = [f"chr{1 + i % 3}\t{i}\t{i + 7}\tBC{i % 97}\t{1 + i % 4}" for i in range(20_000)]
    p = tmp_path / "f.tsv.gz"
    with gzip.open(p, "wt") as fh:
        fh.write("\n".join(lines))  # no final newline
    df = read_fragments(p, chunksize=5000)
    assert _as_rows(df) == _py_parse("\n".join(lines))


@pytest.mark.parametrize("threads", [2, 4, 5])
def test_parallel_parse_gives_the_same_chunks(tmp_path, monkeypatch, threads):
    """Buffers parsed by several threads (tables read-only, new barcodes / chromosomes interned
    afterwards in file order) give the same codes, names and counts as one thread; a non-canonical
    line inside a parallel part falls back to the sequential path."""
    import epiflow.corpus.readers as readers

    monkeypatch.setattr(readers, "PARALLEL_MIN_BYTES", 256)
    monkeypatch.setattr(readers, "READ_BYTES_MAX", 1 << 14)
    monkeypatch.setattr(readers, "MAX_NEW_CHROMS", 2)  # parts meeting 3 new contigs fall back
    rng = np.random.default_rng(8)
    contigs = [f"chr{i}" for i in range(1, 23)] + [f"chrUn_c{i}" for i in range(40)]
    bcs = [f"{'ACGT' * 7}{i}" for i in range(300)] + [f"b{i}" for i in range(3000)]
    lines = [f"{contigs[min(int(i / 150), len(contigs) - 1)]}\t{i}\t{i + 9}\t"
             f"{bcs[rng.integers(len(bcs))]}\t{rng.integers(1, 4)}" for i in range(9000)]
    lines[4321] = lines[4321] + ".0"  # '3.0'-style count: not canonical
    p = _frag(tmp_path, lines, gz=True, name="f.tsv.gz")
    one = FragmentReader(p, chunksize=100_000, threads=1)
    many = FragmentReader(p, chunksize=100_000, threads=threads)
    a, b = list(one), list(many)
    cat = lambda cs, f: np.concatenate([getattr(c, f) for c in cs])  # noqa: E731
    for f in ("start", "end", "barcode", "count"):
        np.testing.assert_array_equal(cat(a, f), cat(b, f))
    np.testing.assert_array_equal(np.concatenate([c.chrom for c in a]), np.concatenate([c.chrom for c in b]))
    assert list(one.barcodes) == list(many.barcodes)
    assert [c.first_line for c in b] == list(np.cumsum([0] + [c.n_raw for c in b[:-1]]) + 1)
    wl = FragmentReader(p, chunksize=100_000, threads=threads, whitelist=bcs[::7])
    w1 = FragmentReader(p, chunksize=100_000, threads=1, whitelist=bcs[::7])
    np.testing.assert_array_equal(cat(list(wl), "barcode"), cat(list(w1), "barcode"))


@pytest.mark.parametrize("threads, env, stages", [
    (1, None, set()),
    (2, None, {"epiflow-parse"}),
    (3, None, {"epiflow-parse", "epiflow-inflate"}),
    (None, "1", set()),            # no budget given: the process's (OMP_NUM_THREADS, as Snakemake sets)
    (None, "2", {"epiflow-parse"}),
])
def test_reader_keeps_to_its_thread_budget(tmp_path, monkeypatch, threads, env, stages):
    """``threads`` (else OMP_NUM_THREADS) is the number of busy threads: one thread reads, inflates,
    parses and hands out chunks in the caller's thread; two add a parsing thread; three add the
    inflating thread (and parse buffers on budget - 2 threads)."""
    import threading

    monkeypatch.setenv("OMP_NUM_THREADS", env or "16")
    lines = [f"chr1\t{i}\t{i + 9}\tb{i % 7}\t1" for i in range(3000)]
    p = _frag(tmp_path, lines, gz=True, name="f.tsv.gz")
    seen = set()
    start = threading.Thread.start

    def record(self):
        seen.add(self.name)
        return start(self)

    monkeypatch.setattr(threading.Thread, "start", record)
    reader = FragmentReader(p, chunksize=500, threads=threads)
    n = sum(len(chunk) for chunk in reader)
    assert n == 3000
    assert {s for s in seen if s.startswith("epiflow-")} == stages
    assert reader._nthreads() == 1
    assert FragmentReader(p, threads=6)._nthreads() == 4 and FragmentReader(p, threads=9)._nthreads() == 4
