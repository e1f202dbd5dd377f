"""Output helpers of epiflow.io: the up-front writability check, atomic writes."""

from __future__ import annotations

import pytest

from epiflow.errors import ConfigError
from epiflow.io import check_writable


def test_check_writable_refuses_an_existing_path_of_the_other_kind(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match=r"d: exists as a folder, but the --out path must be a file.*Fix:"):
        check_writable(tmp_path / "d", what="--out path", kind="file")
    with pytest.raises(ConfigError, match=r"f.txt: exists as a file, but the --out path must be a folder.*Fix:"):
        check_writable(tmp_path / "f.txt", what="--out path", kind="folder")
    # the right kind, a new path, or no declared kind: accepted
    check_writable(tmp_path / "f.txt", kind="file")
    check_writable(tmp_path / "d", kind="folder")
    check_writable(tmp_path / "new" / "x", kind="file")
    check_writable(tmp_path / "new", kind="folder")
    check_writable(tmp_path / "d")
    check_writable(tmp_path / "f.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.txt"]  # nothing created


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_folder_mode_is_what_mkdir_gives(tmp_path, umask):
    import os

    from epiflow.io import folder_mode

    old = os.umask(umask)
    try:
        (tmp_path / "plain").mkdir()
        assert folder_mode() == (tmp_path / "plain").stat().st_mode & 0o777 == 0o777 & ~umask
        assert os.umask(umask) == umask  # the umask is left as it was
    finally:
        os.umask(old)


def test_removed_if_left_empty_removes_only_the_empty_folders_the_block_made(tmp_path):
    from epiflow.io import removed_if_left_empty

    with pytest.raises(RuntimeError):
        with removed_if_left_empty(tmp_path / "a" / "b") as d:
            d.mkdir(parents=True)
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with removed_if_left_empty(tmp_path / "a" / "b") as d:
            d.mkdir(parents=True)
            (d / "metrics.csv").write_text("x")  # the run wrote something: kept
            raise RuntimeError
    assert (tmp_path / "a" / "b" / "metrics.csv").exists()
    (tmp_path / "a" / "b" / "metrics.csv").unlink()
    with pytest.raises(RuntimeError):
        with removed_if_left_empty(tmp_path / "a" / "b"):  # existed before: kept
            raise RuntimeError
    assert (tmp_path / "a" / "b").is_dir()
    with removed_if_left_empty(tmp_path / "c") as d:  # no error: nothing removed
        d.mkdir()
    assert (tmp_path / "c").is_dir()


def test_atomic_path_folder_replaces_an_existing_folder_only_when_the_block_succeeds(tmp_path):
    from epiflow.io import atomic_path

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(out, suffix="") as tmp:
            tmp.mkdir()
            (tmp / "half.txt").write_text("x")
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "old.txt").read_text() == "old"
    with atomic_path(out, suffix="") as tmp:  # a rename alone refuses a folder that is not empty
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no '.out.XXXX.old'
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="f: exists as a file, but the output is a folder"):
        with atomic_path(tmp_path / "f", suffix="") as tmp:
            tmp.mkdir()
    assert (tmp_path / "f").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["f", "out"]
