"""Deterministic writers: BGZF (gzip-compatible, mtime 0), NPZ with fixed timestamps, TSV/BED, h5ad."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

_BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")
_BLOCK = 0xFF00  # uncompressed bytes per BGZF block (as htslib)


def bgzf_bytes(data: bytes, level: int = 6) -> bytes:
    """Compress ``data`` as BGZF: a series of gzip members with the BC extra field, then the EOF block.

    Readable by any gzip reader (multi-member) and indexable by ``tabix``; byte-identical for the
    same input (mtime 0, fixed OS byte).
    """
    out = io.BytesIO()
    for off in range(0, len(data), _BLOCK):
        chunk = data[off: off + _BLOCK]
        comp = zlib.compressobj(level, zlib.DEFLATED, -15)
        cdata = comp.compress(chunk) + comp.flush()
        bsize = len(cdata) + 25  # header 18 + trailer 8 - 1
        out.write(struct.pack("<4BI2BH2BHH", 0x1F, 0x8B, 8, 4, 0, 0, 0xFF, 6, ord("B"), ord("C"), 2, bsize))
        out.write(cdata)
        out.write(struct.pack("<II", zlib.crc32(chunk) & 0xFFFFFFFF, len(chunk)))
    out.write(_BGZF_EOF)
    return out.getvalue()


def write_bgzf_text(path: Path, text: str) -> None:
    Path(path).write_bytes(bgzf_bytes(text.encode()))


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps (byte-identical output)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def df_text(df: pd.DataFrame, header: bool = True) -> str:
    return df.to_csv(sep="\t", index=False, header=header, float_format="%.6g", lineterminator="\n")


def write_tsv(path: Path, df: pd.DataFrame, header: bool = True) -> None:
    Path(path).write_text(df_text(df, header=header))


def write_h5ad(path: Path, X, obs: pd.DataFrame, var: pd.DataFrame, uns: dict) -> None:
    import anndata as ad

    obs = obs.copy()
    for c in obs.columns:
        if obs[c].dtype == object:
            obs[c] = pd.Categorical(obs[c].astype(str), categories=sorted(obs[c].astype(str).unique()))
    var = var.copy()
    for c in var.columns:
        if var[c].dtype == object:   # e.g. chrom: categories in order of appearance (karyotypic)
            var[c] = pd.Categorical(var[c].astype(str), categories=pd.unique(var[c].astype(str)))
    a = ad.AnnData(X=X, obs=obs, var=var)
    a.uns.update(uns)
    a.write_h5ad(path, compression="gzip")
