"""Compiled (numba) kernels of the fragment reader and fragment-to-cCRE counting.

Internal module: :mod:`epiflow.corpus.readers` and :mod:`epiflow.corpus.mapping` wrap these.
Kernels are ``cache=True`` (compiled once per installation, then loaded from ``__pycache__``) and
``nogil=True`` (they run while another thread inflates the next gzip block).

Fragment lines are parsed in their canonical form only: ``chrom<TAB>start<TAB>end<TAB>barcode``
``[<TAB>count]`` (plus any further columns), decimal digits for the numbers, ``start <= end`` and
``count >= 1``, ``\\n`` line ends, no ``\\r`` or ``"`` in the text fields. The parser stops at the
first line not in that form and the caller reads that part of the file with the general (pandas)
parser, which either accepts it with the same meaning (``2.0`` counts, CRLF line ends, ...) or
raises the error naming the line; so the fast path never changes what a file means.

Strings (chromosomes, barcodes) are interned in an open-addressing hash table kept in numpy arrays
(exact: a hash match is confirmed by comparing the bytes), codes in order of first appearance.
"""

from __future__ import annotations

import numba as nb
import numpy as np

TAB = 9
NL = 10
CR = 13
QUOTE = 34

# parse_block status
OK = 0            # stopped after max_lines lines or at the end of the buffer
SLOW = 1          # the line at the returned position is not canonical: use the general parser
GROW_CHROM = 2    # the chromosome table is full: grow it and call again from the returned position
GROW_BC = 3       # the barcode table is full

_H0 = np.uint64(14695981039346656037)
_MIX = np.uint64(0x9E3779B97F4A7C15)
_S8 = np.uint64(8)
_S29 = np.uint64(29)
_S32 = np.uint64(32)
NWORDS = 3        # the first 24 bytes of every string are also kept as 3 packed words (fast compare)


# ----------------------------------------------------------------------------------------------
# string table
# ----------------------------------------------------------------------------------------------

class StringTable:
    """Interned byte strings -> int codes (first appearance order), numpy-backed for the kernels.

    Open addressing (linear probing) over ``slots`` (code or -1) with the hash of each slot in
    ``shash``; code ``i`` is ``pool[offs[i]:offs[i + 1]]``, and its first 24 bytes are packed in
    ``words[3 i: 3 i + 3]`` so that a lookup compares three words instead of the bytes."""

    def __init__(self, capacity: int = 1024, pool_bytes: int = 1 << 16):
        cap = 1 << max(int(np.ceil(np.log2(max(capacity, 8) * 2))), 4)
        self.slots = np.full(cap, -1, dtype=np.int64)
        self.shash = np.zeros(cap, dtype=np.uint64)
        self.words = np.zeros(cap // 2 * NWORDS, dtype=np.uint64)
        self.offs = np.zeros(cap // 2 + 1, dtype=np.int64)
        self.pool = np.zeros(max(pool_bytes, 64), dtype=np.uint8)
        self.state = np.zeros(1, dtype=np.int64)                # number of codes
        self._names: list[str] = []

    @property
    def n(self) -> int:
        return int(self.state[0])

    def arrays(self) -> tuple:
        return self.slots, self.shash, self.words, self.offs, self.pool, self.state

    def grow(self) -> None:
        """Double the slots, codes and byte pool and rehash (called when a kernel reports full)."""
        n = self.n
        cap = len(self.slots) * 2
        slots = np.full(cap, -1, dtype=np.int64)
        shash = np.zeros(cap, dtype=np.uint64)
        _rehash(self.slots, self.shash, slots, shash)
        words = np.zeros(cap // 2 * NWORDS, dtype=np.uint64)
        words[:n * NWORDS] = self.words[:n * NWORDS]
        offs = np.zeros(cap // 2 + 1, dtype=np.int64)
        offs[:n + 1] = self.offs[:n + 1]
        self.slots, self.shash, self.words, self.offs = slots, shash, words, offs
        used = int(self.offs[n])
        pool = np.zeros(max(len(self.pool) * 2, used + (1 << 16)), dtype=np.uint8)
        pool[:used] = self.pool[:used]
        self.pool = pool

    def intern(self, names, frozen: bool = False) -> np.ndarray:
        """Codes of ``names`` (str), inserting unknown ones unless ``frozen`` (then -1)."""
        return self.intern_bytes([str(s).encode("utf-8") for s in names], frozen)

    def intern_bytes(self, enc, frozen: bool = False) -> np.ndarray:
        """Codes of byte strings, inserting unknown ones unless ``frozen`` (then -1)."""
        out = np.empty(len(enc), dtype=np.int64)
        for i, b in enumerate(enc):
            arr = np.frombuffer(b, dtype=np.uint8).copy()
            while True:
                c = _intern_one(arr, 0, len(arr), *self.arrays(), frozen)
                if c != -2:
                    break
                self.grow()
            out[i] = c
        return out

    def names(self) -> list[str]:
        """Decoded names of all codes (cached; only new codes are decoded)."""
        n = self.n
        if len(self._names) < n:
            k0 = len(self._names)
            o = self.offs
            raw = self.pool[o[k0]:o[n]].tobytes()
            base = int(o[k0])
            self._names.extend(raw[int(o[i]) - base:int(o[i + 1]) - base].decode("utf-8", "replace")
                               for i in range(k0, n))
        return self._names


@nb.njit(cache=True, nogil=True)
def _rehash(old_slots, old_shash, slots, shash):
    mask = len(slots) - 1
    for i in range(len(old_slots)):
        c = old_slots[i]
        if c < 0:
            continue
        h = old_shash[i]
        j = np.int64(h & np.uint64(mask))
        while slots[j] >= 0:
            j = (j + 1) & mask
        slots[j] = c
        shash[j] = h


@nb.njit(cache=True, nogil=True, inline="always")
def _mix(h, w):
    h = (h ^ w) * _MIX
    return h ^ (h >> _S29)


@nb.njit(cache=True, nogil=True, inline="always")
def _slot_word(nw, wd, w0, w1, w2):
    """Keep packed word number ``nw`` of a name if it is one of the first three (compared words)."""
    if nw == 0:
        return wd, w1, w2
    if nw == 1:
        return w0, wd, w2
    if nw == 2:
        return w0, w1, wd
    return w0, w1, w2


@nb.njit(cache=True, nogil=True, inline="always")
def _final(h, ln):
    h = (h ^ np.uint64(ln)) * _MIX
    return h ^ (h >> _S32)


@nb.njit(cache=True, nogil=True)
def _intern_one(buf, s, e, slots, shash, words, offs, pool, state, frozen):
    """Code of ``buf[s:e]``; inserts when new (-1 if ``frozen``); -2 when the table must grow first.

    Hash and packed words are computed exactly as in :func:`parse_block`."""
    h = _H0
    wd = np.uint64(0)
    w0 = np.uint64(0)
    w1 = np.uint64(0)
    w2 = np.uint64(0)
    nw = 0
    for k in range(s, e):
        wd = (wd << _S8) | np.uint64(buf[k])
        if ((k - s + 1) & 7) == 0:
            h = _mix(h, wd)
            w0, w1, w2 = _slot_word(nw, wd, w0, w1, w2)
            nw += 1
            wd = np.uint64(0)
    ln = e - s
    if ln & 7:
        h = _mix(h, wd)
        w0, w1, w2 = _slot_word(nw, wd, w0, w1, w2)
    h = _final(h, ln)
    return _lookup_insert(buf, s, e, h, w0, w1, w2, slots, shash, words, offs, pool, state, frozen)


@nb.njit(cache=True, nogil=True)
def _lookup_insert(buf, s, e, h, w0, w1, w2, slots, shash, words, offs, pool, state, frozen):
    mask = len(slots) - 1
    j = np.int64(h & np.uint64(mask))
    ln = e - s
    while True:
        c = slots[j]
        if c < 0:
            break
        if shash[j] == h and offs[c + 1] - offs[c] == ln:
            if ln <= 8 * NWORDS:
                if words[3 * c] == w0 and words[3 * c + 1] == w1 and words[3 * c + 2] == w2:
                    return c
            else:
                o = offs[c]
                same = True
                for k in range(ln):
                    if pool[o + k] != buf[s + k]:
                        same = False
                        break
                if same:
                    return c
        j = (j + 1) & mask
    if frozen:
        return -1
    n = state[0]
    if (n + 1) * 2 >= len(slots) or (n + 1) * NWORDS > len(words) or offs[n] + ln > len(pool):
        return -2
    o = offs[n]
    for k in range(ln):
        pool[o + k] = buf[s + k]
    offs[n + 1] = o + ln
    words[3 * n] = w0
    words[3 * n + 1] = w1
    words[3 * n + 2] = w2
    slots[j] = n
    shash[j] = h
    state[0] = n + 1
    return n


# ----------------------------------------------------------------------------------------------
# fragment line parser
# ----------------------------------------------------------------------------------------------

@nb.njit(cache=True, nogil=True, inline="always")
def _uint_at(buf, p):
    """The decimal digits at ``buf[p:]``: ``(value, digit count, position of the first non-digit,
    that byte)``."""
    v = np.int64(0)
    d = 0
    while True:
        ch = buf[p]
        if ch < 48 or ch > 57:
            break
        v = v * 10 + (ch - 48)
        d += 1
        p += 1
    return v, d, p, ch


@nb.njit(cache=True, nogil=True)
def parse_block(buf, pos, end, max_lines, ncols,
                c_slots, c_shash, c_words, c_offs, c_pool, c_state,
                b_slots, b_shash, b_words, b_offs, b_pool, b_state, b_frozen,
                out_chrom, out_start, out_end, out_bc, out_cnt,
                lookup_only, miss_idx, miss_pos, new_pos, new_len):
    """Parse canonical lines of ``buf[pos:end]`` (``buf[end - 1]`` must be ``\\n``).

    Returns ``(status, n_lines, next, n_miss, n_new)``: rows ``[0, n_lines)`` of the outputs are
    filled and ``next`` is the start of the first line not parsed. With ``lookup_only`` the tables
    are only read (several threads may parse parts of a buffer at once): a barcode (not frozen) not
    in its table gets code -1 and the line is listed in ``miss_idx``/``miss_pos`` (row, line start;
    ``n_miss`` of them) for :func:`fix_misses`, which interns them in file order; a chromosome not in
    its table gets the provisional code ``-2 - k``, its name is ``buf[new_pos[k]:][:new_len[k]]``
    (``n_new`` names in order of appearance; SLOW when ``new_pos`` is full)."""
    n = 0
    nm = 0
    nnew = 0
    prev_s = -1
    prev_e = -1
    prev_code = -1
    while n < max_lines and pos < end:
        line0 = pos
        p = pos
        # chrom: usually the previous line's (sorted files), compared in place
        s = p
        ce = -1
        code = -1
        if prev_code != -1:
            ln = prev_e - prev_s
            k = 0
            while k < ln and buf[s + k] == buf[prev_s + k]:
                k += 1
            if k == ln and buf[s + ln] == TAB:
                ce = s + ln
                code = prev_code
        if ce < 0:
            while True:
                ch = buf[p]
                if ch <= QUOTE and (ch == TAB or ch == NL or ch == CR or ch == QUOTE):
                    break
                p += 1
            if ch != TAB or p == s:
                return SLOW, n, line0, nm, nnew
            ce = p
        p = ce + 1
        # start
        v, d, p, ch = _uint_at(buf, p)
        if ch != TAB or d == 0 or d > 18:
            return SLOW, n, line0, nm, nnew
        start = v
        p += 1
        v, d, p, ch = _uint_at(buf, p)
        if ch != TAB or d == 0 or d > 18 or v < start:
            return SLOW, n, line0, nm, nnew
        stop = v
        p += 1
        # barcode (hashed and packed while scanning, as in _intern_one)
        bs = p
        bh = _H0
        wd = np.uint64(0)
        w0 = np.uint64(0)
        w1 = np.uint64(0)
        w2 = np.uint64(0)
        nw = 0
        while True:
            ch = buf[p]
            if ch <= QUOTE and (ch == TAB or ch == NL or ch == CR or ch == QUOTE):
                break
            wd = (wd << _S8) | np.uint64(ch)
            p += 1
            if ((p - bs) & 7) == 0:
                bh = _mix(bh, wd)
                w0, w1, w2 = _slot_word(nw, wd, w0, w1, w2)
                nw += 1
                wd = np.uint64(0)
        if (p - bs) & 7:
            bh = _mix(bh, wd)
            w0, w1, w2 = _slot_word(nw, wd, w0, w1, w2)
        bh = _final(bh, p - bs)
        be = p
        if p == bs or ch == CR or ch == QUOTE:
            return SLOW, n, line0, nm, nnew
        cnt = np.int64(1)
        if ncols == 4:
            if ch != NL:
                return SLOW, n, line0, nm, nnew
        else:
            if ch != TAB:
                return SLOW, n, line0, nm, nnew
            p += 1
            v, d, p, ch = _uint_at(buf, p)
            if d == 0 or d > 18 or v < 1:
                return SLOW, n, line0, nm, nnew
            cnt = v
            if ncols == 5:
                if ch != NL:
                    return SLOW, n, line0, nm, nnew
            else:
                # further columns: exactly ncols fields, any non-empty text
                if ch != TAB:
                    return SLOW, n, line0, nm, nnew
                nf = 5
                while True:
                    p += 1
                    fs = p
                    while True:
                        ch = buf[p]
                        if ch == TAB or ch == NL or ch == CR or ch == QUOTE:
                            break
                        p += 1
                    nf += 1
                    if p == fs or ch == CR or ch == QUOTE:
                        return SLOW, n, line0, nm, nnew
                    if ch == NL:
                        break
                if nf != ncols:
                    return SLOW, n, line0, nm, nnew
        # barcode code: the lookup is written out here (numba's inlining of _lookup_insert is
        # slower); new barcodes (unless frozen: a whitelist, unknown ones get -1) are inserted there
        mask = len(b_slots) - 1
        j = np.int64(bh & np.uint64(mask))
        ln = be - bs
        bcode = -1
        while True:
            c = b_slots[j]
            if c < 0:
                break
            if b_shash[j] == bh and b_offs[c + 1] - b_offs[c] == ln:
                if ln <= 8 * NWORDS:
                    if b_words[3 * c] == w0 and b_words[3 * c + 1] == w1 and b_words[3 * c + 2] == w2:
                        bcode = c
                        break
                else:
                    o = b_offs[c]
                    same = True
                    for k in range(ln):
                        if b_pool[o + k] != buf[bs + k]:
                            same = False
                            break
                    if same:
                        bcode = c
                        break
            j = (j + 1) & mask
        miss = False
        if bcode < 0 and not b_frozen:
            if lookup_only:
                miss = True
            else:
                bcode = _lookup_insert(buf, bs, be, bh, w0, w1, w2, b_slots, b_shash, b_words, b_offs,
                                       b_pool, b_state, b_frozen)
                if bcode == -2:
                    return GROW_BC, n, line0, nm, nnew
        if code == -1:
            code = _intern_one(buf, s, ce, c_slots, c_shash, c_words, c_offs, c_pool, c_state,
                               lookup_only)
            if code == -2:
                return GROW_CHROM, n, line0, nm, nnew
            if code == -1:  # lookup_only: a chromosome new to the table gets a provisional code
                ln = ce - s
                for q in range(nnew):
                    if new_len[q] == ln:
                        same = True
                        for k in range(ln):
                            if buf[new_pos[q] + k] != buf[s + k]:
                                same = False
                                break
                        if same:
                            code = -2 - q
                            break
                if code == -1:
                    if nnew == len(new_pos):
                        return SLOW, n, line0, nm, nnew
                    new_pos[nnew] = s
                    new_len[nnew] = ln
                    code = -2 - nnew
                    nnew += 1
            prev_s = s
            prev_e = ce
            prev_code = code
        if miss:
            miss_idx[nm] = n
            miss_pos[nm] = line0
            nm += 1
        out_chrom[n] = code
        out_start[n] = start
        out_end[n] = stop
        out_bc[n] = bcode
        out_cnt[n] = cnt
        n += 1
        pos = p + 1
    return OK, n, pos, nm, nnew


@nb.njit(cache=True, nogil=True)
def fix_misses(buf, miss_idx, miss_pos, k0, nm, out_bc,
               b_slots, b_shash, b_words, b_offs, b_pool, b_state):
    """Intern the barcodes of the lines a ``lookup_only`` parse missed, in file order (so codes
    keep the order of first appearance). Returns ``(status, k)``: OK, or GROW_BC with ``k`` the miss
    to resume from after growing the table."""
    for k in range(k0, nm):
        i = miss_idx[k]
        p = miss_pos[k]
        for f in range(3):  # chrom, start, end
            while buf[p] != TAB:
                p += 1
            p += 1
        s = p
        while buf[p] != TAB and buf[p] != NL:
            p += 1
        c = _intern_one(buf, s, p, b_slots, b_shash, b_words, b_offs, b_pool, b_state, False)
        if c == -2:
            return GROW_BC, k
        out_bc[i] = c
    return OK, nm


@nb.njit(cache=True, nogil=True)
def last_line_end(buf, n):
    """Position after the last ``\n`` in ``buf[:n]`` (0 when there is none)."""
    p = n - 1
    while p >= 0 and buf[p] != NL:
        p -= 1
    return p + 1


@nb.njit(cache=True, nogil=True)
def line_ends(buf, pos, end, k):
    """Position after the k-th ``\n`` from ``pos`` (or ``end``) and the number of lines found."""
    m = 0
    p = pos
    blk = 4096
    while end - p >= blk:  # whole blocks first (a branch-free count the compiler vectorises)
        c = 0
        for q in range(p, p + blk):
            c += buf[q] == NL
        if m + c >= k:
            break
        m += c
        p += blk
    while p < end and m < k:
        if buf[p] == NL:
            m += 1
        p += 1
    return p, m


# ----------------------------------------------------------------------------------------------
# fragments -> per-chunk canonical CSR
# ----------------------------------------------------------------------------------------------

@nb.njit(cache=True, nogil=True)
def _search_left(a, lo, hi, x):
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@nb.njit(cache=True, nogil=True)
def _search_right(a, lo, hi, x):
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@nb.njit(cache=True, nogil=True)
def _gallop_left(a, lo, hi, x, hint):
    """First i in [lo, hi) with a[i] >= x (hi if none), searched outwards from ``hint``: O(log d)
    for an answer d places away (coordinate-sorted fragments move little from one to the next)."""
    if hint < lo:
        hint = lo
    elif hint > hi:
        hint = hi
    if hint < hi and a[hint] < x:
        left = hint + 1      # a[i] < x for every i < left
        right = left         # a[right] >= x, or right == hi
        step = 1
        while right < hi and a[right] < x:
            left = right + 1
            right += step
            step <<= 1
        if right > hi:
            right = hi
        return _search_left(a, left, right, x)
    right = hint
    left = hint - 1          # a[left] < x, or left < lo
    step = 1
    while left >= lo and a[left] >= x:
        right = left
        left -= step
        step <<= 1
    if left < lo:
        left = lo - 1
    return _search_left(a, left + 1, right, x)


@nb.njit(cache=True, nogil=True)
def _gallop_right(a, lo, hi, x, hint):
    """First i in [lo, hi) with a[i] > x (hi if none), searched outwards from ``hint``."""
    if hint < lo:
        hint = lo
    elif hint > hi:
        hint = hi
    if hint < hi and a[hint] <= x:
        left = hint + 1
        right = left
        step = 1
        while right < hi and a[right] <= x:
            left = right + 1
            right += step
            step <<= 1
        if right > hi:
            right = hi
        return _search_right(a, left, right, x)
    right = hint
    left = hint - 1
    step = 1
    while left >= lo and a[left] > x:
        right = left
        left -= step
        step <<= 1
    if left < lo:
        left = lo - 1
    return _search_right(a, left + 1, right, x)


@nb.njit(cache=True, nogil=True)
def count_overlaps(codes, start, end, bc, w, code2k, koff, kstart, kend, kid, kmaxlen, ksorted,
                   n_rows, n_frag, n_in):
    """Overlap every fragment with the cCREs of its chromosome and sum weights per (row, cCRE).

    ``code2k[code]`` is the cCRE-index chromosome of a fragment chromosome code (-1: none); the
    cCREs of chromosome k are ``koff[k]:koff[k+1]`` of ``kstart``/``kend``/``kid``, sorted by start
    (``ksorted[k]``: their ends are sorted too). A fragment overlaps a cCRE when
    ``start < cCRE end and cCRE start < end``. ``n_frag``/``n_in`` (per row) are incremented.
    Returns a canonical CSR (sorted column indices, no duplicates): ``indptr, indices, data``.
    """
    m = len(start)
    lo = np.empty(m, np.int64)
    hi = np.empty(m, np.int64)
    rowcnt = np.zeros(n_rows + 1, np.int64)
    hint_h = 0
    hint_l = 0
    prev_k = -1
    for i in range(m):
        r = bc[i]
        n_frag[r] += 1
        k = code2k[codes[i]]
        if k < 0:
            lo[i] = 0
            hi[i] = 0
            continue
        a = koff[k]
        b = koff[k + 1]
        if k != prev_k:
            hint_h = a
            hint_l = a
            prev_k = k
        s = start[i]
        e = end[i]
        h = _gallop_left(kstart, a, b, e, hint_h)    # cCREs starting before the fragment's end
        hint_h = h
        if ksorted[k]:
            l = _gallop_right(kend, a, h, s, hint_l)  # first cCRE ending after the fragment's start
            hint_l = l
            c = h - l if h > l else 0
        else:
            l = _gallop_left(kstart, a, h, s - kmaxlen[k] + 1, hint_l)
            hint_l = l
            c = 0
            for j in range(l, h):
                if kend[j] > s:
                    c += 1
        lo[i] = l
        hi[i] = h
        if c > 0:
            n_in[r] += 1
            rowcnt[r + 1] += c
    indptr = np.cumsum(rowcnt)
    nnz = indptr[n_rows]
    fill = indptr[:n_rows].copy()
    ind = np.empty(nnz, np.int64)
    dat = np.empty(nnz, np.float32)
    for i in range(m):
        l = lo[i]
        h = hi[i]
        if h <= l:
            continue
        r = bc[i]
        k = code2k[codes[i]]
        s = start[i]
        q = fill[r]
        wi = np.float32(w[i])
        if ksorted[k]:
            for j in range(l, h):
                ind[q] = kid[j]
                dat[q] = wi
                q += 1
        else:
            for j in range(l, h):
                if kend[j] > s:
                    ind[q] = kid[j]
                    dat[q] = wi
                    q += 1
        fill[r] = q
    # canonical rows: sort (rows are mostly sorted already) and sum duplicates, compacting in place
    out_ptr = np.zeros(n_rows + 1, np.int64)
    q = 0
    for r in range(n_rows):
        a = indptr[r]
        b = indptr[r + 1]
        if b > a:
            srt = True
            for j in range(a + 1, b):
                if ind[j] < ind[j - 1]:
                    srt = False
                    break
            if not srt:
                o = np.argsort(ind[a:b], kind="mergesort")
                ti = ind[a:b][o]
                td = dat[a:b][o]
                ind[a:b] = ti
                dat[a:b] = td
            cur = ind[a]
            acc = dat[a]
            for j in range(a + 1, b):
                if ind[j] == cur:
                    acc += dat[j]
                else:
                    ind[q] = cur
                    dat[q] = acc
                    q += 1
                    cur = ind[j]
                    acc = dat[j]
            ind[q] = cur
            dat[q] = acc
            q += 1
        out_ptr[r + 1] = q
    return out_ptr, ind[:q].astype(np.int32), dat[:q].copy()


@nb.njit(cache=True, nogil=True)
def merge_csr(ap, ai, ad, bp, bi, bd, n_rows):
    """Sum of two canonical CSR matrices with ``n_rows`` rows (``ap``/``bp`` may have fewer rows:
    missing rows are empty). Linear time, two passes (the output is allocated at its exact size);
    returns a canonical CSR."""
    na = len(ap) - 1
    nb_ = len(bp) - 1
    op = np.zeros(n_rows + 1, np.int64)
    for r in range(n_rows):  # pass 1: entries per row
        i = ap[r] if r < na else 0
        ie = ap[r + 1] if r < na else 0
        j = bp[r] if r < nb_ else 0
        je = bp[r + 1] if r < nb_ else 0
        c = 0
        while i < ie and j < je:
            if ai[i] < bi[j]:
                i += 1
            elif bi[j] < ai[i]:
                j += 1
            else:
                i += 1
                j += 1
            c += 1
        op[r + 1] = op[r] + c + (ie - i) + (je - j)
    oi = np.empty(op[n_rows], np.int32)
    od = np.empty(op[n_rows], np.float32)
    for r in range(n_rows):  # pass 2: fill
        q = op[r]
        i = ap[r] if r < na else 0
        ie = ap[r + 1] if r < na else 0
        j = bp[r] if r < nb_ else 0
        je = bp[r + 1] if r < nb_ else 0
        while i < ie and j < je:
            if ai[i] < bi[j]:
                oi[q] = ai[i]
                od[q] = ad[i]
                i += 1
            elif bi[j] < ai[i]:
                oi[q] = bi[j]
                od[q] = bd[j]
                j += 1
            else:
                oi[q] = ai[i]
                od[q] = ad[i] + bd[j]
                i += 1
                j += 1
            q += 1
        while i < ie:
            oi[q] = ai[i]
            od[q] = ad[i]
            i += 1
            q += 1
        while j < je:
            oi[q] = bi[j]
            od[q] = bd[j]
            j += 1
            q += 1
    return op, oi, od


def warmup() -> None:
    """Load every kernel (from numba's cache, else compile): numba's one-time start-up cost of a
    process (~0.3-0.5 s of CPU), for callers that want to pay it up front (e.g. benchmarks)."""
    t = StringTable(8, 64)
    t.intern(["a"])
    buf = np.frombuffer(b"chr1\t1\t2\tA\t1\n", dtype=np.uint8).copy()
    out = [np.empty(1, np.int64) for _ in range(5)]
    c = StringTable(8, 64)
    e = [np.zeros(1, np.int64) for _ in range(4)]
    parse_block(buf, 0, len(buf), 1, 5, *c.arrays(), *t.arrays(), False, *out, True, *e)
    parse_block(buf, 0, len(buf), 1, 5, *c.arrays(), *t.arrays(), False, *out, False, *e)
    fix_misses(buf, e[0], e[1], 0, 1, out[3], *t.arrays())
    line_ends(buf, 0, len(buf), 1)
    last_line_end(buf, len(buf))
    z = np.zeros(1, np.int64)
    count_overlaps(z, z, z + 2, z, z + 1, z, np.array([0, 1]), z, z + 3, z, z + 3,
                   np.ones(1, np.bool_), 1, np.zeros(1, np.int64), np.zeros(1, np.int64))
    ip = np.zeros(2, np.int64)
    merge_csr(ip, np.zeros(0, np.int32), np.zeros(0, np.float32), ip, np.zeros(0, np.int32),
              np.zeros(0, np.float32), 1)
