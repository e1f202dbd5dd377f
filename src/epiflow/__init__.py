"""epiflow: an open, reproducible EpiAgent."""
__version__ = "0.1.0"


def _anndata_pandas3() -> None:
    """Let anndata write pandas 3's default string columns.

    pandas >= 3 stores text as ``StringDtype`` by default, and anndata 0.11-0.12 refuses to write
    such columns (and obs/var indices) unless ``allow_write_nullable_strings`` is set, so every
    h5ad that epiflow writes would fail there. The files it then writes need anndata >= 0.11 to
    read, which the lock pins anyway. Nothing changes under pandas 2 (the lock's version).
    """
    import os
    import sys
    from importlib.metadata import PackageNotFoundError, version

    try:
        if int(version("pandas").split(".")[0]) < 3:
            return
    except (PackageNotFoundError, ValueError):
        return
    os.environ.setdefault("ANNDATA_ALLOW_WRITE_NULLABLE_STRINGS", "1")
    ad = sys.modules.get("anndata")
    if ad is not None and hasattr(getattr(ad, "settings", None), "allow_write_nullable_strings"):
        ad.settings.allow_write_nullable_strings = True


_anndata_pandas3()
