"""BED reading/writing and chromosome checks, including bad input (errors name file and line)."""

import gzip

import numpy as np
import pandas as pd
import pytest

from epiflow.errors import ConfigError, InputFormatError
from epiflow.genome.bed import normalize_genome, primary_mask, read_bed, validate_chroms, write_bed


def _write(tmp_path, text, name="x.bed", gz=False):
    p = tmp_path / (name + (".gz" if gz else ""))
    if gz:
        with gzip.open(p, "wt") as fh:
            fh.write(text)
    else:
        p.write_text(text)
    return p


@pytest.mark.parametrize("gz", [False, True])
def test_read_bed_basic(tmp_path, gz):
    text = ("track name=peaks\nbrowser position chr1:1-100\n# comment\n"
            "1\t10\t20\tp1\t5\t+\n"
            "chrX\t30\t45\tp2\t7\t-\n"
            "\n# mid-file comment\n"
            "MT\t0\t5\tp3\t0\t.\n")
    df = read_bed(_write(tmp_path, text, gz=gz))
    assert df.columns.tolist() == ["chrom", "start", "end", "name", "score", "strand"]
    assert df["chrom"].tolist() == ["chr1", "chrX", "chrM"]
    assert df["start"].tolist() == [10, 30, 0] and df["end"].tolist() == [20, 45, 5]
    assert df["start"].dtype == np.int64
    assert df["name"].tolist() == ["p1", "p2", "p3"]
    assert df["score"].tolist() == [5, 7, 0]
    assert df["strand"].tolist() == ["+", "-", "."]


def test_read_bed_keeps_file_order_and_ragged_and_spaces(tmp_path):
    df = read_bed(_write(tmp_path, "chr2\t5\t9\nchr1\t1\t3\tname_only\nchr1\t0\t2\n"))
    assert df["chrom"].tolist() == ["chr2", "chr1", "chr1"]  # not re-sorted
    assert df["name"].tolist() == ["", "name_only", ""]
    sp = read_bed(_write(tmp_path, "chr3 1 4\nchr3  5   8\n", name="s.bed"))
    assert sp["end"].tolist() == [4, 8]


def test_read_bed_real_tss(data_dir):
    df = read_bed(data_dir / "hg38_tss.bed.gz")
    assert len(df) == 33806
    assert (df["end"] - df["start"] == 1).all()
    assert set(df["strand"]) <= {"+", "-"}


@pytest.mark.parametrize("text, line, words", [
    ("chr1\t10\t20\nchr1\tten\t30\n", 2, "non-integer start"),
    ("chr1\t10\t20\nchr1\t10\t30.5\n", 2, "non-integer end"),
    ("# h\nchr1\t50\t20\n", 2, "start 50 > end 20"),
    ("chr1\t-5\t20\n", 1, "negative start"),
    ("chr1\t10\t20\nchr1\t10\n", 2, "2 column(s)"),
    ("chr1 10\n", 1, "at least 3 columns"),
    ("chr1\t10\t20\tx\t1\t+\nchr1\t10\t20\ty\t1\t+\textra\nchr1\t10\n", 3, "2 column(s)"),
])
def test_read_bed_bad_input_names_file_and_line(tmp_path, text, line, words):
    p = _write(tmp_path, text)
    with pytest.raises(InputFormatError) as ei:
        read_bed(p)
    msg = str(ei.value)
    assert str(p) in msg and f"line {line}" in msg and words in msg, msg


def test_read_bed_empty_missing_and_min_columns(tmp_path):
    p = _write(tmp_path, "track x\n# only comments\n\n")
    with pytest.raises(InputFormatError, match="empty BED"):
        read_bed(p)
    with pytest.raises(InputFormatError, match="empty BED"):
        read_bed(_write(tmp_path, "", name="e.bed", gz=True))
    with pytest.raises(InputFormatError, match="not found"):
        read_bed(tmp_path / "nope.bed")
    p = _write(tmp_path, "chr1\t1\t2\n", name="m.bed")
    with pytest.raises(InputFormatError, match="at least 4 needed"):
        read_bed(p, min_columns=4)
    with pytest.raises(InputFormatError) as ei:  # the fix lists the columns the caller needs
        read_bed(p, min_columns=6)
    assert "at least 6 needed" in str(ei.value) and "chrom, start, end, name, score and strand" in str(ei.value)
    with pytest.raises(InputFormatError) as ei:
        read_bed(_write(tmp_path, "chr1\tx\t2\n", name="n.bed"), name="dataset pbmc")
    assert "dataset pbmc" in str(ei.value)


def _gz_bytes(text: str) -> bytes:
    return gzip.compress(text.encode())


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_read_bed_truncated_or_corrupt_gzip_names_file(tmp_path, damage):
    rng = np.random.default_rng(0)
    s = np.sort(rng.integers(0, 10 ** 8, 20000))
    data = _gz_bytes("".join(f"chr1\t{a}\t{a + 100}\tp{i}\n" for i, a in enumerate(s)))
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = data[:200] + bytes(b ^ 0x55 for b in data[200:400]) + data[400:]
    p = tmp_path / "t.bed.gz"
    p.write_bytes(data)
    with pytest.raises(InputFormatError, match="cannot decompress the BED file") as ei:
        read_bed(p, name="ds")
    msg = str(ei.value)
    assert str(p) in msg and "(ds)" in msg and "re-download" in msg, msg


@pytest.mark.parametrize("gz", [False, True])
def test_write_bed_roundtrip_atomic(tmp_path, gz):
    df = pd.DataFrame({"name": ["a", "b"], "chrom": ["chr1", "chr2"], "start": [1, 5], "end": [3, 9]})
    p = tmp_path / ("o.bed.gz" if gz else "o.bed")
    write_bed(df, p)
    back = read_bed(p)
    assert back.columns.tolist() == ["chrom", "start", "end", "name"]
    assert back["name"].tolist() == ["a", "b"] and back["end"].tolist() == [3, 9]
    assert sorted(x.name for x in tmp_path.iterdir()) == [p.name]  # no temp files left
    with pytest.raises(InputFormatError, match="column 'end' missing"):
        write_bed(df.drop(columns="end"), tmp_path / "bad.bed")
    assert not (tmp_path / "bad.bed").exists()


def test_validate_chroms(tmp_path):
    validate_chroms(["1", "chr2", "X", "chrY", "MT"], genome="hg38")  # all primary after normalising
    validate_chroms([], genome="hg19")
    bad = ["chr1"] * 5 + ["chr1_KI270706v1_random"] * 3 + ["GL000220.1"] + ["chrEBV"]
    with pytest.raises(InputFormatError) as ei:
        validate_chroms(bad, genome="hg38", path="peaks.bed")
    msg = str(ei.value)
    assert "peaks.bed" in msg and "chr1_KI270706v1_random (3)" in msg and "chrEBV (1)" in msg
    assert "filter them out or set allow_other / drop_unknown" in msg
    assert "5 of 10 records" in msg
    validate_chroms(bad, genome="hg38", allow_other=True)  # only logged
    with pytest.raises(ConfigError, match="unknown genome build"):
        validate_chroms(["chr1"], genome="mm10")
    assert primary_mask(bad).sum() == 5


def test_normalize_genome():
    assert normalize_genome("GRCh38") == "hg38" and normalize_genome("hg19") == "hg19"
    assert normalize_genome("GRCh37") == "hg19"
    with pytest.raises(ConfigError):
        normalize_genome("hg18")
