"""epiflow's h5ad writing under pandas 3 (string columns are StringDtype there by default)."""
from __future__ import annotations

import importlib.metadata

import anndata as ad
import pytest

import epiflow


@pytest.fixture
def restore_setting(monkeypatch):
    before = ad.settings.allow_write_nullable_strings
    monkeypatch.delenv("ANNDATA_ALLOW_WRITE_NULLABLE_STRINGS", raising=False)
    yield
    ad.settings.allow_write_nullable_strings = before


@pytest.mark.parametrize("pandas_version, switched", [("3.0.1", True), ("2.3.3", False)])
def test_nullable_string_writes_are_allowed_under_pandas3_only(monkeypatch, restore_setting, pandas_version,
                                                               switched):
    import os

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: pandas_version if name == "pandas" else real(name))
    ad.settings.allow_write_nullable_strings = False
    epiflow._anndata_pandas3()
    assert (os.environ.get("ANNDATA_ALLOW_WRITE_NULLABLE_STRINGS") == "1") is switched
    assert ad.settings.allow_write_nullable_strings is switched


def test_string_dtype_h5ad_roundtrip_after_switch(tmp_path, restore_setting):
    """What failed on the GPU image (pandas 3): writing obs with a StringDtype index."""
    import numpy as np
    import pandas as pd

    obs = pd.DataFrame({"cell_type": pd.array(["a", "b"], dtype="string")},
                       index=pd.Index(["c1", "c2"], dtype="string"))
    a = ad.AnnData(X=np.zeros((2, 3), dtype=np.float32), obs=obs)
    ad.settings.allow_write_nullable_strings = True
    a.write_h5ad(tmp_path / "x.h5ad")
    back = ad.read_h5ad(tmp_path / "x.h5ad")
    assert list(back.obs_names) == ["c1", "c2"] and list(back.obs["cell_type"]) == ["a", "b"]
