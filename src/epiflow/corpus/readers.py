"""Readers for scATAC-seq inputs: 10x-style fragment files and cell-by-peak matrices.

Fragments
    :class:`FragmentReader` streams a fragment file (``chrom, start, end, barcode[, count]``; plain,
    gzip or bgzip; leading ``#`` header lines skipped) in chunks of numpy arrays. Every chunk is
    validated (column count, integer coordinates, ``0 <= start <= end``, ``count >= 1``) and a bad line
    raises :class:`~epiflow.errors.InputFormatError` naming the file and the line number (1-based, in
    the decompressed file, header lines included). Barcodes are coded to integers in order of first
    appearance (or in whitelist order when a whitelist is given; fragments of other barcodes are
    skipped and counted). A tabix index is only used for region-restricted reads when ``pysam`` is
    installed; otherwise regions are filtered while streaming.

Matrices
    :func:`read_matrix` reads ``h5ad``, 10x ``filtered_peak_bc_matrix.h5`` (or the Peaks part of a
    Multiome ``filtered_feature_bc_matrix.h5``) and 10x mtx folders into an AnnData (cells x peaks,
    CSR) whose ``var`` has ``chrom``/``start``/``end`` (0-based half-open, BED). Peak names
    ``chr:start-end``, ``chr_start_end`` and ``chr-start-end`` are parsed; they are taken as BED
    coordinates (``one_based=True`` converts 1-based closed names with ``start - 1``).
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputFormatError
from ..genome.intervals import normalize_chrom

log = logging.getLogger(__name__)

DEFAULT_CHUNKSIZE = 2_000_000
_PEAK_RE = re.compile(r"^(?P<chrom>.+?)[:_-](?P<start>\d+)[-_](?P<end>\d+)$")


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------

def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def open_text(path: str | os.PathLike):
    """Open a plain or gzip/bgzip text file for reading (decided by the magic bytes)."""
    path = Path(path)
    if _is_gzip(path):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, "rt", encoding="utf-8", errors="replace")


def _need_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise InputFormatError(f"{what} not found", path=str(path), fix="check the path in the manifest")
    if path.is_file() and path.stat().st_size == 0:
        raise InputFormatError(f"{what} is empty", path=str(path),
                               fix="re-download or regenerate the file")
    return path


def read_barcode_list(path: str | os.PathLike, what: str = "barcode whitelist") -> np.ndarray:
    """One barcode per line (first tab-separated column; plain or gzip). Duplicates are an error."""
    path = _need_file(Path(path), what)
    with open_text(path) as fh:
        bcs = [ln.rstrip("\n\r").split("\t")[0] for ln in fh]
    bcs = [b for b in bcs if b != ""]
    if not bcs:
        raise InputFormatError(f"{what} holds no barcodes", path=str(path),
                               fix="one barcode per line")
    return check_unique_barcodes(np.asarray(bcs, dtype=object), path=str(path), what=what)


def load_whitelist(whitelist):
    """A barcode whitelist given as a file (one per line) or as barcodes, checked for duplicates; None stays."""
    if whitelist is None:
        return None
    if not isinstance(whitelist, (list, np.ndarray, pd.Index)):
        return read_barcode_list(whitelist)
    return check_unique_barcodes(whitelist, path=None, what="barcode whitelist")


def check_unique_barcodes(barcodes, *, path: str | None, what: str, line_offset: int = 1) -> np.ndarray:
    """Raise if a barcode occurs twice (names the first duplicate and its line/position)."""
    bcs = pd.Index(np.asarray(barcodes, dtype=object))
    if not bcs.is_unique:
        dup = bcs.duplicated()
        i = int(np.flatnonzero(dup)[0])
        first = int(np.flatnonzero(bcs == bcs[i])[0])
        raise InputFormatError(
            f"duplicate barcode '{bcs[i]}' in the {what} (entries {first + line_offset} and "
            f"{i + line_offset})", path=path, line=i + line_offset if line_offset else None,
            fix="barcodes must be unique; de-duplicate the list or give each sample a prefix")
    return np.asarray(bcs, dtype=object)


def parse_peak_names(names, *, path: str | None = None, one_based: bool = False) -> pd.DataFrame:
    """Parse ``chr:start-end`` / ``chr_start_end`` / ``chr-start-end`` names (vectorised).

    Returns a DataFrame with chrom (normalised, UCSC style), start, end (int64, BED). Names that do
    not parse, or with start >= end, raise :class:`InputFormatError` naming the first bad one.
    """
    s = pd.Series(np.asarray(names, dtype=object)).astype(str)
    m = s.str.extract(_PEAK_RE)
    bad = m["chrom"].isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputFormatError(
            f"peak name '{s.iloc[i]}' (feature {i + 1}) does not parse as chrom:start-end "
            f"({int(bad.sum())} names fail)", path=path, field="var_names",
            fix="name peaks 'chr1:100-600' (or chr1_100_600), or store chrom/start/end columns in var")
    start = m["start"].astype(np.int64).to_numpy()
    end = m["end"].astype(np.int64).to_numpy()
    if one_based:
        start = start - 1
    df = pd.DataFrame({"chrom": normalize_chrom(m["chrom"].to_numpy()), "start": start, "end": end})
    _check_intervals(df, path=path, what="peak", names=s.to_numpy())
    return df


def _check_intervals(df: pd.DataFrame, *, path, what: str, names=None) -> None:
    bad = (df["start"].to_numpy() < 0) | (df["start"].to_numpy() >= df["end"].to_numpy())
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        nm = f" '{names[i]}'" if names is not None else ""
        raise InputFormatError(
            f"{what} {i + 1}{nm} has start {df['start'].iloc[i]} and end {df['end'].iloc[i]} "
            f"(need 0 <= start < end)", path=path, field="var",
            fix="fix the peak coordinates (BED: 0-based, half-open)")


# ----------------------------------------------------------------------------------------------
# fragments
# ----------------------------------------------------------------------------------------------

@dataclass
class FragmentChunk:
    """One chunk of fragments as numpy arrays (rows of whitelisted barcodes only)."""

    chrom_codes: np.ndarray      # int64 index into ``chroms``
    chroms: np.ndarray           # normalised chromosome names of this chunk
    start: np.ndarray            # int64
    end: np.ndarray              # int64
    barcode: np.ndarray          # int64 code into FragmentReader.barcodes
    count: np.ndarray            # int64 (1 when the file has no count column)
    first_line: int              # 1-based line number of the first row of this chunk
    n_raw: int                   # rows read (before the whitelist filter)

    @property
    def chrom(self) -> np.ndarray:
        return self.chroms[self.chrom_codes]

    def __len__(self) -> int:
        return len(self.start)


READ_BYTES_MAX = 1 << 24     # decompressed text handed to the parser per read (16 MiB)
SLOW_LINES = 65_536          # lines per chunk read by the general (pandas) parser
INFLATE_BLOCK = 1 << 22      # background inflate: block size ...
INFLATE_DEPTH = 4            # ... and blocks decompressed ahead (bounded memory: 16 MiB)


PARSE_AHEAD = 2              # parsed chunks queued ahead of the consumer
MAX_PARSE_THREADS = 4        # threads parsing parts of a buffer at once (at most; budget - 2)
PARALLEL_MIN_BYTES = 1 << 20  # smaller parts are parsed by one thread
MAX_NEW_CHROMS = 64          # chromosomes new to the table that one parallel part may meet
_NO_MISS = np.zeros(0, dtype=np.int64)



class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _in_background(make_gen, depth: int = 2):
    """Iterate ``make_gen()`` in a background thread, ``depth`` items ahead (bounded memory).

    An exception of the producer is re-raised in the consumer; a consumer that stops early stops
    the producer (and closes its generator)."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(max(depth, 1))
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        gen = make_gen()
        try:
            for item in gen:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer
            put(_Raised(exc))
        finally:
            gen.close()

    t = threading.Thread(target=run, daemon=True, name="epiflow-parse")
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        try:
            while True:
                q.get_nowait()
        except queue.Empty:
            pass
        t.join(timeout=10)


def _inflate_blocks(path: Path, block: int):
    """Decompressed blocks of ``path`` (``b""`` at the end); an error is yielded as the exception,
    after a last block with the bytes decoded before it (a truncated file loses no decoded bytes)."""
    try:
        try:
            from isal import igzip as gz
        except ImportError:  # pragma: no cover - isal is a declared dependency
            gz = gzip
        with gz.open(path, "rb") as fh:
            read1 = getattr(fh, "read1", None)
            while True:
                if read1 is None:
                    b = fh.read(block)
                else:  # read1 pieces gathered into a block
                    parts, size = [], 0
                    try:
                        while size < block:
                            piece = read1(min(block - size, 1 << 16))
                            if not piece:
                                break
                            parts.append(piece)
                            size += len(piece)
                    except BaseException:
                        if parts:
                            yield b"".join(parts)
                        raise
                    b = b"".join(parts)
                yield b
                if not b:
                    return
    except GeneratorExit:  # closed by the reader
        raise
    except BaseException as exc:  # handed to the reader
        yield exc


class _Inflater:
    """Decompress a gzip/bgzip file, in a background thread up to ``depth`` blocks ahead
    (``background=False``: in the reading thread, for a budget of one thread).

    ISA-L (``isal``; the standard library's gzip without it) releases the GIL while inflating, so
    decompression runs beside the parser. ``readinto`` like a raw binary stream; an error of the
    thread (truncated or corrupt file) is raised there."""

    def __init__(self, path, block: int = INFLATE_BLOCK, depth: int = INFLATE_DEPTH,
                 background: bool = True):
        import queue
        import threading

        self._q: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._cur = memoryview(b"")
        self._eof = False
        self._pending = None  # an error of the thread, raised after the bytes decoded before it
        self._t = None
        self._gen = _inflate_blocks(Path(path), block)
        if background:
            self._t = threading.Thread(target=self._run, daemon=True, name="epiflow-inflate")
            self._t.start()

    def _run(self):
        for item in self._gen:
            if self._stop.is_set():
                break
            self._put(item)
        self._gen.close()

    def _next(self):
        if self._t is None:
            return next(self._gen, b"")
        return self._q.get()

    def _put(self, item) -> None:
        import queue

        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readinto(self, mv) -> int:
        n = 0
        while n < len(mv):
            if not len(self._cur):
                if self._eof:
                    break
                item = self._pending if self._pending is not None else self._next()
                if isinstance(item, BaseException):
                    if n:  # hand over what was decoded before the error; raise it at the next call
                        self._pending = item
                        break
                    self._pending = None
                    self._eof = True
                    raise item
                if not item:
                    self._eof = True
                    break
                self._cur = memoryview(item)
            k = min(len(self._cur), len(mv) - n)
            mv[n:n + k] = self._cur[:k]
            self._cur = self._cur[k:]
            n += k
        return n

    def close(self) -> None:
        import queue

        self._stop.set()
        if self._t is None:
            self._gen.close()
            return
        try:
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass
        self._t.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open_bytes(path: Path, background: bool = True):
    """Binary stream of the decompressed file (gzip/bgzip: :class:`_Inflater`, inflating in a
    thread of its own unless ``background=False``; else the file)."""
    if _is_gzip(path):
        return _Inflater(path, background=background)
    return open(path, "rb", buffering=0)


def _decompress_errors() -> tuple:
    import zlib

    errs: list = [EOFError, OSError, zlib.error]
    try:
        from isal import isal_zlib

        errs.append(isal_zlib.error)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


@dataclass
class FragmentReader:
    """Stream a fragment file in validated chunks.

    ``for chunk in FragmentReader(path, whitelist=...)`` yields :class:`FragmentChunk`. After (or
    during) iteration ``reader.barcodes`` holds the barcode of every code, and ``reader.stats`` the
    number of lines read, skipped by the whitelist, and so on. Iterating twice re-reads the file
    (codes stay the same).

    Speed: gzip/bgzip is inflated by ISA-L in a background thread while a compiled parser
    (:mod:`epiflow.corpus._fragkernels`) reads the canonical lines (digits, ``\\n`` line ends),
    interning chromosome names and barcodes in hash tables; a part of the file that is not in that
    form (CRLF line ends, ``2.0`` counts, malformed lines, ...) goes through pandas' parser with the
    same validation and errors. ``chunksize`` bounds the lines per chunk (chunks may be shorter: at
    most ~16 MiB of text is parsed at once). Parsing runs in a background thread one chunk ahead of
    the consumer, and each buffer is parsed by several threads at once that only read the string
    tables; the few lines with a new barcode or chromosome are then interned in file order, so codes
    do not depend on the thread count. ``threads`` is the budget of busy threads (default: the
    process's, ``OMP_NUM_THREADS``, set by ``--threads`` and by Snakemake, else the usable cores): 1
    runs everything in the calling thread, 2 adds the parsing thread (inflating there), 3 or more
    also inflate in a thread of their own and parse on ``min(4, threads - 2)`` threads.
    """

    path: str | os.PathLike
    whitelist: np.ndarray | list | str | os.PathLike | None = None
    chunksize: int = DEFAULT_CHUNKSIZE
    region: tuple[str, int, int] | None = None
    threads: int | None = None
    stats: dict = field(init=False, default_factory=dict)

    def __post_init__(self):
        self.path = Path(self.path)
        _need_file(self.path, "fragment file")
        self.whitelist = load_whitelist(self.whitelist)
        self._frozen = self.whitelist is not None
        self._chroms = self._bcs = None  # string tables, created on first read (compiled code)
        self._bc_cache = (0, np.zeros(0, dtype=object))
        self._chrom_cache = (0, np.zeros(0, dtype=str))
        self._n_header, self._ncols = self._sniff()

    # -- interned names ----------------------------------------------------------------------
    def _tables(self):
        if self._bcs is None:
            from ._fragkernels import StringTable

            self._chroms = StringTable(64, 1 << 12)
            self._bcs = StringTable(1 << 12, 1 << 16)
            if self._frozen:
                self._bcs.intern(np.asarray(self.whitelist, dtype=object))
        return self._chroms, self._bcs

    @property
    def n_barcodes(self) -> int:
        if self._bcs is None:
            return len(self.whitelist) if self._frozen else 0
        return self._bcs.n

    @property
    def barcodes(self) -> np.ndarray:
        """Barcode of every code (whitelist order, else order of first appearance)."""
        if self._frozen:
            return np.asarray(self.whitelist, dtype=object)
        if self._bcs is None:
            return np.zeros(0, dtype=object)
        n = self._bcs.n
        if self._bc_cache[0] != n:
            self._bc_cache = (n, np.asarray(self._bcs.names(), dtype=object))
        return self._bc_cache[1]

    def _chrom_names(self) -> np.ndarray:
        n = self._tables()[0].n
        if self._chrom_cache[0] != n:
            names = self._chroms.names()
            self._chrom_cache = (n, normalize_chrom(np.asarray(names, dtype=object)).astype(str)
                                 if n else np.zeros(0, dtype=str))
        return self._chrom_cache[1]

    # -- header / layout ---------------------------------------------------------------------
    def _sniff(self) -> tuple[int, int]:
        n_header = 0
        first = None
        try:
            with open_text(self.path) as fh:
                for ln in fh:
                    if ln.startswith("#"):
                        n_header += 1
                        continue
                    first = ln.rstrip("\n\r")
                    break
        except (EOFError, OSError) as exc:
            raise InputFormatError(f"cannot decompress the fragment file ({exc})", path=str(self.path),
                                   fix="the file is truncated or not gzip/bgzip; re-download it") from None
        if first is None:
            raise InputFormatError("fragment file holds no fragments (empty or header only)",
                                   path=str(self.path), fix="check that the right file was given")
        ncols = len(first.split("\t"))
        if ncols < 4:
            raise InputFormatError(
                f"expected at least 4 tab-separated columns (chrom, start, end, barcode[, count]), "
                f"found {ncols}", path=str(self.path), line=n_header + 1,
                fix="give a 10x-style fragment file (tab-separated, no header)")
        return n_header, ncols

    def _locate_bad_line(self, line0: int, nrows: int, reason: str) -> InputFormatError:
        """Slow scan of the chunk that failed to parse: name the first bad line."""
        ncols = self._ncols
        with open_text(self.path) as fh:
            for lineno, ln in enumerate(fh, start=1):
                if lineno < line0:
                    continue
                if lineno >= line0 + nrows + 1:
                    break
                msg = _check_fragment_line(ln.rstrip("\n\r"), ncols)
                if msg:
                    return InputFormatError(f"malformed fragment line: {msg}", path=str(self.path),
                                            line=lineno,
                                            fix="fix or remove the line (chrom<TAB>start<TAB>end<TAB>barcode"
                                                "[<TAB>count]); a truncated file must be re-downloaded")
        return InputFormatError(f"cannot parse the fragment file near line {line0} ({reason})",
                                path=str(self.path), line=line0,
                                fix="check the file; it may be truncated or not a fragment file")

    def _pysam_iter(self):
        try:
            import pysam  # noqa: F401
        except ImportError:
            return None
        tbi = Path(str(self.path) + ".tbi")
        if not tbi.exists():
            return None
        return tbi

    def _source(self):
        """(binary stream, header lines to skip)."""
        if self.region is not None and self._pysam_iter() is not None:
            import io

            import pysam

            chrom, s, e = self.region
            with pysam.TabixFile(str(self.path)) as tb:
                text = "\n".join(tb.fetch(chrom, s, e))
            return io.BytesIO((text + "\n").encode("utf-8") if text else b""), 0
        return _open_bytes(self.path, background=self._budget() >= 3), self._n_header

    def _read_size(self) -> int:
        return int(min(READ_BYTES_MAX, max(1 << 16, self.chunksize * 64)))

    def _raw_chunks(self) -> Iterator[FragmentChunk]:
        """Validated chunks of the whole file, before the region / whitelist filters."""
        errors = _decompress_errors()
        chunksize = max(int(self.chunksize), 1)
        ncols = self._ncols
        line = self._n_header + 1
        fh, skip = self._source()  # starts inflating in the background ...
        nthreads = self._nthreads()
        pool = None
        if nthreads > 1:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(nthreads - 1, thread_name_prefix="epiflow-parse")
        with fh, (pool if pool is not None else contextlib.nullcontext()):
            from . import _fragkernels as K  # ... while the compiled kernels load

            ct, bt = self._tables()
            read = self._read_size()
            buf = np.empty(2 * read + 1, dtype=np.uint8)
            have = 0          # valid bytes in buf
            eof = False
            line_len = 24.0   # mean bytes per line (updated as lines are parsed)
            while not eof:
                if len(buf) - have < read + 1:  # a line longer than the buffer: grow it
                    nbuf = np.empty(2 * len(buf), dtype=np.uint8)
                    nbuf[:have] = buf[:have]
                    buf = nbuf
                try:
                    k = fh.readinto(memoryview(buf)[have:have + read])
                except errors as exc:
                    raise InputFormatError(
                        f"the compressed fragment file ends early or is corrupt ({line - 1:,} complete "
                        f"lines decoded before the damage: {exc})", path=str(self.path), line=line,
                        fix="the file is truncated; re-download it (check its sha256)") from None
                eof = not k
                have += k
                if eof:
                    if have and buf[have - 1] != K.NL:
                        buf[have] = K.NL
                        have += 1
                    cut = have
                else:
                    cut = K.last_line_end(buf, have)
                    if cut == 0:
                        continue
                pos = 0
                if skip:
                    pos, m = K.line_ends(buf, 0, cut, skip)
                    skip -= m
                while pos < cut:
                    if pool is not None and cut - pos >= PARALLEL_MIN_BYTES:
                        got = self._parse_parallel(K, pool, nthreads, buf, pos, cut, chunksize, line)
                        if got is not None:
                            yield got
                            line += got.n_raw
                            line_len = (cut - pos) / max(got.n_raw, 1)
                            pos = cut
                            continue
                    # outputs sized from the mean line length so far (a chunk that fills them ends
                    # early; the next one goes on from there)
                    m = min(chunksize, int((cut - pos) / line_len * 1.05) + 64)
                    out = [np.empty(m, np.int64) for _ in range(5)]
                    st, n, newpos, _, _ = K.parse_block(buf, pos, cut, m, ncols, *ct.arrays(), *bt.arrays(),
                                                        self._frozen, *out, False, *(_NO_MISS,) * 4)
                    if n >= 64:
                        line_len = (newpos - pos) / n
                    if n:
                        yield FragmentChunk(out[0][:n], self._chrom_names(), out[1][:n], out[2][:n],
                                            out[3][:n], out[4][:n], line, n)
                        line += n
                    pos = newpos
                    if st == K.GROW_CHROM:
                        ct.grow()
                    elif st == K.GROW_BC:
                        bt.grow()
                    elif st == K.SLOW:
                        end, m = K.line_ends(buf, pos, cut, min(chunksize, SLOW_LINES))
                        yield self._slow_chunk(buf[pos:end].tobytes(), line, m)
                        line += m
                        pos = end
                rest = have - cut
                buf[:rest] = buf[cut:have]
                have = rest

    def _budget(self) -> int:
        """Threads this reader may keep busy: ``threads``, else the process's
        (:func:`epiflow.threads.default_threads`: ``OMP_NUM_THREADS``, which ``--threads`` and
        Snakemake set, else the usable cores)."""
        if self.threads is not None:
            return max(int(self.threads), 1)
        from ..threads import default_threads

        return default_threads()

    def _nthreads(self) -> int:
        """Threads parsing one buffer at once: with a budget of 3 or more, inflating and the consumer
        (overlap counting) keep ~2 of them busy already; at most :data:`MAX_PARSE_THREADS`."""
        return max(1, min(MAX_PARSE_THREADS, self._budget() - 2))

    def _parse_parallel(self, K, pool, T: int, buf, pos: int, cut: int, chunksize: int,
                        line0: int) -> FragmentChunk | None:
        """Parse ``buf[pos:cut]`` in ``T`` parts at once (the string tables are only read), then
        intern the misses in file order. None (nothing changed) when the part is not all canonical
        lines or holds more than ``chunksize`` lines: the caller parses it sequentially."""
        bounds = [pos]
        for i in range(1, T):
            b = int(K.line_ends(buf, pos + (cut - pos) * i // T, cut, 1)[0])
            bounds.append(max(b, bounds[-1]))
        bounds.append(cut)
        parts = [(bounds[i], bounds[i + 1]) for i in range(T) if bounds[i + 1] > bounds[i]]

        def count(ab):
            return int(K.line_ends(buf, ab[0], ab[1], 1 << 62)[1])

        futs = [pool.submit(count, ab) for ab in parts[1:]]
        sizes = [count(parts[0])] + [f.result() for f in futs]
        total = sum(sizes)
        if total > chunksize or total == 0:
            return None
        offs = np.concatenate([[0], np.cumsum(sizes)])
        out = [np.empty(total, np.int64) for _ in range(5)]
        miss_idx = np.empty(total, np.int64)
        miss_pos = np.empty(total, np.int64)
        new_pos = np.empty((len(parts), MAX_NEW_CHROMS), np.int64)
        new_len = np.empty((len(parts), MAX_NEW_CHROMS), np.int64)
        ct, bt = self._tables()
        ncols, frozen = self._ncols, self._frozen

        def parse(i):
            a, b = offs[i], offs[i + 1]
            return K.parse_block(buf, parts[i][0], parts[i][1], sizes[i], ncols, *ct.arrays(), *bt.arrays(),
                                 frozen, *(o[a:b] for o in out), True, miss_idx[a:b], miss_pos[a:b],
                                 new_pos[i], new_len[i])

        futs = [pool.submit(parse, i) for i in range(1, len(parts))]
        res = [parse(0)] + [f.result() for f in futs]
        if any(r[0] != K.OK or r[1] != sizes[i] for i, r in enumerate(res)):
            return None
        for i, (_, _, _, nm, nnew) in enumerate(res):  # in file order: codes by first appearance
            a, b = offs[i], offs[i + 1]
            if nnew:  # chromosomes new to the table: provisional codes -2 - k -> interned codes
                names = [buf[new_pos[i, k]:new_pos[i, k] + new_len[i, k]].tobytes() for k in range(nnew)]
                codes = ct.intern_bytes(names)
                seg = out[0][a:b]
                prov = seg <= -2
                seg[prov] = codes[-2 - seg[prov]]
            k = 0
            while k < nm:  # barcodes new to the table
                st, k = K.fix_misses(buf, miss_idx[a:a + nm] + a, miss_pos[a:a + nm], k, nm, out[3],
                                     *bt.arrays())
                if st == K.GROW_BC:
                    bt.grow()
        return FragmentChunk(out[0], self._chrom_names(), out[1], out[2], out[3], out[4], line0, total)

    def _slow_chunk(self, text: bytes, line0: int, nrows: int) -> FragmentChunk:
        """Parse lines that are not in the canonical form with pandas (same checks and errors)."""
        import io

        # all columns are named (no usecols), plus one overflow column that must stay empty: pandas
        # does not reliably flag a line with one extra field
        names = (["chrom", "start", "end", "barcode", "count"]
                 + [f"extra{i}" for i in range(5, self._ncols)])[: self._ncols] + ["_overflow"]
        dtype = {"chrom": "category", "start": np.int64, "end": np.int64, "barcode": "category",
                 "_overflow": "category"}
        if "count" in names:
            dtype["count"] = np.float64  # float so that NaN / non-integers can be reported, not crash
        try:
            df = pd.read_csv(io.BytesIO(text), sep="\t", header=None, names=names, dtype=dtype,
                             engine="c", index_col=False, skip_blank_lines=False, na_filter=True,
                             low_memory=False)
        except (ValueError, pd.errors.ParserError, TypeError, UnicodeDecodeError) as exc:
            raise self._locate_bad_line(line0, nrows, str(exc).splitlines()[0]) from None
        if len(df) != nrows:
            raise self._locate_bad_line(line0, nrows, f"{len(df)} rows parsed from {nrows} lines")
        return self._validate(df, line0)

    def __iter__(self) -> Iterator[FragmentChunk]:
        n_lines = n_skipped = n_yield = 0
        self.stats = {}
        # parsing runs one chunk ahead in a background thread (the compiled kernels release the GIL),
        # so the consumer's work on chunk i (e.g. overlap counting) overlaps the parsing of chunk i+1
        # (a budget of one thread parses in the consumer's thread; 2 threads: parse ahead, inflating
        # in the parsing thread; 3 or more: inflate in a thread of its own too)
        raw = _in_background(self._raw_chunks, depth=PARSE_AHEAD) if self._budget() >= 2 else self._raw_chunks()
        for chunk in raw:
            n_lines += chunk.n_raw
            if self.region is not None:
                keep = (chunk.chrom == normalize_chrom([self.region[0]])[0]) & \
                       (chunk.end > self.region[1]) & (chunk.start < self.region[2])
                chunk = _subset_chunk(chunk, keep)
            if self.whitelist is not None:
                keep = chunk.barcode >= 0
                n_skipped += int((~keep).sum())
                chunk = _subset_chunk(chunk, keep)
            n_yield += len(chunk)
            self.stats = {"lines": n_lines, "skipped_not_whitelisted": n_skipped, "fragments": n_yield}
            yield chunk
        if n_lines == 0:
            raise InputFormatError("fragment file holds no fragments", path=str(self.path),
                                   fix="check that the right file was given")
        self.stats = {"lines": n_lines, "skipped_not_whitelisted": n_skipped, "fragments": n_yield}

    def _validate(self, df: pd.DataFrame, line0: int) -> FragmentChunk:
        path = str(self.path)
        n = len(df)
        start = df["start"].to_numpy()
        end = df["end"].to_numpy()
        chrom_cat = df["chrom"].cat
        bc_cat = df["barcode"].cat
        chrom_codes = chrom_cat.codes.to_numpy()
        bc_codes = bc_cat.codes.to_numpy()
        if "count" in df:
            cnt = df["count"].to_numpy()
        else:
            cnt = np.ones(n, dtype=np.float64)

        def fail(mask, msg, fix):
            i = int(np.flatnonzero(mask)[0])
            raise InputFormatError(msg(i), path=path, line=line0 + i, fix=fix)

        missing = (chrom_codes < 0) | (bc_codes < 0) | np.isnan(cnt) | df["_overflow"].notna().to_numpy()
        if missing.any():
            raise self._locate_bad_line(line0, n, "missing field")
        if (start < 0).any():
            fail(start < 0, lambda i: f"negative start {start[i]}", "coordinates are 0-based, >= 0")
        if (start > end).any():
            fail(start > end, lambda i: f"start {start[i]} > end {end[i]}",
                 "each fragment needs start <= end (BED, 0-based half-open)")
        if "count" in df:
            badc = (cnt < 1) | (cnt != np.floor(cnt)) | ~np.isfinite(cnt)
            if badc.any():
                fail(badc, lambda i: f"count {cnt[i]!r} is not a positive integer (field 'count')",
                     "the 5th column must be the number of reads/duplicates of the fragment (>= 1)")
        # chromosome and barcode codes: chunk-local categories -> the reader's tables, new names in
        # order of first appearance
        ctab, btab = self._tables()
        cgl = ctab.intern(np.asarray(chrom_cat.categories, dtype=object)[pd.unique(chrom_codes)])
        cmap = np.empty(len(chrom_cat.categories), dtype=np.int64)
        cmap[pd.unique(chrom_codes)] = cgl
        appear = pd.unique(bc_codes)
        bgl = btab.intern(np.asarray(bc_cat.categories, dtype=object)[appear], frozen=self._frozen)
        bmap = np.full(len(bc_cat.categories), -1, dtype=np.int64)
        bmap[appear] = bgl
        return FragmentChunk(cmap[chrom_codes].astype(np.int64), self._chrom_names(),
                             start.astype(np.int64), end.astype(np.int64), bmap[bc_codes],
                             cnt.astype(np.int64), line0, n)


def _subset_chunk(c: FragmentChunk, keep: np.ndarray) -> FragmentChunk:
    if keep.all():
        return c
    return FragmentChunk(c.chrom_codes[keep], c.chroms, c.start[keep], c.end[keep], c.barcode[keep],
                         c.count[keep], c.first_line, c.n_raw)


def _check_fragment_line(ln: str, ncols: int) -> str | None:
    if ln.strip() == "":
        return "empty line"
    parts = ln.split("\t")
    if len(parts) != ncols:
        return f"{len(parts)} tab-separated fields, expected {ncols} (line truncated or wrong separator)"
    chrom, s, e, bc = parts[:4]
    if not chrom:
        return "empty chromosome field"
    try:
        si, ei = int(s), int(e)
    except ValueError:
        return f"start/end '{s}'/'{e}' are not integers"
    if si < 0:
        return f"negative start {si}"
    if si > ei:
        return f"start {si} > end {ei}"
    if not bc:
        return "empty barcode field"
    if ncols >= 5:
        try:
            c = float(parts[4])
        except ValueError:
            return f"count '{parts[4]}' is not a number (field 'count')"
        if not np.isfinite(c) or c < 1 or c != int(c):
            return f"count {parts[4]} is not a positive integer (field 'count')"
    return None


def read_fragments(path, whitelist=None, chunksize: int = DEFAULT_CHUNKSIZE) -> pd.DataFrame:
    """Whole fragment file as a DataFrame (chrom, start, end, barcode, count); for small files/tests."""
    rd = FragmentReader(path, whitelist=whitelist, chunksize=chunksize)
    parts = [pd.DataFrame({"chrom": c.chrom, "start": c.start, "end": c.end,
                           "barcode": c.barcode, "count": c.count}) for c in rd]
    df = pd.concat(parts, ignore_index=True)
    df["barcode"] = rd.barcodes[df["barcode"].to_numpy()]
    return df


def read_labels(path: str | os.PathLike) -> pd.DataFrame:
    """Label table (TSV with header; first column = barcode) indexed by barcode."""
    path = _need_file(Path(path), "label table")
    try:
        df = pd.read_csv(path, sep="\t", dtype=str)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputFormatError(f"cannot parse the label table ({exc})", path=str(path),
                               fix="tab-separated, header line, first column = barcode") from None
    if df.shape[1] < 2 or len(df) == 0:
        raise InputFormatError("the label table needs a header, a barcode column and >= 1 label column",
                               path=str(path), fix="e.g. 'barcode<TAB>cell_type'")
    bc = df.iloc[:, 0].to_numpy(dtype=object)
    check_unique_barcodes(bc, path=str(path), what="label table", line_offset=2)
    return df.set_index(df.columns[0])


# ----------------------------------------------------------------------------------------------
# matrices
# ----------------------------------------------------------------------------------------------

def _finish_matrix(X, barcodes, var: pd.DataFrame, obs: pd.DataFrame | None, path: Path, what: str):
    import anndata as ad

    X = sp.csr_matrix(X)
    if X.nnz:
        data = X.data
        if not np.all(np.isfinite(data)):
            raise InputFormatError(f"the {what} matrix contains NaN or infinite counts", path=str(path),
                                   field="X", fix="give raw integer counts")
        if data.min() < 0:
            raise InputFormatError(f"the {what} matrix contains negative counts (min {data.min()})",
                                   path=str(path), field="X", fix="give raw (non-negative) counts")
        frac = data != np.floor(data)
        if frac.any():
            k = int(np.flatnonzero(frac)[0])
            row = int(np.searchsorted(X.indptr, k, side="right") - 1)
            raise InputFormatError(
                f"the {what} matrix holds non-integer counts: {int(frac.sum()):,} of {X.nnz:,} stored values "
                f"(first: {float(data[k])!r} at cell {row + 1}, peak {int(X.indices[k]) + 1}); normalised or "
                "scaled values would be tokenised as if they were counts", path=str(path), field="X",
                fix="give raw integer counts (e.g. adata.layers['counts'] or the fragment file)")
    check_unique_barcodes(barcodes, path=str(path), what=f"{what} barcodes (obs_names)")
    if len(var) == 0:
        raise InputFormatError(f"the {what} has no peaks", path=str(path), fix="check the file")
    if X.shape[0] == 0:
        raise InputFormatError(f"the {what} has no cells", path=str(path), fix="check the file")
    obs = pd.DataFrame(index=pd.Index(np.asarray(barcodes, dtype=str))) if obs is None else obs
    obs.index = pd.Index(np.asarray(barcodes, dtype=str))
    var = var.reset_index(drop=True)
    var.index = (var["chrom"].astype(str) + ":" + var["start"].astype(str) + "-" + var["end"].astype(str)).values
    a = ad.AnnData(X=X, obs=obs, var=var)
    a.var_names_make_unique()
    return a


def _var_intervals(var: pd.DataFrame, names, path: Path, one_based: bool) -> pd.DataFrame:
    cols = {c.lower(): c for c in var.columns}
    trip = [cols.get(k) for k in ("chrom", "start", "end")]
    if all(trip):
        df = pd.DataFrame({"chrom": var[trip[0]].astype(str).to_numpy()})
        for k, c in zip(("start", "end"), trip[1:]):
            v = pd.to_numeric(var[c], errors="coerce")
            if v.isna().any():
                i = int(np.flatnonzero(v.isna().to_numpy())[0])
                raise InputFormatError(f"var column '{c}' is not an integer at peak {i + 1}",
                                       path=str(path), field=f"var.{c}", fix="store integer coordinates")
            df[k] = v.to_numpy().astype(np.int64)
        if one_based:
            df["start"] -= 1
        df["chrom"] = normalize_chrom(df["chrom"].to_numpy())
        _check_intervals(df, path=str(path), what="peak")
        return df
    return parse_peak_names(names, path=str(path), one_based=one_based)


def open_h5ad(path, *, backed: str | None = None):
    """``anndata.read_h5ad`` with a missing, empty, truncated or foreign file raised as
    :class:`InputFormatError` naming it (h5py / anndata raise many types on broken files)."""
    import anndata as ad

    path = _need_file(Path(path), "h5ad file")
    try:
        return ad.read_h5ad(path, backed=backed)
    except Exception as exc:
        raise InputFormatError(f"cannot read the h5ad file ({type(exc).__name__}: {exc})", path=str(path),
                               fix="check that the file is a complete AnnData .h5ad") from None


def read_h5ad_matrix(path, *, layer: str | None = None, one_based: bool = False):
    path = Path(path)
    a = open_h5ad(path)
    X = a.layers[layer] if layer else a.X
    if X is None:
        raise InputFormatError("the h5ad file has no X matrix", path=str(path), field="X",
                               fix="store the cell-by-peak counts in X (or pass layer=)")
    var = _var_intervals(a.var, a.var_names.to_numpy(), path, one_based)
    extra = a.var.drop(columns=[c for c in a.var.columns if c.lower() in ("chrom", "start", "end")])
    var = pd.concat([var, extra.reset_index(drop=True)], axis=1)
    return _finish_matrix(X, a.obs_names.to_numpy(), var, a.obs.copy(), path, "h5ad")


def _h5_strings(d) -> np.ndarray:
    v = d[:]
    return np.array([x.decode() if isinstance(x, bytes) else str(x) for x in v], dtype=object)


def read_10x_h5(path, *, one_based: bool = False):
    """10x ``filtered_peak_bc_matrix.h5`` (cellranger-atac) or Multiome ``filtered_feature_bc_matrix.h5``
    (only features of type 'Peaks' are kept). The stored matrix is features x barcodes (CSC)."""
    import h5py

    path = _need_file(Path(path), "10x h5 file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputFormatError(f"not a readable HDF5 file ({exc})", path=str(path),
                               fix="give a 10x filtered_peak_bc_matrix.h5") from None
    with f:
        grp = f["matrix"] if "matrix" in f else (f[list(f.keys())[0]] if len(f.keys()) == 1 else None)
        if grp is None or not all(k in grp for k in ("data", "indices", "indptr", "shape", "barcodes")):
            raise InputFormatError("no 10x matrix group (data/indices/indptr/shape/barcodes)",
                                   path=str(path), field="matrix", fix="give a 10x filtered_peak_bc_matrix.h5")
        shape = tuple(int(x) for x in grp["shape"][:])
        M = sp.csc_matrix((grp["data"][:], grp["indices"][:], grp["indptr"][:]), shape=shape)
        barcodes = _h5_strings(grp["barcodes"])
        ftype = None
        if "features" in grp:
            fg = grp["features"]
            names = _h5_strings(fg["id"]) if "id" in fg else _h5_strings(fg["name"])
            if "feature_type" in fg:
                ftype = _h5_strings(fg["feature_type"])
            if all(k in fg for k in ("chrom", "start", "end")) and False:
                pass
        elif "peaks" in grp:
            names = _h5_strings(grp["peaks"])
        elif "genes" in grp:
            names = _h5_strings(grp["genes"])
        else:
            raise InputFormatError("no feature names (features/id or peaks)", path=str(path),
                                   field="features", fix="give a 10x peak matrix")
    X = M.T.tocsr()
    if ftype is not None and (ftype != "Peaks").any():
        keep = ftype == "Peaks"
        if not keep.any():
            raise InputFormatError("the 10x h5 has no features of type 'Peaks'", path=str(path),
                                   field="features/feature_type", fix="give an ATAC (peak) matrix")
        X = X[:, np.flatnonzero(keep)]
        names = names[keep]
    var = parse_peak_names(names, path=str(path), one_based=one_based)
    return _finish_matrix(X, barcodes, var, None, path, "10x h5")


def _find(folder: Path, stems: list[str]) -> Path | None:
    for s in stems:
        for ext in ("", ".gz"):
            p = folder / f"{s}{ext}"
            if p.exists():
                return p
    return None


def read_10x_mtx(folder, *, one_based: bool = False):
    """10x mtx folder: ``matrix.mtx[.gz]`` (peaks x barcodes), ``barcodes.tsv[.gz]`` and
    ``peaks.bed[.gz]`` or ``features.tsv[.gz]``."""
    import scipy.io

    folder = Path(folder)
    if not folder.is_dir():
        raise InputFormatError("10x mtx input must be a folder", path=str(folder),
                               fix="point at the folder holding matrix.mtx, barcodes.tsv and peaks.bed")
    mtx = _find(folder, ["matrix.mtx"])
    bcp = _find(folder, ["barcodes.tsv"])
    peaks = _find(folder, ["peaks.bed", "features.tsv", "genes.tsv"])
    for p, nm in ((mtx, "matrix.mtx"), (bcp, "barcodes.tsv"), (peaks, "peaks.bed or features.tsv")):
        if p is None:
            raise InputFormatError(f"{nm}[.gz] missing", path=str(folder), fix="complete the 10x mtx folder")
        _need_file(p, nm)
    try:
        with (gzip.open(mtx, "rb") if _is_gzip(mtx) else open(mtx, "rb")) as fh:
            M = scipy.io.mmread(fh)
    except Exception as exc:
        raise InputFormatError(f"cannot read the MatrixMarket file ({exc})", path=str(mtx),
                               fix="re-export the matrix") from None
    from ..errors import decompression_errors

    with decompression_errors(bcp, "barcodes file"), open_text(bcp) as fh:
        barcodes = np.array([ln.rstrip("\n\r").split("\t")[0] for ln in fh if ln.strip()], dtype=object)
    with decompression_errors(peaks, "peaks / features file"), open_text(peaks) as fh:
        rows = [ln.rstrip("\n\r").split("\t") for ln in fh if ln.strip()]
    if peaks.name.startswith("peaks.bed"):
        try:
            var = pd.DataFrame({"chrom": normalize_chrom([r[0] for r in rows]),
                                "start": np.array([int(r[1]) for r in rows], dtype=np.int64),
                                "end": np.array([int(r[2]) for r in rows], dtype=np.int64)})
        except (ValueError, IndexError):
            bad = next(i for i, r in enumerate(rows) if len(r) < 3 or not (r[1].isdigit() and r[2].isdigit()))
            raise InputFormatError("peak line is not chrom<TAB>start<TAB>end", path=str(peaks), line=bad + 1,
                                   fix="fix the BED line") from None
        if one_based:
            var["start"] -= 1
        _check_intervals(var, path=str(peaks), what="peak")
    else:
        names = [r[0] for r in rows]
        ftype = np.array([r[2] if len(r) > 2 else "Peaks" for r in rows], dtype=object)
        keep = ftype == "Peaks"
        var = parse_peak_names(np.asarray(names, dtype=object)[keep], path=str(peaks), one_based=one_based)
    M = sp.csr_matrix(M)
    if peaks.name.startswith(("features", "genes")) and not keep.all():
        M = M[np.flatnonzero(keep)]
    if M.shape != (len(var), len(barcodes)):
        raise InputFormatError(f"matrix shape {M.shape} does not match {len(var)} peaks x {len(barcodes)} "
                               "barcodes", path=str(mtx), fix="the mtx folder files do not belong together")
    return _finish_matrix(M.T.tocsr(), barcodes, var, None, folder, "10x mtx")


MATRIX_FORMATS = {"h5ad": read_h5ad_matrix, "10x_h5": read_10x_h5, "10x_mtx": read_10x_mtx}


def read_matrix(path, fmt: str, **kw):
    """Read a cell-by-peak matrix (``fmt`` in h5ad, 10x_h5, 10x_mtx) into an AnnData."""
    if fmt not in MATRIX_FORMATS:
        raise InputFormatError(f"unknown matrix format '{fmt}'", field="format",
                               fix=f"use one of {sorted(MATRIX_FORMATS)}")
    return MATRIX_FORMATS[fmt](path, **kw)


def read_peak_intervals(path, fmt: str, one_based: bool = False) -> pd.DataFrame:
    """Only the peak intervals (var) of a matrix input, without loading X when possible."""
    if fmt == "h5ad":
        import anndata as ad

        p = _need_file(Path(path), "h5ad file")
        try:
            a = ad.read_h5ad(p, backed="r")
            var, names = a.var.copy(), a.var_names.to_numpy()
            a.file.close()
        except Exception as exc:
            raise InputFormatError(f"cannot read the h5ad file ({type(exc).__name__}: {exc})",
                                   path=str(p), fix="check the file") from None
        return _var_intervals(var, names, p, one_based)
    return read_matrix(path, fmt, one_based=one_based).var[["chrom", "start", "end"]].reset_index(drop=True)
