"""Fragments -> cells x cCREs counts: epiflow (streaming) vs ``bedtools intersect`` + pandas.

A synthetic, coordinate-sorted, gzip fragment file (chrom, start, end, barcode, count) and a
synthetic non-overlapping cCRE set are generated; then, each in its own subprocess (so that peak
memory is measured separately, as the maximum resident set size):

* epiflow: ``FragmentReader`` + ``map_fragments`` (chunked; memory bounded by the chunk size plus
  the sparse result)
* baseline: ``bedtools intersect -a fragments -b ccres -wa -wb`` (every fragment-cCRE overlap once,
  the same semantics) written to a file, then pandas ``read_csv`` of it and a scipy CSR build
  (barcode codes via ``pd.factorize``) - the usual notebook recipe (the authors' preprocessing
  builds its matrix from such an intersect file too)
* snapatac2: ``snap.pp.import_fragments`` (in memory, ``sorted_by_barcode=False``, no cell filter)
  + ``snap.pp.make_peak_matrix(counting_strategy='fragment')``, in the Python of its own
  environment (``--snapatac2-python``; by default the interpreter when it imports snapatac2, else
  the epiflow ``snapatac2`` baseline environment when it is built, see ``--build-snapatac2-env``).
  SnapATAC2 counts each fragment line once (it ignores the count column), so its matrix is compared
  with epiflow's ``use_count_column=False`` matrix (``epiflow_lines``, also timed). Then SnapATAC2
  writes its ``.h5ad`` (untimed) and epiflow maps the fragments stored there (``epiflow_snapfile``,
  manifest format ``snapatac2``); that matrix is compared too.

All matrices are compared. Without ``bedtools`` on PATH the bedtools baselines are skipped with a
JSON note (Debian: ``apt-get install bedtools``), without snapatac2 the snapatac2 one. Prints one
JSON object.

    python benchmarks/bench_mapping.py --quick
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHROMS = [f"chr{i}" for i in range(1, 23)] + ["chrX"]
SPAN = 50_000_000  # synthetic chromosome length


def make_data(folder: Path, n_frag: int, n_ccres: int, n_cells: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    span = SPAN
    # cCREs: non-overlapping 200-1000 bp intervals, sorted
    per = np.full(len(CHROMS), n_ccres // len(CHROMS))
    per[: n_ccres % len(CHROMS)] += 1
    with open(folder / "ccres.bed", "w") as fh:
        for c, k in zip(CHROMS, per):
            starts = np.sort(rng.choice(span // 2000, k, replace=False)) * 2000
            ends = starts + rng.integers(200, 1000, k)
            fh.write("".join(f"{c}\t{s}\t{e}\n" for s, e in zip(starts, ends)))
    # fragments: sorted by chrom/start; about half start inside or just before a cCRE (a realistic
    # fraction of fragments in cCREs), the rest uniform background
    cc = np.loadtxt(folder / "ccres.bed", dtype=str, delimiter="\t")
    cc_chrom, cc_start = cc[:, 0], cc[:, 1].astype(np.int64)
    barcodes = np.array([f"{''.join(rng.choice(list('ACGT'), 16))}-1" for _ in range(n_cells)])
    per = np.full(len(CHROMS), n_frag // len(CHROMS))
    per[: n_frag % len(CHROMS)] += 1
    with gzip.open(folder / "fragments.tsv.gz", "wt", compresslevel=1) as fh:
        fh.write("# synthetic fragments\n")
        for c, k in zip(CHROMS, per):
            anchors = cc_start[cc_chrom == c]
            k_in = k // 2
            s_in = anchors[rng.integers(0, len(anchors), k_in)] + rng.integers(-300, 600, k_in)
            s = np.sort(np.concatenate([np.maximum(s_in, 0), rng.integers(0, span, k - k_in)]))
            e = s + rng.integers(30, 800, k)
            b = barcodes[rng.integers(0, n_cells, k)]
            n = rng.geometric(0.8, k)
            lines = np.char.add(np.char.add(np.char.add(np.char.add(
                f"{c}\t", s.astype(str)), "\t"), np.char.add(e.astype(str), "\t")),
                np.char.add(np.char.add(b, "\t"), n.astype(str)))
            fh.write("\n".join(lines.tolist()) + "\n")


def worker_snapatac2_file(folder: Path, threads: int):
    """(SnapATAC2's env) write the fragments into a SnapATAC2 .h5ad, for the epiflow_snapfile run."""
    import snapatac2 as snap

    sizes = {c: SPAN + 10_000 for c in CHROMS}
    snap.pp.import_fragments(folder / "fragments.tsv.gz", sizes, file=folder / "snap.h5ad", min_num_fragments=0,
                             sorted_by_barcode=False, tempdir=folder, n_jobs=threads).close()


def worker_epiflow_snapfile(folder: Path, chunksize: int):
    """epiflow reading the fragments stored in SnapATAC2's .h5ad (manifest format snapatac2)."""
    import pandas as pd

    from epiflow.corpus.mapping import CcreIndex, map_fragments
    from epiflow.corpus.snapfile import SnapAtac2FragmentReader

    t0 = time.perf_counter()
    c0 = _cpu_s()
    cc = pd.read_csv(folder / "ccres.bed", sep="\t", header=None, names=["chrom", "start", "end"])
    res = map_fragments(SnapAtac2FragmentReader(folder / "snap.h5ad", chunksize=chunksize), CcreIndex.from_frame(cc))
    return (time.perf_counter() - t0, _cpu_s() - c0), res.counts, res.barcodes


def worker_epiflow(folder: Path, chunksize: int, warm: bool = False, use_count_column: bool = True):
    import pandas as pd

    from epiflow.corpus.mapping import CcreIndex, map_fragments
    from epiflow.corpus.readers import FragmentReader

    if warm:  # numba's one-time start-up (import + loading the cached kernels) before the clock
        from epiflow.corpus._fragkernels import warmup

        warmup()
    t0 = time.perf_counter()
    c0 = _cpu_s()
    cc = pd.read_csv(folder / "ccres.bed", sep="\t", header=None, names=["chrom", "start", "end"])
    res = map_fragments(FragmentReader(folder / "fragments.tsv.gz", chunksize=chunksize),
                        CcreIndex.from_frame(cc), use_count_column=use_count_column)
    t = time.perf_counter() - t0
    return (t, _cpu_s() - c0), res.counts, res.barcodes


def _cpu_s() -> float:
    """User + system CPU seconds of this process (all threads) and its finished children."""
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _bedtools(folder: Path, ccres: str) -> float:
    t0 = time.perf_counter()
    with open(folder / "intersect.tsv", "w") as out:
        subprocess.run(["bedtools", "intersect", "-a", str(folder / "fragments.tsv.gz"),
                        "-b", str(folder / ccres), "-wa", "-wb"], stdout=out, check=True)
    return time.perf_counter() - t0


def worker_bedtools(folder: Path):
    """bedtools + a lean pandas build (cCRE index in a 4th BED column, pd.factorize of barcodes)."""
    import pandas as pd
    import scipy.sparse as sp

    t0 = time.perf_counter()
    c0 = _cpu_s()
    cc = pd.read_csv(folder / "ccres.bed", sep="\t", header=None, names=["chrom", "start", "end"])
    cc["id"] = np.arange(len(cc))
    cc.to_csv(folder / "ccres_id.bed", sep="\t", header=False, index=False)
    t_bt = _bedtools(folder, "ccres_id.bed")
    t1 = time.perf_counter()
    df = pd.read_csv(folder / "intersect.tsv", sep="\t", header=None, usecols=[3, 4, 8],
                     names=["c", "s", "e", "barcode", "n", "cc", "cs", "ce", "id"])
    codes, uniq = pd.factorize(df["barcode"])
    M = sp.csr_matrix((df["n"].to_numpy(np.float32), (codes, df["id"].to_numpy())),
                      shape=(len(uniq), len(cc)))
    M.sum_duplicates()
    t2 = time.perf_counter()
    return (t2 - t0, t_bt, t2 - t1, _cpu_s() - c0), M, np.asarray(uniq, dtype=object)


def worker_authors(folder: Path, epiagent_path: str | None):
    """bedtools + the authors' ``epiagent.preprocessing.construct_cell_by_ccre_matrix`` (0.0.3)."""
    if epiagent_path:
        sys.path.insert(0, epiagent_path)
    import contextlib
    import io

    from epiagent.preprocessing import construct_cell_by_ccre_matrix

    t0 = time.perf_counter()
    c0 = _cpu_s()
    t_bt = _bedtools(folder, "ccres.bed")
    t1 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        a = construct_cell_by_ccre_matrix(str(folder / "intersect.tsv"), str(folder / "ccres.bed"))
    t2 = time.perf_counter()
    return (t2 - t0, t_bt, t2 - t1, _cpu_s() - c0), a.X, np.asarray(a.obs_names, dtype=object)


def worker_snapatac2(folder: Path, threads: int):
    """SnapATAC2's own route: fragments into an in-memory AnnData, then a cell x peak matrix counting
    each fragment that overlaps a peak once (``counting_strategy='fragment'``)."""
    import snapatac2 as snap

    t0 = time.perf_counter()
    c0 = _cpu_s()
    sizes = {c: SPAN + 10_000 for c in CHROMS}
    data = snap.pp.import_fragments(folder / "fragments.tsv.gz", sizes, file=None, min_num_fragments=0,
                                    sorted_by_barcode=False, tempdir=folder, n_jobs=threads)
    t1 = time.perf_counter()
    peaks = snap.pp.make_peak_matrix(data, peak_file=folder / "ccres.bed", counting_strategy="fragment")
    t2 = time.perf_counter()
    cpu = _cpu_s() - c0
    # columns in the order of ccres.bed (the names are chrom:start-end)
    import pandas as pd

    cc = pd.read_csv(folder / "ccres.bed", sep="\t", header=None, names=["chrom", "start", "end"])
    want = (cc["chrom"] + ":" + cc["start"].astype(str) + "-" + cc["end"].astype(str)).to_numpy()
    col = pd.Index(np.asarray(peaks.var_names)).get_indexer(want)
    if (col < 0).any():
        raise RuntimeError(f"snapatac2 peak names do not match ccres.bed (e.g. {peaks.var_names[0]})")
    M = peaks.X.tocsc()[:, col]
    return (t2 - t0, t1 - t0, t2 - t1, cpu), M, np.asarray(peaks.obs_names, dtype=object)


def _maxrss_mb() -> float:
    """Peak resident memory of this process: VmHWM (Linux; ru_maxrss of a forked child can keep the
    parent's peak, e.g. of the data generation), else ru_maxrss."""
    try:
        for ln in Path("/proc/self/status").read_text().splitlines():
            if ln.startswith("VmHWM:"):
                return int(ln.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker_main(which: str, folder: Path, chunksize: int, epiagent_path: str | None = None,
                threads: int = 1):
    import scipy.sparse as sp

    if which in ("epiflow", "epiflow_warm", "epiflow_lines"):
        (t, cpu), M, bc = worker_epiflow(folder, chunksize, warm=which == "epiflow_warm",
                                         use_count_column=which != "epiflow_lines")
        info = {"s": t, "cpu_s": cpu}
    elif which == "snapatac2":
        (t, t_imp, t_mat, cpu), M, bc = worker_snapatac2(folder, threads)
        info = {"s": t, "import_s": t_imp, "matrix_s": t_mat, "cpu_s": cpu}
    elif which == "snapatac2_file":
        worker_snapatac2_file(folder, threads)
        print(json.dumps({"s": 0.0, "cpu_s": 0.0, "max_rss_mb": _maxrss_mb()}))
        return
    elif which == "epiflow_snapfile":
        (t, cpu), M, bc = worker_epiflow_snapfile(folder, chunksize)
        info = {"s": t, "cpu_s": cpu}
    else:
        (t, t_bt, t_pd, cpu), M, bc = (worker_bedtools(folder) if which == "bedtools"
                                       else worker_authors(folder, epiagent_path))
        info = {"s": t, "bedtools_s": t_bt, "pandas_s": t_pd, "cpu_s": cpu}
    order = np.argsort(bc.astype(str))
    sp.save_npz(folder / f"{which}.npz", sp.csr_matrix(M)[order], compressed=False)
    info["max_rss_mb"] = _maxrss_mb()
    print(json.dumps(info))


def run_worker(which: str, folder: Path, chunksize: int, epiagent_path: str | None = None,
               python: str | None = None, threads: int = 1) -> dict:
    cmd = [python or sys.executable, __file__, "--worker", which, "--folder", str(folder),
           "--chunksize", str(chunksize), "--threads", str(threads)]
    if epiagent_path:
        cmd += ["--epiagent-path", epiagent_path]
    env = None
    if python:  # another environment's interpreter: none of this one's paths
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    if which == "snapatac2":  # its Rust thread pools (rayon, polars) take every core unless told
        env = dict(env if env is not None else os.environ)
        env.update(RAYON_NUM_THREADS=str(threads), POLARS_MAX_THREADS=str(threads))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{which} worker failed:\n{r.stderr[-3000:]}")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    info["process_s"] = time.perf_counter() - t0  # the whole subprocess, imports included
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run (200,000 fragments)")
    ap.add_argument("--fragments", type=int, default=None, help="default 4,000,000 (quick: 200,000)")
    ap.add_argument("--ccres", type=int, default=None, help="default 300,000 (quick: 50,000)")
    ap.add_argument("--cells", type=int, default=2000)
    ap.add_argument("--chunksize", type=int, default=1_000_000)
    ap.add_argument("--epiagent-path", default=None, help="folder holding the epiagent package (optional)")
    ap.add_argument("--data-dir", default=None,
                    help="keep the generated files in this folder and reuse them when present")
    ap.add_argument("--repeat", type=int, default=1, help="runs per method; the best time is reported")
    ap.add_argument("--skip-authors", action="store_true", help="do not run the epiagent baseline")
    ap.add_argument("--snapatac2-python", default="auto",
                    help="Python of an environment with snapatac2; 'auto' (default): this interpreter when "
                         "it imports snapatac2, else the epiflow snapatac2 baseline environment when it is "
                         "built; 'off': skip SnapATAC2")
    ap.add_argument("--build-snapatac2-env", action="store_true",
                    help="with --snapatac2-python auto, build the epiflow snapatac2 environment when missing "
                         "(envs/baseline-snapatac2.yaml; about 10-15 min once)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads SnapATAC2 may use (default: the CPUs of this process)")
    ap.add_argument("--worker", choices=["epiflow", "epiflow_warm", "epiflow_lines", "bedtools", "authors",
                                         "snapatac2", "snapatac2_file", "epiflow_snapfile"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args.worker, Path(args.folder), args.chunksize, args.epiagent_path, args.threads or 1)
        return
    n_frag = args.fragments or (200_000 if args.quick else 4_000_000)
    n_cc = args.ccres or (50_000 if args.quick else 300_000)
    chunksize = min(args.chunksize, max(n_frag // 4, 10_000)) if args.quick else args.chunksize
    if args.data_dir:
        folder = Path(args.data_dir)
        folder.mkdir(parents=True, exist_ok=True)
        _run(args, folder, n_frag, n_cc, chunksize)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_mapping_") as tmp:
            _run(args, Path(tmp), n_frag, n_cc, chunksize)


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def find_snapatac2_python(choice: str, build: bool = False) -> tuple[str | None, str]:
    """(python, how) for the SnapATAC2 run; python None with the reason when there is none."""
    if choice == "off":
        return None, "skipped (--snapatac2-python off)"
    if choice != "auto":
        if not Path(choice).exists():
            raise SystemExit(f"--snapatac2-python {choice}: no such file")
        return choice, "given"
    import importlib.util

    if importlib.util.find_spec("snapatac2") is not None:
        return sys.executable, "this interpreter"
    try:
        from epiflow.baselines import venv
    except ImportError as exc:
        return None, f"skipped: snapatac2 not importable and epiflow not installed ({exc})"
    env_dir = venv.read_env_spec("snapatac2").env_dir(venv.default_cache())
    if not venv.env_python(env_dir).exists():
        if not build:
            return None, (f"skipped: snapatac2 not importable and its environment {env_dir} is not built "
                          "(--build-snapatac2-env builds it, or pip install snapatac2)")
        env_dir = venv.ensure_env("snapatac2")
    return str(venv.env_python(env_dir)), f"epiflow environment {env_dir.name}"


def _best(which, folder, chunksize, repeat, epiagent_path=None, python=None, threads=1) -> dict:
    runs = [run_worker(which, folder, chunksize, epiagent_path, python, threads)
            for _ in range(max(repeat, 1))]
    best = dict(min(runs, key=lambda r: r["s"]))
    best["all_s"] = [round(r["s"], 3) for r in runs]
    best["cpu_s"] = min(r["cpu_s"] for r in runs)
    best["process_s"] = min(r["process_s"] for r in runs)
    best["max_rss_mb"] = max(r["max_rss_mb"] for r in runs)
    return best


def _run(args, folder: Path, n_frag: int, n_cc: int, chunksize: int):
    import scipy.sparse as sp

    stamp = folder / "params.json"
    params = {"fragments": n_frag, "ccres": n_cc, "cells": args.cells}
    t0 = time.perf_counter()
    if not (stamp.exists() and json.loads(stamp.read_text()) == params
            and (folder / "fragments.tsv.gz").exists()):
        make_data(folder, n_frag, n_cc, args.cells)
        stamp.write_text(json.dumps(params))
    out = {"benchmark": "fragments_to_counts",
           "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpu",
           "fragments": n_frag, "ccres": n_cc, "cells": args.cells, "chunksize": chunksize,
           "fragment_file_mb": round((folder / "fragments.tsv.gz").stat().st_size / 2 ** 20, 1),
           "generate_s": round(time.perf_counter() - t0, 2), "repeat": args.repeat}
    ours = _best("epiflow", folder, chunksize, args.repeat)
    warm = _best("epiflow_warm", folder, chunksize, args.repeat)
    out.update({"epiflow_s": round(ours["s"], 3), "epiflow_all_s": ours["all_s"],
                "epiflow_cpu_s": round(ours["cpu_s"], 3), "epiflow_process_s": round(ours["process_s"], 3),
                "epiflow_max_rss_mb": round(ours["max_rss_mb"], 1),
                "epiflow_fragments_per_s": round(n_frag / ours["s"]),
                "epiflow_warm_s": round(warm["s"], 3), "epiflow_warm_all_s": warm["all_s"],
                "epiflow_warm_cpu_s": round(warm["cpu_s"], 3),
                "epiflow_warm_fragments_per_s": round(n_frag / warm["s"])})
    if shutil.which("bedtools") is None:
        out["baseline"] = "skipped"
        out["note"] = "bedtools not on PATH (Debian: apt-get install bedtools)"
    else:
        A = sp.load_npz(folder / "epiflow.npz")
        # bedtools only lists barcodes with >= 1 overlap; epiflow lists every barcode
        A = A[np.flatnonzero(np.diff(A.indptr) > 0)]
        out["nnz"] = int(A.nnz)
        names = {"bedtools": "bedtools_pandas", "authors": "bedtools_authors"}
        for which, label in names.items():
            if which == "authors":
                if args.skip_authors:
                    out[label] = "skipped (--skip-authors)"
                    continue
                try:
                    if args.epiagent_path:
                        sys.path.insert(0, args.epiagent_path)
                    import epiagent.preprocessing  # noqa: F401
                except ImportError as exc:
                    out[f"{label}"] = "skipped"
                    out[f"{label}_note"] = (f"epiagent not importable ({exc}); "
                                            "pip install --no-deps epiagent==0.0.3")
                    continue
            base = _best(which, folder, chunksize, args.repeat, args.epiagent_path)
            B = sp.load_npz(folder / f"{which}.npz")
            same = A.shape == B.shape and (A != B).nnz == 0
            out.update({f"{label}_s": round(base["s"], 3), f"{label}_all_s": base["all_s"],
                        f"{label}_bedtools_s": round(base["bedtools_s"], 3),
                        f"{label}_matrix_s": round(base["pandas_s"], 3),
                        f"{label}_cpu_s": round(base["cpu_s"], 3),
                        f"{label}_process_s": round(base["process_s"], 3),
                        f"{label}_max_rss_mb": round(base["max_rss_mb"], 1),
                        f"speedup_vs_{label}": round(base["s"] / ours["s"], 2),
                        f"speedup_warm_vs_{label}": round(base["s"] / warm["s"], 2),
                        f"cpu_ratio_vs_{label}": round(base["cpu_s"] / ours["cpu_s"], 2),
                        f"process_speedup_vs_{label}": round(base["process_s"] / ours["process_s"], 2),
                        f"identical_counts_{label}": bool(same)})
        out["target_speedup"] = 5
    _run_snapatac2(args, folder, chunksize, ours, out)
    print(json.dumps(out, indent=2))


def _run_snapatac2(args, folder: Path, chunksize: int, ours: dict, out: dict) -> None:
    """SnapATAC2 beside epiflow: times (fresh process each), and its matrix against epiflow's with each
    fragment line counted once (SnapATAC2 ignores the count column)."""
    import scipy.sparse as sp

    python, how = find_snapatac2_python(args.snapatac2_python, args.build_snapatac2_env)
    out["snapatac2"] = how
    if python is None:
        return
    threads = args.threads or _cpus()
    vr = subprocess.run([python, "-c", "import snapatac2; print(snapatac2.__version__)"],
                        capture_output=True, text=True)
    out["snapatac2_version"] = vr.stdout.strip() or "unknown"
    lines = _best("epiflow_lines", folder, chunksize, args.repeat)
    snap = _best("snapatac2", folder, chunksize, args.repeat, python=python, threads=threads)
    A = sp.load_npz(folder / "epiflow_lines.npz")
    A = A[np.flatnonzero(np.diff(A.indptr) > 0)]
    B = sp.csr_matrix(sp.load_npz(folder / "snapatac2.npz"))
    B = B[np.flatnonzero(np.diff(B.indptr) > 0)]
    B.data = B.data.astype(A.dtype)
    same = A.shape == B.shape and (A != B).nnz == 0
    out.update({"snapatac2_threads": threads, "snapatac2_counting_strategy": "fragment",
                "epiflow_lines_s": round(lines["s"], 3), "epiflow_lines_process_s": round(lines["process_s"], 3),
                "snapatac2_s": round(snap["s"], 3), "snapatac2_all_s": snap["all_s"],
                "snapatac2_import_s": round(snap["import_s"], 3),
                "snapatac2_matrix_s": round(snap["matrix_s"], 3),
                "snapatac2_cpu_s": round(snap["cpu_s"], 3), "snapatac2_process_s": round(snap["process_s"], 3),
                "snapatac2_max_rss_mb": round(snap["max_rss_mb"], 1),
                "speedup_vs_snapatac2": round(snap["s"] / lines["s"], 2),
                "process_speedup_vs_snapatac2": round(snap["process_s"] / lines["process_s"], 2),
                "cpu_ratio_vs_snapatac2": round(snap["cpu_s"] / lines["cpu_s"], 2),
                "identical_counts_snapatac2": bool(same),
                "snapatac2_shape": list(B.shape), "epiflow_lines_shape": list(A.shape),
                "target_speedup_vs_snapatac2": 4})
    if not same:
        D = (A - B) if A.shape == B.shape else None
        out["snapatac2_differences"] = (int(D.nnz) if D is not None else "shapes differ")
    # epiflow reading SnapATAC2's own file (manifest format snapatac2): written once by SnapATAC2, untimed
    run_worker("snapatac2_file", folder, chunksize, python=python, threads=threads)
    sf = _best("epiflow_snapfile", folder, chunksize, args.repeat)
    C = sp.load_npz(folder / "epiflow_snapfile.npz")
    C = C[np.flatnonzero(np.diff(C.indptr) > 0)]
    out.update({"snapatac2_file_mb": round((folder / "snap.h5ad").stat().st_size / 2 ** 20, 1),
                "epiflow_snapfile_s": round(sf["s"], 3), "epiflow_snapfile_cpu_s": round(sf["cpu_s"], 3),
                "epiflow_snapfile_process_s": round(sf["process_s"], 3),
                "epiflow_snapfile_max_rss_mb": round(sf["max_rss_mb"], 1),
                "identical_counts_snapfile": bool(A.shape == C.shape and (A != C).nnz == 0)})


if __name__ == "__main__":
    main()
