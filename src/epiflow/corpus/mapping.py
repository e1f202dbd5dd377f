"""Map a dataset onto a cCRE set: cells x cCREs raw counts.

Count semantics (SPEC §1, as the authors):

* **Fragments** - a fragment adds its weight to every cCRE it overlaps by at least 1 bp
  (half-open intervals), so a fragment spanning two cCREs counts once for each. The weight is its
  5th (count) column by default (``use_count_column=True``), as in the authors' public code
  (``construct_cell_by_ccre_matrix`` takes the count column of a ``bedtools intersect`` of 5-column
  fragments, and 1 for 4-column files); ``use_count_column=False`` counts every fragment once.
  Fragments on chromosomes absent from the cCRE set count nowhere (but stay in the per-cell fragment
  total used for ``frac_fragments_in_ccres``).
* **Peaks** - a cell-by-peak matrix ``X`` is mapped with a sparse incidence matrix ``A``
  (``A[i, j] = 1`` when peak ``i`` overlaps cCRE ``j``): ``counts = X @ A``. A peak that overlaps
  two cCREs contributes its full count to both; a cCRE overlapped by two peaks receives the sum.

Fragments are streamed in chunks (bounded memory: one chunk plus the growing sparse result).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..genome.intervals import normalize_chrom
from .readers import DEFAULT_CHUNKSIZE, FragmentReader

log = logging.getLogger(__name__)

# the cell type of a cell without a label (the tasks leave such cells out: tasks.features.labelled_mask)
MISSING_LABEL = "unknown"

MERGE_MIN_NNZ = 4_000_000  # pending per-chunk results are merged once they hold this many entries

# Non-primary contigs of the human assemblies (unplaced, unlocalised, alt, fix, decoy, EBV, lambda):
# they are dropped (and counted) rather than being an error. Any other unknown name is an error.
_KNOWN_CONTIG = re.compile(
    r"(_random$|^chrUn|_alt$|_fix$|_decoy$|^chrGL|^chrKI|^chrJH|^chrKN|^chrKQ|^chrKV|^chrKZ|^chrML"
    r"|^chrMU|^chrNC_|^chrEBV$|^chrhs37d5$|^chrlambda|^chrHLA)", re.IGNORECASE)


def is_known_contig(name: str) -> bool:
    return bool(_KNOWN_CONTIG.search(str(name)))


def check_chroms(chroms, *, genome: str, path=None) -> np.ndarray:
    """Boolean mask over ``chroms`` (unique normalised names) of those to keep (primary set).

    Known non-primary contigs (unplaced/alt/decoy/EBV) are dropped; anything else outside chr1-22,
    X, Y, M is an unknown chromosome and raises :class:`InputFormatError` (via
    :func:`epiflow.genome.bed.validate_chroms`)."""
    from ..genome.bed import primary_mask, validate_chroms

    chroms = np.asarray(chroms).astype(str)
    prim = primary_mask(chroms)
    other = chroms[~prim]
    unknown = [c for c in other if not is_known_contig(c)]
    if unknown:
        validate_chroms(np.asarray(unknown), genome=genome, path=path)
    return prim


# ----------------------------------------------------------------------------------------------
# cCRE index
# ----------------------------------------------------------------------------------------------

@dataclass
class _ChromIndex:
    ids: np.ndarray      # cCRE ids sorted by start
    starts: np.ndarray
    ends: np.ndarray
    max_len: int
    ends_sorted: bool


class CcreIndex:
    """Per-chromosome sorted arrays of a cCRE set, built once and queried chunk after chunk.

    :meth:`query` returns every (query, cCRE) pair overlapping by >= 1 bp; same result as
    :func:`epiflow.genome.intervals.overlap_pairs`, without re-indexing the cCREs for every chunk.
    """

    def __init__(self, chrom, start, end):
        start = np.asarray(start, dtype=np.int64)
        end = np.asarray(end, dtype=np.int64)
        self.n = len(start)
        self.by_chrom: dict[str, _ChromIndex] = {}
        # chromosome codes by hashing (names in sorted order, as np.unique gave them)
        codes, names = pd.factorize(np.asarray(chrom, dtype=object), sort=False)
        norm = normalize_chrom(np.asarray(names, dtype=object).astype(str)) if len(names) else np.zeros(0, str)
        uniq, remap = np.unique(norm, return_inverse=True)
        inv = remap[codes] if len(codes) else np.zeros(0, np.int64)
        order = np.lexsort((start, inv))
        inv_sorted = inv[order]
        bounds = np.searchsorted(inv_sorted, np.arange(len(uniq) + 1))
        for k, c in enumerate(uniq):
            ids = order[bounds[k]:bounds[k + 1]]
            s, e = start[ids], end[ids]
            self.by_chrom[str(c)] = _ChromIndex(ids.astype(np.int64), s, e, int((e - s).max()),
                                                bool(np.all(np.diff(e) >= 0)))
        # flat per-chromosome arrays for the compiled counting kernel
        names = list(self.by_chrom)
        self._k = {c: k for k, c in enumerate(names)}
        cis = [self.by_chrom[c] for c in names]
        self._koff = np.concatenate([[0], np.cumsum([len(ci.ids) for ci in cis])]).astype(np.int64)
        cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
        self._kstart = cat([ci.starts for ci in cis], np.int64)
        self._kend = cat([ci.ends for ci in cis], np.int64)
        self._kid = cat([ci.ids for ci in cis], np.int64)
        self._kmaxlen = np.array([ci.max_len for ci in cis], dtype=np.int64)
        self._ksorted = np.array([ci.ends_sorted for ci in cis], dtype=np.bool_)

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> "CcreIndex":
        return cls(df["chrom"].to_numpy(), df["start"].to_numpy(), df["end"].to_numpy())

    @property
    def chroms(self) -> list[str]:
        return list(self.by_chrom)

    def _query_one(self, ci: _ChromIndex, ast: np.ndarray, aen: np.ndarray):
        if ci.ends_sorted:
            # first cCRE whose end > start ... last cCRE whose start < end: all overlap
            lo = np.searchsorted(ci.ends, ast, side="right")
        else:
            # candidates: the cCREs starting within the longest cCRE's length before the start
            lo = np.searchsorted(ci.starts, ast - ci.max_len + 1, side="left")
        hi = np.searchsorted(ci.starts, aen, side="left")
        n = np.maximum(hi - lo, 0)
        tot = int(n.sum())
        if tot == 0:
            return None
        rep = np.repeat(np.arange(len(ast)), n)
        cand = np.repeat(lo, n) + (np.arange(tot) - np.repeat(np.cumsum(n) - n, n))
        if ci.ends_sorted:
            return rep, ci.ids[cand]
        keep = ci.ends[cand] > ast[rep]
        return rep[keep], ci.ids[cand[keep]]

    def query_codes(self, chrom_codes, chrom_names, start, end):
        """Overlaps of queries given as chromosome codes into ``chrom_names`` (fast path for chunks).

        Returns ``(iq, iccre)`` int64, grouped by chromosome.
        """
        chrom_codes = np.asarray(chrom_codes, dtype=np.int64)
        start = np.asarray(start, dtype=np.int64)
        end = np.asarray(end, dtype=np.int64)
        if len(chrom_codes) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        sorted_codes = bool(np.all(np.diff(chrom_codes) >= 0))
        order = None if sorted_codes else np.argsort(chrom_codes, kind="stable")
        cs = chrom_codes if order is None else chrom_codes[order]
        bounds = np.searchsorted(cs, np.arange(len(chrom_names) + 1))
        out_q, out_c = [], []
        for k, name in enumerate(chrom_names):
            lo, hi = bounds[k], bounds[k + 1]
            if hi <= lo or name not in self.by_chrom:
                continue
            rows = np.arange(lo, hi) if order is None else order[lo:hi]
            r = self._query_one(self.by_chrom[name], start[rows], end[rows])
            if r is None:
                continue
            out_q.append(rows[r[0]])
            out_c.append(r[1])
        if not out_q:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(out_q), np.concatenate(out_c)

    def chrom_map(self, chrom_names) -> np.ndarray:
        """Index chromosome of each name (-1: not in the cCRE set), for :meth:`count_chunk`."""
        return np.array([self._k.get(str(c), -1) for c in chrom_names], dtype=np.int64)

    def count_chunk(self, chrom_codes, code2k, start, end, rows, weight, n_rows, n_frag, n_in):
        """Compiled overlap + sum of one chunk: a canonical ``n_rows x n`` CSR of the weights summed
        per (row, overlapped cCRE); ``n_frag``/``n_in`` (per row: fragments, fragments overlapping
        >= 1 cCRE) are incremented in place. Same overlaps as :meth:`query_codes`."""
        from ._fragkernels import count_overlaps

        ip, ix, dat = count_overlaps(np.asarray(chrom_codes, np.int64), np.asarray(start, np.int64),
                                     np.asarray(end, np.int64), np.asarray(rows, np.int64),
                                     np.asarray(weight, np.int64), np.asarray(code2k, np.int64),
                                     self._koff, self._kstart, self._kend, self._kid, self._kmaxlen,
                                     self._ksorted, int(n_rows), n_frag, n_in)
        return sp.csr_matrix((dat, ix, ip), shape=(int(n_rows), self.n))

    def query(self, chrom, start, end):
        chrom = np.asarray(chrom).astype(str)
        names, codes = np.unique(chrom, return_inverse=True)
        return self.query_codes(codes, [str(x) for x in names], start, end)


# ----------------------------------------------------------------------------------------------
# fragments
# ----------------------------------------------------------------------------------------------

@dataclass
class FragmentCounts:
    counts: sp.csr_matrix              # barcodes x cCREs
    barcodes: np.ndarray               # barcode of each row
    n_fragments: np.ndarray            # per barcode: fragments read (after whitelist / liftover)
    n_in_ccres: np.ndarray             # per barcode: fragments overlapping >= 1 cCRE
    stats: dict = field(default_factory=dict)


def _merge(mats: list, n_rows: int, n_cols: int) -> sp.csr_matrix:
    """Sum canonical CSR matrices (possibly with fewer rows) into one n_rows x n_cols CSR matrix
    (linear-time row-wise merges, compiled). ``mats`` is consumed (emptied) so that every input is
    freed as soon as it has been merged."""
    from ._fragkernels import merge_csr

    if not mats:
        return sp.csr_matrix((n_rows, n_cols), dtype=np.float32)
    mats.reverse()  # pop() from the end takes them in order
    while len(mats) > 1:  # pairwise rounds: every entry is copied O(log k) times
        nxt = []
        while len(mats) >= 2:
            a, b = mats.pop(), mats.pop()
            ip, ix, d = merge_csr(a.indptr.astype(np.int64), a.indices, a.data,
                                  b.indptr.astype(np.int64), b.indices, b.data, n_rows)
            del a, b
            nxt.append(sp.csr_matrix((d, ix, ip), shape=(n_rows, n_cols)))
        nxt.extend(mats)
        mats[:] = nxt[::-1]
        del nxt
    m = mats.pop()
    if m.shape[0] != n_rows:
        ip = np.concatenate([m.indptr, np.full(n_rows - m.shape[0], m.indptr[-1], m.indptr.dtype)])
        m = sp.csr_matrix((m.data, m.indices, ip), shape=(n_rows, n_cols))
    return m


#: a whitelist that matches no barcode in this many fragment lines stops the mapping right there
WHITELIST_EARLY_LINES = 2_000_000
#: below this fraction of whitelist (or label-table) barcodes found in the data: a warning with numbers
MIN_BARCODE_MATCH = 0.5


def _example_barcodes(path, n: int = 3) -> list[str]:
    """The barcodes (4th column) of the first few fragment lines (for error messages)."""
    from .readers import open_text

    out: list[str] = []
    try:
        with open_text(path) as fh:
            for ln in fh:
                if ln.startswith("#"):
                    continue
                parts = ln.rstrip("\n").split("\t")
                if len(parts) >= 4 and parts[3] not in out:
                    out.append(parts[3])
                if len(out) >= n:
                    break
    except (OSError, EOFError):
        pass
    return out


def no_whitelisted_barcode(reader, lines: int, *, early: bool):
    from ..errors import InputFormatError

    wl = [str(b) for b in list(reader.whitelist)[:3]]
    seen = reader.example_barcodes() if hasattr(reader, "example_barcodes") else _example_barcodes(reader.path)
    scope = f"the first {lines:,} lines" if early else f"all {lines:,} lines"
    return InputFormatError(
        f"none of the {len(reader.whitelist):,} whitelist barcodes occurs in {scope} of the fragment file "
        f"(whitelist: {', '.join(map(repr, wl))} ...; file: {', '.join(map(repr, seen))} ...)",
        path=str(reader.path), field="barcodes",
        fix="give the whitelist of this fragment file (same barcode spelling, e.g. with or without a "
            "'-1' suffix or a sample prefix), or drop the dataset's barcodes field to keep every barcode")


def map_fragments(reader: FragmentReader, index: CcreIndex, *, use_count_column: bool = True,
                  lift=None, on_first_chunk=None, genome: str | None = None,
                  progress: bool = False) -> FragmentCounts:
    """Stream a fragment file into a barcodes x cCREs count matrix (see the module doc for semantics).

    ``lift(chrom, start, end) -> (chrom, start, end, keep)`` converts coordinates chunk by chunk
    (fragments that do not lift are dropped and counted). ``on_first_chunk(chrom, start, end)`` is
    called once on the first chunk (e.g. genome-build detection) before anything is counted.
    ``genome`` enables the unknown-chromosome check (known alt/unplaced contigs are dropped).

    Each chunk is overlapped and summed by a compiled kernel (binary search in the per-chromosome
    sorted cCRE starts/ends) into a canonical CSR; chunk results are merged geometrically, so memory
    is one chunk plus about twice the result.
    """
    from tqdm.auto import tqdm

    acc = None
    pending: list = []
    pending_nnz = 0
    n_frag = np.zeros(0, np.int64)
    n_in = np.zeros(0, np.int64)
    lines = lifted_in = lifted_lost = contig_dropped = 0
    first = True
    chrom_ok_cache: dict[str, bool] = {}
    bar = tqdm(desc=f"fragments {Path(str(reader.path)).name}", unit=" lines", unit_scale=True,
               disable=not progress)
    kept = 0
    for ch in reader:
        bar.update(ch.n_raw)
        lines += ch.n_raw
        kept += len(ch)
        if kept == 0 and reader.whitelist is not None and lines >= WHITELIST_EARLY_LINES:
            raise no_whitelisted_barcode(reader, lines, early=True)
        if len(ch) == 0:
            continue
        chroms, codes, start, end = ch.chroms, ch.chrom_codes, ch.start, ch.end
        bc, cnt = ch.barcode, ch.count
        if genome is not None:
            new = [c for c in chroms if c not in chrom_ok_cache]
            if new:
                ok = check_chroms(np.asarray(new), genome=genome, path=str(reader.path))
                chrom_ok_cache.update(zip(new, ok))
            okc = np.array([chrom_ok_cache[c] for c in chroms], dtype=bool)
            if not okc.all():
                keep = okc[codes]
                contig_dropped += int((~keep).sum())
                codes, start, end, bc, cnt = codes[keep], start[keep], end[keep], bc[keep], cnt[keep]
        if first and on_first_chunk is not None:
            on_first_chunk(chroms[codes], start, end)
        first = False
        if lift is not None:
            lifted_in += len(start)
            lc, ls, le, keep = lift(chroms[codes], start, end)
            lifted_lost += int((~keep).sum())
            bc, cnt = bc[keep], cnt[keep]
            names, codes = np.unique(np.asarray(lc).astype(str), return_inverse=True)
            chroms = np.asarray(names).astype(str)
            start, end = np.asarray(ls, np.int64), np.asarray(le, np.int64)
        nb = reader.n_barcodes
        if len(n_frag) < nb:
            n_frag = np.concatenate([n_frag, np.zeros(nb - len(n_frag), np.int64)])
            n_in = np.concatenate([n_in, np.zeros(nb - len(n_in), np.int64)])
        w = cnt if use_count_column else np.ones(len(start), dtype=np.int64)
        m = index.count_chunk(codes, index.chrom_map(chroms), start, end, bc, w, nb, n_frag, n_in)
        pending.append(m)
        pending_nnz += m.nnz
        # merge geometrically (when the pending part outgrows the merged part): amortised linear cost
        if pending_nnz > max(0 if acc is None else acc.nnz, MERGE_MIN_NNZ):
            mats = ([acc] if acc is not None else []) + pending
            acc, pending, pending_nnz = None, [], 0
            acc = _merge(mats, nb, index.n)
    bar.close()
    if kept == 0 and reader.whitelist is not None and lines > 0:
        raise no_whitelisted_barcode(reader, lines, early=False)
    nb = reader.n_barcodes
    mats = ([acc] if acc is not None else []) + pending
    acc = pending = None
    acc = _merge(mats, nb, index.n)
    n_frag = np.concatenate([n_frag, np.zeros(nb - len(n_frag), np.int64)])
    n_in = np.concatenate([n_in, np.zeros(nb - len(n_in), np.int64)])
    stats = dict(reader.stats)
    stats.update({"lines": int(lines), "fragments_used": int(n_frag.sum()),
                  "fragments_in_ccres": int(n_in.sum()),
                  "frac_fragments_in_ccres": float(n_in.sum() / max(n_frag.sum(), 1)),
                  "dropped_other_contigs": int(contig_dropped),
                  "use_count_column": bool(use_count_column)})
    if lift is not None:
        stats.update({"lift_in": int(lifted_in), "lift_lost": int(lifted_lost),
                      "lift_fraction_lost": float(lifted_lost / max(lifted_in, 1))})
    return FragmentCounts(acc, np.asarray(reader.barcodes, dtype=object), n_frag, n_in, stats)


# ----------------------------------------------------------------------------------------------
# peaks
# ----------------------------------------------------------------------------------------------

def peak_incidence(peaks: pd.DataFrame, index: CcreIndex) -> sp.csr_matrix:
    """Sparse n_peaks x n_cCREs 0/1 matrix: peak i overlaps cCRE j."""
    ip, ic = index.query(peaks["chrom"].to_numpy(), peaks["start"].to_numpy(), peaks["end"].to_numpy())
    A = sp.csr_matrix((np.ones(len(ip), dtype=np.float32), (ip, ic)), shape=(len(peaks), index.n))
    A.sum_duplicates()
    A.data[:] = 1.0
    return A


def map_peaks(X, peaks: pd.DataFrame, index: CcreIndex) -> tuple[sp.csr_matrix, dict]:
    """Cells x peaks counts -> cells x cCREs counts (``X @ incidence``; see the module doc)."""
    X = sp.csr_matrix(X).astype(np.float32)
    A = peak_incidence(peaks, index)
    out = sp.csr_matrix(X @ A)
    out.sum_duplicates()
    out.eliminate_zeros()
    out.sort_indices()
    mapped_peaks = np.asarray(A.sum(axis=1)).ravel() > 0
    total = float(X.sum())
    in_mapped = float(X[:, np.flatnonzero(mapped_peaks)].sum()) if mapped_peaks.any() else 0.0
    stats = {"peaks": int(len(peaks)), "peaks_overlapping_ccres": int(mapped_peaks.sum()),
             "frac_peaks_in_ccres": float(mapped_peaks.mean()) if len(peaks) else 0.0,
             "frac_counts_in_ccres": in_mapped / total if total else 0.0}
    return out, stats


# ----------------------------------------------------------------------------------------------
# one manifest dataset -> mapped AnnData
# ----------------------------------------------------------------------------------------------

_STD_OBS = ["cell_id", "barcode", "dataset", "tissue", "batch", "cell_type"]


def _simple_obs(obs: pd.DataFrame) -> pd.DataFrame:
    """Keep obs columns that can be stored in a shard (numbers, strings); categoricals -> strings."""
    out = {}
    for c in obs.columns:
        s = obs[c]
        if isinstance(s.dtype, pd.CategoricalDtype) or s.dtype == object or pd.api.types.is_string_dtype(s):
            out[str(c)] = s.astype(str).to_numpy()
        elif pd.api.types.is_bool_dtype(s):
            out[str(c)] = s.astype(str).to_numpy()
        elif pd.api.types.is_numeric_dtype(s):
            out[str(c)] = s.to_numpy()
    return pd.DataFrame(out, index=obs.index)


def _standard_obs(entry, barcodes, extra: pd.DataFrame | None, where: dict) -> pd.DataFrame:
    from ..errors import ConfigError

    barcodes = np.asarray(barcodes, dtype=object).astype(str)
    extra = _simple_obs(extra) if extra is not None else pd.DataFrame(index=barcodes)
    extra.index = barcodes
    for key, fld in ((entry.cell_type_key, "cell_type_key"), (entry.batch_key, "batch_key")):
        if key and key not in extra.columns:
            raise ConfigError(f"dataset '{entry.name}': column '{key}' not found (have: "
                              f"{', '.join(map(str, extra.columns)) or 'none'})", field=fld,
                              fix="name an obs column of the input (or a column of the labels table)",
                              **where)
    ct_key = entry.cell_type_key or ("cell_type" if "cell_type" in extra.columns else None)
    cell_type = extra[ct_key].astype(str).to_numpy() if ct_key else np.full(len(barcodes), MISSING_LABEL)
    cell_type = np.where(pd.isna(cell_type) | (cell_type == "nan") | (cell_type == ""), MISSING_LABEL, cell_type)
    batch = extra[entry.batch_key].astype(str).to_numpy() if entry.batch_key else np.full(len(barcodes), entry.name)
    std = pd.DataFrame({"cell_id": [f"{entry.name}:{b}" for b in barcodes], "barcode": barcodes,
                        "dataset": entry.name, "tissue": entry.tissue or "unknown", "batch": batch,
                        "cell_type": cell_type}, index=barcodes)
    rest = extra.drop(columns=[c for c in extra.columns if c in _STD_OBS])
    obs = pd.concat([std, rest], axis=1)
    obs.index = obs["cell_id"].to_numpy()
    return obs


def _check_label_match(entry, table: pd.DataFrame, fc, lp, where: dict) -> dict:
    """A label table must name the data's barcodes: none matching is an error (every cell would be
    'unknown'); a partial match is a warning with the numbers. Returns report entries."""
    from ..errors import InputFormatError

    bcs = pd.Index(np.asarray(fc.barcodes).astype(str))
    has_frag = np.asarray(fc.n_fragments) > 0
    cells = bcs[has_frag] if has_frag.any() else bcs
    hit = cells.isin(table.index.astype(str))
    n_hit, n = int(hit.sum()), int(len(cells))
    if n and n_hit == 0:
        raise InputFormatError(
            f"dataset '{entry.name}': none of the {len(table):,} barcodes of the label table matches one of "
            f"the {n:,} barcodes of the data (table: {', '.join(map(repr, table.index[:3].astype(str)))} ...; "
            f"data: {', '.join(map(repr, cells[:3]))} ...): every cell would be labelled 'unknown'",
            path=str(lp), field="labels",
            fix="give the label table of this dataset, with its first column spelled like the data's barcodes")
    if n and n_hit < n:
        log.warning("dataset '%s': %d of %d cells (%.1f %%) have no row in the label table %s; their "
                    "labels are 'unknown'", entry.name, n - n_hit, n, 100.0 * (n - n_hit) / n, lp)
    return {"labelled_cells": n_hit, "label_table_rows": int(len(table))}


#: a dataset with less than this fraction of its fragments (peak counts) in the cCRE vocabulary stops
#: the mapping (config key mapping.min_frac_in_ccres, CLI --min-frac-in-ccres). Measured: fragments
#: of a hg19 dataset declared hg38 2.7 % (28.7 % declared right); peaks 7.5 % (100 %).
MIN_FRAC_IN_CCRES = 0.10


def _check_coverage(entry, report: dict, path, threshold: float) -> None:
    from ..errors import VocabularyMismatchError

    key = "frac_fragments_in_ccres" if "frac_fragments_in_ccres" in report else "frac_counts_in_ccres"
    frac = report.get(key)
    if not threshold or frac is None:
        return
    report["min_frac_in_ccres"] = float(threshold)
    if frac >= threshold:
        return
    what = "fragments" if key == "frac_fragments_in_ccres" else "counts (peaks x cells)"
    detail = ""
    if "fragments_used" in report:
        detail = f" ({report['fragments_in_ccres']:,} of {report['fragments_used']:,} fragments)"
    elif "peaks" in report:
        detail = f" ({report['peaks_overlapping_ccres']:,} of {report['peaks']:,} peaks overlap a cCRE)"
    build = ""
    if report.get("build_detected") not in (None, "unknown"):
        build = f"; build detected from TSS proximity: {report['build_detected']}"
    raise VocabularyMismatchError(
        f"dataset '{entry.name}' (declared {entry.genome}, mapped onto {report['genome_target']}): only "
        f"{100 * frac:.1f} % of its {what} fall in the {report['n_ccres']:,} cCREs{detail}, below the "
        f"threshold {100 * threshold:.1f} %{build}", path=str(path), field="genome",
        fix="check the dataset's declared genome build and the cCRE vocabulary (same genome, tissue "
            "coverage); if the data is right, lower mapping.min_frac_in_ccres (--min-frac-in-ccres; 0 "
            "disables the check)")


def _build_checker(entry, tss, path):
    if isinstance(tss, str) and tss == "builtin":
        from ..genome.build import packaged_tss

        tss = packaged_tss()
    if not tss:
        return None

    def check(chrom, start, end):
        from ..genome.build import check_build, detect_build

        rep = detect_build(np.asarray(chrom).astype(str), np.asarray(start), np.asarray(end), tss=tss)
        check_build(entry.genome, rep, path=str(path), dataset=entry.name)
        check.report = rep
    check.report = None
    return check


def chain_spec(src: str, dst: str, chain: str | None, *, where: dict | None = None) -> str:
    """The chain to lift ``src -> dst`` (configured, else builtin); a configured chain whose name says
    another direction (``hg38ToHg19`` for hg19 -> hg38 data) is an error, not a silent mis-lift."""
    import re as _re

    from ..errors import ConfigError
    from ..genome.liftover import require_chain

    spec = require_chain(src, dst, chain)
    m = _re.search(r"(hg\d+)to(hg\d+)", Path(str(spec)).name, _re.IGNORECASE)
    if m and (m.group(1).lower(), m.group(2).lower()) != (src, dst):
        raise ConfigError(f"the chain {spec} lifts {m.group(1)} -> {m.group(2)}, but this data must go "
                          f"{src} -> {dst}", field="chain",
                          fix=f"configure a {src}To{dst[:1].upper() + dst[1:]} chain, or build the corpus in "
                              f"{src}", **(where or {}))
    return spec


def _lifter(chain_obj):
    from ..genome.liftover import lift_intervals

    def lift(chrom, start, end):
        r = lift_intervals(chain_obj, chrom, start, end)
        return r.chrom, r.start, r.end, r.keep
    return lift


def map_dataset(entry, ccres: pd.DataFrame, genome: str, *, chain: str | None = None,
                tss: dict | str | None = "builtin", data_mirror=None, use_count_column: bool = True,
                chunksize: int = DEFAULT_CHUNKSIZE, progress: bool = False,
                min_frac_in_ccres: float | None = None):
    """Map one manifest dataset onto ``ccres`` (the candidate cCREs, in ``genome`` coordinates).

    Checks the file (path/URL, sha256), the chromosome names, the genome build (``tss`` =
    ``{'hg19': bed, 'hg38': bed}``; default ``'builtin'``: the TSS tables shipped in the package;
    None: no check), lifts to ``genome`` when the dataset's build differs
    (``chain``: path/URL/``builtin:...``; default: the builtin chain where there is one) and counts.
    Returns ``(adata, report)``: cells x cCREs raw counts (CSR float32) with standard obs columns
    (cell_id, barcode, dataset, tissue, batch, cell_type, + label/obs columns) and a JSON-able report.

    ``min_frac_in_ccres`` (default :data:`MIN_FRAC_IN_CCRES`; 0 disables): when less than this
    fraction of the dataset's fragments (or peak counts) overlap the cCRE vocabulary, the mapping stops
    with the numbers (:class:`~epiflow.errors.VocabularyMismatchError`): a wrong declared build or a
    vocabulary of another genome/tissue, not a dataset to tokenise.
    """
    import anndata as ad

    from ..genome.bed import normalize_genome
    from .manifest import FRAGMENT_FORMATS, resolve_dataset
    from .readers import read_labels, read_matrix

    genome = normalize_genome(genome)
    path = resolve_dataset(entry, data_mirror=data_mirror)
    index = CcreIndex.from_frame(ccres)
    report: dict = {"dataset": entry.name, "format": entry.format, "path": str(path),
                    "genome_declared": entry.genome, "genome_target": genome, "n_ccres": int(index.n),
                    "lifted": entry.genome != genome, "role": entry.role}
    lift = None
    if entry.genome != genome:
        from ..genome.liftover import load_chain

        spec = chain_spec(entry.genome, genome, chain, where=entry.where())
        report["chain"] = spec
        lift = _lifter(load_chain(spec))
    checker = _build_checker(entry, tss, path)
    where = entry.where()
    if entry.format in FRAGMENT_FORMATS:
        if entry.format == "snapatac2":  # fragments stored by snapatac2.pp.import_fragments
            from .snapfile import SnapAtac2FragmentReader, read_obs

            reader = SnapAtac2FragmentReader(path, whitelist=entry.barcodes_path(data_mirror),
                                             chunksize=chunksize)
        else:
            reader = FragmentReader(path, whitelist=entry.barcodes_path(data_mirror), chunksize=chunksize)
        # a SnapATAC2 file has no count column (each distinct fragment stored once): reported as such
        fc = map_fragments(reader, index, use_count_column=use_count_column and entry.format == "fragments",
                           lift=lift, on_first_chunk=checker, genome=entry.genome, progress=progress)
        labels = None
        lp = entry.labels_path(data_mirror)
        if lp is not None:
            table = read_labels(lp)
            labels = table.reindex(pd.Index(fc.barcodes.astype(str)))
            report.update(_check_label_match(entry, table, fc, lp, where))
        elif entry.format == "snapatac2":  # the file's own obs (QC columns, and e.g. cell types added there)
            labels = read_obs(path).reindex(pd.Index(fc.barcodes.astype(str)))
        if reader.whitelist is not None:
            found = int((fc.n_fragments > 0).sum())
            report["whitelist_barcodes"] = int(len(reader.whitelist))
            report["whitelist_barcodes_found"] = found
            if found < MIN_BARCODE_MATCH * len(reader.whitelist):
                log.warning("dataset '%s': only %d of %d whitelist barcodes (%.1f %%) have fragments in %s; "
                            "the others become empty cells (dropped by min_ccres_per_cell)", entry.name,
                            found, len(reader.whitelist), 100.0 * found / max(len(reader.whitelist), 1), path)
        obs = _standard_obs(entry, fc.barcodes, labels, where)
        obs["n_fragments"] = fc.n_fragments
        obs["n_fragments_in_ccres"] = fc.n_in_ccres
        X = fc.counts
        report.update(fc.stats)
    else:
        a = read_matrix(path, entry.format)
        var = a.var[["chrom", "start", "end"]].reset_index(drop=True)
        keep = check_chroms(np.unique(var["chrom"].to_numpy()), genome=entry.genome, path=str(path))
        ok_names = set(np.unique(var["chrom"].to_numpy())[keep])
        peak_keep = var["chrom"].isin(ok_names).to_numpy()
        report["dropped_other_contig_peaks"] = int((~peak_keep).sum())
        Xp = a.X[:, np.flatnonzero(peak_keep)] if not peak_keep.all() else a.X
        var = var.loc[peak_keep].reset_index(drop=True)
        if checker is not None:
            checker(var["chrom"].to_numpy(), var["start"].to_numpy(), var["end"].to_numpy())
        if lift is not None:
            lc, ls, le, lk = lift(var["chrom"].to_numpy(), var["start"].to_numpy(), var["end"].to_numpy())
            report.update({"lift_in": int(len(var)), "lift_lost": int((~lk).sum()),
                           "lift_fraction_lost": float((~lk).mean()) if len(var) else 0.0})
            Xp = sp.csr_matrix(Xp)[:, np.flatnonzero(lk)]
            var = pd.DataFrame({"chrom": lc, "start": ls, "end": le})
        X, st = map_peaks(Xp, var, index)
        report.update(st)
        obs = _standard_obs(entry, a.obs_names.to_numpy(), a.obs, where)
    if checker is not None and checker.report is not None:
        r = checker.report
        report["build_detected"] = getattr(r, "build", None)
        report["build_scores"] = {k: float(v) for k, v in dict(getattr(r, "scores", {}) or {}).items()}
    _check_coverage(entry, report, path, MIN_FRAC_IN_CCRES if min_frac_in_ccres is None else min_frac_in_ccres)
    X = sp.csr_matrix(X, dtype=np.float32)
    spec = entry.split_spec()
    if spec is not None:  # one part of a stratified split of the file's cells (manifest 'split')
        from .manifest import split_mask

        part, frac, seed = spec
        rows = np.flatnonzero(split_mask(obs["cell_type"].to_numpy(), part, frac, seed))
        report["split"] = {"part": part, "fraction": frac, "seed": seed, "stratify": "cell_type",
                           "n_cells_file": int(X.shape[0])}
        X, obs = X[rows], obs.iloc[rows].copy()
    obs["n_ccres"] = np.diff(X.indptr).astype(np.int64)
    report["n_cells"] = int(X.shape[0])
    report["median_ccres_per_cell"] = float(np.median(obs["n_ccres"])) if len(obs) else 0.0
    var = pd.DataFrame({"chrom": ccres["chrom"].astype(str).to_numpy(),
                        "start": ccres["start"].to_numpy(np.int64), "end": ccres["end"].to_numpy(np.int64)})
    var.index = (var["chrom"] + ":" + var["start"].astype(str) + "-" + var["end"].astype(str)).to_numpy()
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.var_names_make_unique()
    from ..corpus.shard import vocab_id_from_intervals

    report["ccres_id"] = vocab_id_from_intervals(var["chrom"], var["start"], var["end"])
    adata.uns["epiflow_mapping"] = _json(report)
    return adata, report


def _json(d) -> str:
    import json

    return json.dumps(d, default=lambda o: o.item() if hasattr(o, "item") else str(o))


def write_mapped(adata, path, report: dict | None = None, report_path=None) -> None:
    """Write a mapped dataset (h5ad) and its report (JSON), each atomically."""
    from ..io import atomic_path

    adata.strings_to_categoricals()
    with atomic_path(path, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp, compression="gzip")
    if report_path is not None:
        with atomic_path(report_path) as tmp:
            Path(tmp).write_text(_json(report or {}))
