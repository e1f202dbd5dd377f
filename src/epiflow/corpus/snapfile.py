"""Fragments stored in a SnapATAC2 ``.h5ad`` (``snap.pp.import_fragments(..., file=...)``), read like a
fragment file (manifest format ``snapatac2``), so that users who already imported their fragments with
SnapATAC2 need not go back to the raw files.

Layout (SnapATAC2 2.x, paired-end data): ``obsm/fragment_paired`` is a cells x genome CSR matrix whose
column index is the fragment start on the concatenated genome (chromosomes in the order of
``uns/reference_sequences``, each shifted by the lengths of those before it) and whose value is the
fragment length, so a fragment is ``(chrom, start, start + length)`` in 0-based half-open coordinates,
the fragment-file convention. SnapATAC2 keeps each distinct fragment once (duplicates are folded into
``obs/frac_dup``), so every stored fragment counts 1: the counts equal a fragment file mapped with
``use_count_column=False``. Single-end files (``obsm/fragment_single``, Tn5 insertions) are refused
with the reason. The datasets are Blosc/zstd-compressed HDF5; :mod:`hdf5plugin` provides the filters.

:class:`SnapAtac2FragmentReader` yields the :class:`~epiflow.corpus.readers.FragmentChunk` of the
fragment reader, a block of cells at a time (bounded memory: ``chunksize`` fragments plus one cell),
so :func:`epiflow.corpus.mapping.map_fragments` maps it unchanged (whitelist, lift-over, build check,
label table).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputFormatError
from ..genome.intervals import normalize_chrom
from .readers import DEFAULT_CHUNKSIZE, FragmentChunk, _need_file, check_unique_barcodes, load_whitelist

FRAGMENTS_KEY = "obsm/fragment_paired"
SINGLE_KEY = "obsm/fragment_single"
REFSEQ_KEY = "uns/reference_sequences"


def _filters() -> None:
    try:
        import hdf5plugin  # noqa: F401  (registers the Blosc / zstd HDF5 filters)
    except ImportError as exc:  # pragma: no cover - a locked dependency
        raise InputFormatError("reading a SnapATAC2 file needs the hdf5plugin package (its HDF5 filters)",
                               field="format", fix="pip install hdf5plugin (it is in epiflow's lock)") from exc


def _strings(ds) -> np.ndarray:
    return np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in ds[()]], dtype=object)


def _open(path: Path):
    import h5py

    _filters()
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise InputFormatError(f"not an HDF5 file ({exc})", path=str(path), field="format",
                               fix="give the .h5ad written by snapatac2.pp.import_fragments(..., file=PATH), "
                                   "or set the dataset's format to what the file is") from None


def read_layout(path) -> dict:
    """Barcodes, chromosome names, lengths and offsets, cells and fragments of a SnapATAC2 file; a clear
    error when it is not one."""
    path = Path(path)
    with _open(path) as f:
        if FRAGMENTS_KEY not in f:
            if SINGLE_KEY in f:
                raise InputFormatError("this SnapATAC2 file holds single-end insertions (obsm/fragment_single), "
                                       "not paired-end fragments", path=str(path), field=SINGLE_KEY,
                                       fix="use the fragment file itself (format fragments), or a file imported "
                                           "from paired-end data")
            raise InputFormatError(f"no {FRAGMENTS_KEY}: not a file written by snapatac2.pp.import_fragments",
                                   path=str(path), field=FRAGMENTS_KEY,
                                   fix="give the file of import_fragments(..., file=PATH); a cell x peak "
                                       "matrix is format h5ad")
        g = f[FRAGMENTS_KEY]
        missing = [k for k in ("indptr", "indices", "data") if k not in g]
        if missing or REFSEQ_KEY not in f:
            raise InputFormatError(f"incomplete SnapATAC2 file: missing {', '.join(missing) or REFSEQ_KEY}",
                                   path=str(path), field=FRAGMENTS_KEY, fix="re-run import_fragments")
        ref = f[REFSEQ_KEY]
        try:
            names = _strings(ref["reference_seq_name"])
            lengths = np.asarray(ref["reference_seq_length"][()], dtype=np.int64)
        except KeyError as exc:
            raise InputFormatError(f"{REFSEQ_KEY} lacks {exc}", path=str(path), field=REFSEQ_KEY,
                                   fix="re-run import_fragments") from None
        idx_key = f["obs"].attrs.get("_index", "_index")
        barcodes = _strings(f["obs"][idx_key])
        indptr = np.asarray(g["indptr"][()], dtype=np.int64)
        shape = tuple(int(x) for x in g.attrs.get("shape", (len(indptr) - 1, int(lengths.sum()))))
    if len(indptr) != len(barcodes) + 1 or shape[0] != len(barcodes):
        raise InputFormatError(f"{FRAGMENTS_KEY} has {len(indptr) - 1} rows for {len(barcodes)} cells",
                               path=str(path), field=FRAGMENTS_KEY, fix="re-run import_fragments")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if shape[1] != offsets[-1]:
        raise InputFormatError(f"{FRAGMENTS_KEY} spans {shape[1]:,} bp, the reference sequences "
                               f"{offsets[-1]:,}", path=str(path), field=REFSEQ_KEY, fix="re-run import_fragments")
    return {"barcodes": barcodes, "chroms": names, "lengths": lengths, "offsets": offsets, "indptr": indptr}


def read_obs(path) -> pd.DataFrame:
    """The file's obs table (SnapATAC2's QC columns and whatever the user added, e.g. cell types)."""
    import anndata as ad

    with _open(Path(path)) as f:
        obs = ad.io.read_elem(f["obs"]) if hasattr(ad, "io") else ad.experimental.read_elem(f["obs"])
    obs.index = obs.index.astype(str)
    return obs


@dataclass
class SnapAtac2FragmentReader:
    """Stream the fragments of a SnapATAC2 file as :class:`~epiflow.corpus.readers.FragmentChunk` s.

    Barcode codes are the file's cell order (or the whitelist's order when ``whitelist`` is given: then
    only its cells are read). ``chunksize`` bounds the fragments per chunk (whole cells; a cell with more
    fragments is one chunk). ``stats`` holds the fragments read and the cells skipped by the whitelist.
    """

    path: str | os.PathLike
    whitelist: np.ndarray | list | str | os.PathLike | None = None
    chunksize: int = DEFAULT_CHUNKSIZE
    stats: dict = field(init=False, default_factory=dict)

    def __post_init__(self):
        self.path = Path(self.path)
        _need_file(self.path, "SnapATAC2 file")
        self.whitelist = load_whitelist(self.whitelist)
        self.layout = read_layout(self.path)
        check_unique_barcodes(self.layout["barcodes"], path=str(self.path), what="obs names (cell barcodes)")
        self._chroms = normalize_chrom(self.layout["chroms"]).astype(str)

    @property
    def barcodes(self) -> np.ndarray:
        """Barcode of every code (whitelist order, else the file's cell order)."""
        if self.whitelist is not None:
            return np.asarray(self.whitelist, dtype=object)
        return self.layout["barcodes"]

    @property
    def n_barcodes(self) -> int:
        return len(self.barcodes)

    def example_barcodes(self, n: int = 3) -> list[str]:
        return [str(b) for b in self.layout["barcodes"][:n]]

    def _rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(file rows to read, their barcode codes)."""
        file_bc = pd.Index(self.layout["barcodes"])
        if self.whitelist is None:
            rows = np.arange(len(file_bc), dtype=np.int64)
            return rows, rows
        pos = file_bc.get_indexer(pd.Index(np.asarray(self.whitelist, dtype=object)))
        codes = np.flatnonzero(pos >= 0).astype(np.int64)
        rows = pos[codes].astype(np.int64)
        order = np.argsort(rows, kind="stable")  # read the file forwards
        return rows[order], codes[order]

    def __iter__(self):
        indptr, offsets = self.layout["indptr"], self.layout["offsets"]
        rows, codes = self._rows()
        n_cells_file = len(indptr) - 1
        if self.whitelist is not None and len(rows) == 0 and n_cells_file:
            from .mapping import no_whitelisted_barcode

            raise no_whitelisted_barcode(self, int(indptr[-1]), early=False)
        n_sel = indptr[rows + 1] - indptr[rows]
        skipped_frag = int(indptr[-1] - n_sel.sum())
        n_read = 0
        with _open(self.path) as f:
            g = f[FRAGMENTS_KEY]
            ind_ds, dat_ds = g["indices"], g["data"]
            i = 0
            while i < len(rows):
                # the next cells (in file order) whose span of the file holds <= chunksize fragments (at
                # least one cell); cells between them that the whitelist leaves out are read and dropped
                lo = int(indptr[rows[i]])
                j = i + 1
                while j < len(rows) and indptr[rows[j] + 1] - lo <= self.chunksize:
                    j += 1
                hi = int(indptr[rows[j - 1] + 1])
                pos = np.asarray(ind_ds[lo:hi], dtype=np.int64)
                length = np.asarray(dat_ds[lo:hi], dtype=np.int64)
                sel = n_sel[i:j]
                if hi - lo != sel.sum():  # keep the selected cells' segments only
                    first = indptr[rows[i:j]] - lo
                    take = np.repeat(first - np.concatenate([[0], np.cumsum(sel)[:-1]]), sel) + np.arange(sel.sum())
                    pos, length = pos[take], length[take]
                bc = np.repeat(codes[i:j], sel)
                cc = np.searchsorted(offsets, pos, side="right") - 1
                bad = (cc < 0) | (cc >= len(self._chroms)) | (length < 0)
                if bad.any():
                    k = int(np.flatnonzero(bad)[0])
                    raise InputFormatError(f"a fragment lies outside the reference sequences (position {pos[k]}, "
                                           f"length {length[k]})", path=str(self.path), field=FRAGMENTS_KEY,
                                           fix="re-run import_fragments")
                start = pos - offsets[cc]
                n_read += len(pos)
                yield FragmentChunk(chrom_codes=cc, chroms=self._chroms, start=start, end=start + length,
                                    barcode=bc, count=np.ones(len(pos), np.int64), first_line=lo + 1,
                                    n_raw=len(pos))
                i = j
        self.stats = {"lines": n_read + skipped_frag, "fragments": n_read,
                      "skipped_not_whitelisted": skipped_frag, "cells_in_file": int(n_cells_file),
                      "cells_read": int(len(rows)), "source": "snapatac2"}
