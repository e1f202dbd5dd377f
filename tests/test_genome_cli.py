"""CLI verbs detect-build and liftover."""

import json

import numpy as np
import pandas as pd
import pytest

from epiflow.cli import main
from epiflow.genome.bed import read_bed

CHAIN = """chain 100 chr1 1000 + 0 600 chr1 2000 + 1000 1610 7
300 0 10
300
"""


def test_liftover_cli_handmade(tmp_path, capsys):
    (tmp_path / "c.chain").write_text(CHAIN)
    (tmp_path / "in.bed").write_text("chr1\t400\t450\tb\n1\t10\t50\ta\nchr1\t290\t310\tsplit\nchr5\t1\t2\tz\n")
    rc = main(["liftover", str(tmp_path / "in.bed"), "--chain", str(tmp_path / "c.chain"),
               "--out", str(tmp_path / "out.bed"), "--report", str(tmp_path / "r.json")])
    assert rc == 0
    out = read_bed(tmp_path / "out.bed")
    # sorted output; 400-450 sits in the second block (after a 10-bp destination gap)
    assert list(out.itertuples(index=False, name=None)) == [("chr1", 1010, 1050, "a"), ("chr1", 1410, 1460, "b")]
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["n_in"] == 4 and rep["n_kept"] == 2 and rep["fraction_lost"] == 0.5
    assert rep["reasons"]["size_changed"] == 1 and rep["reasons"]["unknown_chrom"] == 1
    assert json.loads(capsys.readouterr().out)["n_kept"] == 2


def test_liftover_cli_errors(tmp_path, capsys):
    (tmp_path / "in.bed").write_text("chr1\t1\t2\n")
    (tmp_path / "bad.chain").write_text("chain 1 chr1 10 + 0 5 chr1 10 + 0 5 1\n3 1\n1\n")
    rc = main(["liftover", str(tmp_path / "in.bed"), "--chain", str(tmp_path / "bad.chain"),
               "--out", str(tmp_path / "o.bed")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "bad.chain" in err and "line 2" in err
    assert not (tmp_path / "o.bed").exists()
    rc = main(["liftover", str(tmp_path / "in.bed"), "--chain", str(tmp_path / "nope.chain"),
               "--out", str(tmp_path / "o.bed")])
    assert rc == 2 and "chain file not found" in capsys.readouterr().err


def test_detect_build_cli_synthetic(tmp_path, capsys):
    rng = np.random.default_rng(0)
    tss_a = rng.integers(0, 5_000_000, 300)
    tss_b = tss_a + 200_000
    for name, pos in (("hg19", tss_a), ("hg38", tss_b)):
        pd.DataFrame({"c": "chr1", "s": pos, "e": pos + 1}).to_csv(tmp_path / f"{name}_tss.bed", sep="\t",
                                                                   header=False, index=False)
    mid = np.sort(rng.choice(tss_a, 1000) + rng.integers(-300, 300, 1000))
    pd.DataFrame({"c": "1", "s": mid - 100, "e": mid + 100}).to_csv(tmp_path / "peaks.bed", sep="\t",
                                                                    header=False, index=False)
    rc = main(["detect-build", str(tmp_path / "peaks.bed"), "--tss-dir", str(tmp_path),
               "--report", str(tmp_path / "rep.json")])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["build"] == "hg19" and rep["scores"]["hg19"] == 1.0
    assert json.loads((tmp_path / "rep.json").read_text())["build"] == "hg19"
    rc = main(["detect-build", str(tmp_path / "peaks.bed"), "--tss-hg19", str(tmp_path / "hg19_tss.bed"),
               "--tss-hg38", str(tmp_path / "hg38_tss.bed"), "--declared", "hg38"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "declared hg38" in err and "looks like" not in err and "look like hg19" in err
    rc = main(["detect-build", str(tmp_path / "peaks.bed"), "--tss-hg19", str(tmp_path / "hg19_tss.bed")])
    assert rc == 2 and "TSS files of both builds" in capsys.readouterr().err


def test_detect_build_cli_unknown_declared_is_checked_first(tmp_path, capsys, monkeypatch):
    import epiflow.genome.build as B

    def no_scoring(*a, **k):
        raise AssertionError("scored before checking --declared")

    monkeypatch.setattr(B, "load_intervals", no_scoring)
    monkeypatch.setattr(B, "detect_build", no_scoring)
    rc = main(["detect-build", str(tmp_path / "peaks.bed"), "--tss-dir", str(tmp_path), "--declared", "hg99"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert "'--declared'" in err and "hg99" in err and "Fix:" in err, err


@pytest.mark.realdata
def test_detect_build_cli_real(data_dir, capsys):
    rc = main(["detect-build", str(data_dir / "buenrostro2018_bm0828.h5ad"), "--tss-dir", str(data_dir),
               "--declared", "hg19"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["build"] == "hg19"
    rc = main(["detect-build", str(data_dir / "pbmc_multiome_fragments.tsv.gz"), "--tss-dir", str(data_dir),
               "--declared", "hg19", "--max-lines", "50000"])
    assert rc == 2
    assert "pbmc_multiome_fragments.tsv.gz" in capsys.readouterr().err
