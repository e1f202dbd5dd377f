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


def test_10x_mtx_mismatch(tmp_path):
    d = tmp_path / "mtx"
    d.mkdir()
    scipy.io.mmwrite(str(d / "matrix.mtx"), sp.coo_matrix(np.ones((3, 2))))
    (d / "barcodes.tsv").write_text("A\nB\nC\n")
    (d / "peaks.bed").write_text("chr1\t1\t10\nchr1\t20\t30\nchr2\t1\t5\n")
    with pytest.raises(InputFormatError, match="does not match"):
        read_matrix(d, "10x_mtx")
