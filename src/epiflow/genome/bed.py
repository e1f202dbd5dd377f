"""BED input/output with validation, and chromosome-set checks.

Intervals are 0-based, half-open. :func:`read_bed` returns a DataFrame with columns ``chrom``
(normalised to UCSC style: ``1`` -> ``chr1``, ``MT`` -> ``chrM``), ``start``, ``end`` (int64) and,
when the file has them, the standard extra BED columns (``name``, ``score``, ``strand``, ...) in file
order (never re-sorted). Every problem names the file and the line.
"""

from __future__ import annotations

import csv
import gzip
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError, InputFormatError, decompression_errors
from ..io import atomic_path
from .intervals import PRIMARY_CHROMS, normalize_chrom

log = logging.getLogger(__name__)

# Names of BED columns 4..12; further columns are called col13, col14, ...
EXTRA_COLUMNS = ["name", "score", "strand", "thickStart", "thickEnd", "itemRgb", "blockCount",
                 "blockSizes", "blockStarts"]

#: Genome builds this package knows, with accepted aliases.
GENOME_ALIASES = {
    "hg19": "hg19", "grch37": "hg19", "grch37/hg19": "hg19", "hg37": "hg19",
    "hg38": "hg38", "grch38": "hg38", "grch38/hg38": "hg38",
}

_SKIP_PREFIXES = ("#", "track", "browser")


def normalize_genome(genome: str, *, field: str | None = "genome", path=None) -> str:
    """``GRCh38`` / ``hg38`` -> ``hg38``; ``GRCh37`` / ``hg19`` -> ``hg19``; anything else is an error."""
    key = str(genome).strip().lower()
    if key not in GENOME_ALIASES:
        raise ConfigError(f"unknown genome build {genome!r}", path=path, field=field,
                          fix="use 'hg38' (GRCh38) or 'hg19' (GRCh37).")
    return GENOME_ALIASES[key]


def _open_text(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="")
    return open(path, "rt", encoding="utf-8", errors="replace", newline="")


def _col_names(n: int) -> list[str]:
    names = ["chrom", "start", "end"] + EXTRA_COLUMNS
    return names[:n] if n <= len(names) else names + [f"col{i + 1}" for i in range(len(names), n)]


def _is_skip(line: str) -> bool:
    s = line.strip()
    return not s or s.startswith(_SKIP_PREFIXES)


def read_bed(path, *, min_columns: int = 3, name: str | None = None) -> pd.DataFrame:
    """Read a BED file (plain or gzip) into a DataFrame, in file order.

    ``track``, ``browser``, ``#`` and blank lines are skipped anywhere in the file. Columns are split
    on tabs (on any whitespace if the first record has no tab). ``name`` is a label (for example a
    dataset name) that error messages show next to the path.

    Raises :class:`InputFormatError` naming the file and line for: a record with fewer than
    ``min_columns`` (at least 3) columns, non-integer coordinates, a negative start, start > end, or
    a file without any record.
    """
    path = Path(path)
    where = f"{path} ({name})" if name else str(path)
    if not path.exists():
        raise InputFormatError("BED file not found", path=where,
                               fix="check the path (relative paths are resolved from the working folder).")
    with decompression_errors(where, "BED file"):
        return _read_bed(path, where, max(3, int(min_columns)))


def _read_bed(path: Path, where: str, min_columns: int) -> pd.DataFrame:
    # locate the first record to choose the separator and skip the header block
    n_head = 0
    first = None
    with _open_text(path) as fh:
        for line in fh:
            if _is_skip(line):
                n_head += 1
                continue
            first = line.rstrip("\r\n")
            break
    if first is None:
        raise InputFormatError("empty BED file (no interval records)", path=where,
                               fix="give a BED file with at least one 'chrom<TAB>start<TAB>end' line.")
    sep = "\t" if "\t" in first else r"\s+"
    n_first = len(first.split("\t") if sep == "\t" else first.split())
    raw = None
    fast = False
    if sep == "\t" and n_first >= 3:
        # fast path: integer coordinates parsed by the C reader; anything unusual (comments or blank
        # lines mid-file, bad numbers, ragged rows) falls back to the checked path below
        try:
            with _open_text(path) as fh:
                raw = pd.read_csv(fh, sep="\t", header=None, skiprows=n_head, quoting=csv.QUOTE_NONE,
                                  dtype={i: (np.int64 if i in (1, 2) else str) for i in range(n_first)},
                                  keep_default_na=False, na_filter=False, skip_blank_lines=False,
                                  engine="c")
            fast = raw.shape[1] == n_first
            if not fast:
                raw = None
        except (ValueError, OverflowError, pd.errors.ParserError):
            raw = None
    if raw is None:
        try:
            with _open_text(path) as fh:
                raw = pd.read_csv(fh, sep=sep, header=None, skiprows=n_head, dtype=str,
                                  keep_default_na=False, na_filter=False, quoting=csv.QUOTE_NONE,
                                  skip_blank_lines=False, engine="c" if sep == "\t" else "python")
            line_no = np.arange(len(raw), dtype=np.int64) + n_head + 1
        except pd.errors.ParserError:
            raw, line_no = _read_ragged(path, sep)
    else:
        line_no = np.arange(len(raw), dtype=np.int64) + n_head + 1
    if raw.shape[1] < 3:
        # a single column (or two): report the first record line
        raise InputFormatError(
            f"a BED record needs at least 3 columns (chrom, start, end); found {raw.shape[1]}",
            path=where, line=int(line_no[0]) if len(line_no) else None,
            fix="use tab-separated 'chrom start end' (0-based, half-open) records.")
    raw = raw.fillna("")
    raw.columns = _col_names(raw.shape[1])
    # drop skip lines that occur in the middle of the file (comments, track lines, blanks); checked
    # on the distinct chromosome values only
    if not fast:
        codes, uniq = pd.factorize(raw["chrom"].astype(str), sort=False)
        skip_u = np.asarray([(not u.strip()) or u.startswith(_SKIP_PREFIXES) for u in uniq] + [False])
        skip = skip_u[codes]
        if skip.any():
            keep_rows = ~skip
            raw = raw.loc[keep_rows].reset_index(drop=True)
            line_no = line_no[keep_rows]
    if len(raw) == 0:
        raise InputFormatError("empty BED file (no interval records)", path=where,
                               fix="give a BED file with at least one 'chrom<TAB>start<TAB>end' line.")
    # columns missing on some records (ragged file or short lines)
    if raw.shape[1] < min_columns:
        n_cols = np.full(len(raw), raw.shape[1], dtype=np.int64)
    else:
        n_cols = np.full(len(raw), raw.shape[1], dtype=np.int64)
        for k in range(raw.shape[1] - 1, 0, -1):
            if fast and k in (1, 2):
                continue
            empty = (raw.iloc[:, k].astype(str) == "").to_numpy()
            n_cols = np.where(empty & (n_cols == k + 1), k, n_cols)
    short = n_cols < min_columns
    if short.any():
        i = int(np.flatnonzero(short)[0])
        need = _col_names(min_columns)
        raise InputFormatError(
            f"BED record has {int(n_cols[i])} column(s), at least {min_columns} needed",
            path=where, line=int(line_no[i]),
            fix=f"every record needs {', '.join(need[:-1])} and {need[-1]} separated by tabs.")
    coords = {}
    for col in ("start", "end"):
        s = raw[col]
        if pd.api.types.is_integer_dtype(s.dtype):
            coords[col] = s.to_numpy(np.int64)
            continue
        num = pd.to_numeric(s, errors="coerce")
        if not pd.api.types.is_integer_dtype(num.dtype):
            ok = s.str.fullmatch(r"\s*[+-]?\d+\s*").to_numpy()
            if not ok.all():
                i = int(np.flatnonzero(~ok)[0])
                raise InputFormatError(
                    f"non-integer {col} coordinate {s.iloc[i]!r}", path=where, line=int(line_no[i]),
                    fix="BED coordinates are whole numbers (0-based start, exclusive end).")
            num = s.str.strip().astype(np.int64)
        coords[col] = num.to_numpy(np.int64)
    start, end = coords["start"], coords["end"]
    neg = start < 0
    if neg.any():
        i = int(np.flatnonzero(neg)[0])
        raise InputFormatError(f"negative start {start[i]}", path=where, line=int(line_no[i]),
                               fix="BED starts are 0-based and >= 0.")
    bad = start > end
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputFormatError(
            f"start {start[i]} > end {end[i]} ({int(bad.sum())} such record(s))",
            path=where, line=int(line_no[i]),
            fix="BED intervals need start <= end (0-based, half-open); swap or drop these records.")
    out = pd.DataFrame({"chrom": normalize_chrom(raw["chrom"].to_numpy()), "start": start, "end": end})
    for col in raw.columns[3:]:
        vals = raw[col]
        if col in ("score", "thickStart", "thickEnd", "blockCount"):
            num = pd.to_numeric(vals, errors="coerce")
            if not num.isna().any():
                vals = num
        out[col] = vals.to_numpy()
    return out


def _read_ragged(path: Path, sep: str):
    """Slow path for files whose records have different numbers of columns."""
    rows, line_no = [], []
    splitter = (lambda s: s.split("\t")) if sep == "\t" else (lambda s: s.split())
    with _open_text(path) as fh:
        for i, line in enumerate(fh, start=1):
            if _is_skip(line):
                continue
            rows.append(splitter(line.rstrip("\r\n")))
            line_no.append(i)
    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]
    return pd.DataFrame(rows, dtype=str), np.asarray(line_no, dtype=np.int64)


def write_bed(df: pd.DataFrame, path) -> Path:
    """Write ``df`` as BED3+ (chrom, start, end, then its other columns in order), atomically.

    No header line; ``.gz`` paths are gzip-compressed. Returns the path.
    """
    path = Path(path)
    for col in ("chrom", "start", "end"):
        if col not in df.columns:
            raise InputFormatError(f"cannot write BED: column {col!r} missing", path=path,
                                   fix="pass a DataFrame with chrom, start, end columns.")
    cols = ["chrom", "start", "end"] + [c for c in df.columns if c not in ("chrom", "start", "end")]
    out = df[cols].copy()
    out["start"] = out["start"].astype(np.int64)
    out["end"] = out["end"].astype(np.int64)
    gz = path.name.endswith(".gz")
    with atomic_path(path) as tmp:
        out.to_csv(tmp, sep="\t", header=False, index=False, quoting=csv.QUOTE_NONE,
                   compression="gzip" if gz else None)
    return path


def validate_chroms(chroms, *, genome: str, path=None, allow_other: bool = False) -> None:
    """Check that every chromosome is in the build's primary set (chr1-22, X, Y, M) after normalisation.

    Unknown names (unplaced / alt contigs, other species, typos) raise :class:`InputFormatError`
    naming the file, the offending names (with their record counts) and the fix; with
    ``allow_other=True`` they are only logged.
    """
    build = normalize_genome(genome)
    arr = normalize_chrom(np.asarray(chroms).astype(str).ravel())
    if arr.size == 0:
        return None
    names, counts = np.unique(arr, return_counts=True)
    primary = set(PRIMARY_CHROMS)
    bad = [(n, int(c)) for n, c in zip(names, counts) if n not in primary]
    if not bad:
        return None
    bad.sort(key=lambda x: -x[1])
    shown = ", ".join(f"{n} ({c})" for n, c in bad[:10]) + (f", ... ({len(bad) - 10} more)" if len(bad) > 10 else "")
    n_rec = sum(c for _, c in bad)
    msg = (f"{len(bad)} chromosome name(s) outside the {build} primary set chr1-22, chrX, chrY, chrM "
           f"({n_rec} of {arr.size} records): {shown}")
    if allow_other:
        log.warning("%s%s (kept, allow_other=True)", f"{path}: " if path else "", msg)
        return None
    raise InputFormatError(
        msg, path=path,
        fix="filter them out or set allow_other / drop_unknown (unplaced and alt contigs are not "
            "part of the cCRE vocabulary).")


def primary_mask(chroms) -> np.ndarray:
    """Boolean mask of the (normalised) chromosome names in the primary set chr1-22, X, Y, M."""
    arr = normalize_chrom(np.asarray(chroms).astype(str).ravel())
    return np.isin(arr, PRIMARY_CHROMS)
