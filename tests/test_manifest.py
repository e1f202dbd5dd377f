import hashlib
from pathlib import Path

import pytest

from epiflow.corpus.manifest import get_dataset, load_manifest, resolve_dataset
from epiflow.errors import ConfigError

HEADER = "name\tformat\tpath\tsha256\tgenome\ttissue\n"


def _write(tmp_path: Path, body: str, name="manifest.tsv") -> Path:
    p = tmp_path / name
    p.write_text(body)
    return p


def _data(tmp_path: Path, name="a.tsv", text="chr1\t1\t2\tAAA\t1\n"):
    p = tmp_path / name
    p.write_text(text)
    return p, hashlib.sha256(text.encode()).hexdigest()


def test_tsv_manifest_resolves_relative_paths_and_checks_sha(tmp_path):
    _, sha = _data(tmp_path)
    m = _write(tmp_path, HEADER + f"ds1\tfragments\ta.tsv\t{sha}\thg19\tblood\n")
    (e,) = load_manifest(m)
    assert (e.name, e.format, e.genome, e.tissue, e.line) == ("ds1", "fragments", "hg19", "blood", 2)
    assert resolve_dataset(e) == tmp_path / "a.tsv"
    assert get_dataset([e], "ds1") is e
    with pytest.raises(ConfigError, match="no dataset named 'zz'.*ds1"):
        get_dataset([e], "zz")


def test_yaml_manifest_and_extra_columns(tmp_path):
    _data(tmp_path)
    m = _write(tmp_path, "datasets:\n  - {name: d, format: fragments, path: a.tsv, genome: hg38, donor: x}\n",
               "m.yaml")
    (e,) = load_manifest(m)
    assert e.genome == "hg38" and e.extra == {"donor": "x"} and e.line == 1


def test_missing_file_names_manifest_line_and_field(tmp_path):
    m = _write(tmp_path, HEADER + "ok\tfragments\tnope.tsv\t\thg19\tx\n")
    (e,) = load_manifest(m)
    with pytest.raises(ConfigError) as ei:
        resolve_dataset(e)
    msg = str(ei.value)
    assert str(m) in msg and "line 2" in msg and "field 'path'" in msg and "nope.tsv" in msg and "Fix:" in msg


def test_wrong_sha256_is_an_error(tmp_path):
    _data(tmp_path)
    m = _write(tmp_path, HEADER + f"ds\tfragments\ta.tsv\t{'0' * 64}\thg19\tx\n")
    (e,) = load_manifest(m)
    with pytest.raises(ConfigError, match=r"line 2.*field 'sha256'.*sha256 of .*a.tsv is"):
        resolve_dataset(e)
    assert resolve_dataset(e, verify=False) == tmp_path / "a.tsv"


@pytest.mark.parametrize("row,field", [
    ("ds\tfastq\ta.tsv\t\thg19\tx\n", "format"),
    ("ds\tfragments\ta.tsv\t\tmm10\tx\n", "genome"),
    ("ds\tfragments\t\t\thg19\tx\n", "path"),
    ("ds\tfragments\ta.tsv\tnothex\thg19\tx\n", "sha256"),
    ("bad name\tfragments\ta.tsv\t\thg19\tx\n", "name"),
])
def test_bad_entries(tmp_path, row, field):
    m = _write(tmp_path, HEADER + row)
    with pytest.raises(ConfigError, match=rf"line 2.*field '{field}'"):
        load_manifest(m)


def test_duplicate_names_and_missing_columns(tmp_path):
    m = _write(tmp_path, HEADER + "d\th5ad\ta\t\thg19\tx\n" + "d\th5ad\tb\t\thg19\tx\n")
    with pytest.raises(ConfigError, match="line 3.*used twice"):
        load_manifest(m)
    m2 = _write(tmp_path, "name\tpath\nd\ta\n", "m2.tsv")
    with pytest.raises(ConfigError, match="missing column"):
        load_manifest(m2)
    with pytest.raises(ConfigError, match="not found"):
        load_manifest(tmp_path / "absent.tsv")
    m3 = _write(tmp_path, HEADER, "m3.tsv")
    with pytest.raises(ConfigError, match="lists no datasets"):
        load_manifest(m3)


def test_data_mirror_is_used_for_urls(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    text = "chr1\t1\t2\tAAA\t1\n"
    (mirror / "frags.tsv.gz").write_text(text)
    sha = hashlib.sha256(text.encode()).hexdigest()
    m = _write(tmp_path, "name\tformat\turl\tsha256\tgenome\n"
                         f"d\tfragments\thttps://example.invalid/x/frags.tsv.gz\t{sha}\thg38\n")
    (e,) = load_manifest(m)
    assert resolve_dataset(e, data_mirror=mirror) == mirror / "frags.tsv.gz"


def test_unreachable_url_without_mirror_is_a_clear_error(tmp_path):
    m = _write(tmp_path, "name\tformat\turl\tgenome\nd\tfragments\tfile:///nonexistent/dir/f.tsv\thg38\n")
    (e,) = load_manifest(m)
    with pytest.raises(ConfigError, match="cannot download.*data_mirror"):
        resolve_dataset(e, download_dir=tmp_path / "dl")
    assert not any((tmp_path / "dl").glob("*")) if (tmp_path / "dl").exists() else True
