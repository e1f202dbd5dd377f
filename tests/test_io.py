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
