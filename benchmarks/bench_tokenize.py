"""Tokenization throughput: epiflow vs the authors' PyPI ``epiagent==0.0.3``.

Both sides get the same synthetic cells x cCREs count matrix (1,355,445 cCREs as in the paper,
~3,000 accessible cCREs per cell) and the same document frequency:

* authors: ``epiagent.preprocessing.global_TFIDF`` then ``epiagent.tokenization.tokenization``
  (one Python iteration per cell, dense row per cell); sentences parsed back from their strings
* epiflow: ``epiflow.tokenize.global_tfidf`` then ``cell_sentences`` (vectorised)

The sentences are compared cell by cell: identical, or identical up to the order of tied TF-IDF
values (the authors' ``np.argsort(-v)`` leaves ties in an unspecified order; epiflow breaks them
by ascending cCRE index). Prints one JSON object.

The authors' package is optional: ``pip install --no-deps epiagent==0.0.3`` (or
``--epiagent-path DIR`` for a ``pip install --target DIR`` copy); without it, their side is skipped
with a note.

    python benchmarks/bench_tokenize.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import scipy.sparse as sp


def make_counts(n_cells: int, n_ccres: int, per_cell: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lens = rng.poisson(per_cell, n_cells).clip(1, n_ccres)
    # popularity-skewed cCRE choice, without replacement within a cell
    pop = rng.pareto(1.5, n_ccres) + 1.0
    pop /= pop.sum()
    rows, cols = [], []
    for i, k in enumerate(lens):  # data generation only (not timed)
        c = np.unique(rng.choice(n_ccres, size=int(k * 1.1) + 5, p=pop))
        c = rng.permutation(c)[:k]
        rows.append(np.full(len(c), i))
        cols.append(c)
    rows = np.concatenate(rows)
    cols = np.concatenate(cols)
    data = rng.geometric(0.7, len(rows)).astype(np.float32)
    X = sp.csr_matrix((data, (rows, cols)), shape=(n_cells, n_ccres))
    X.sum_duplicates()
    X.sort_indices()
    df = np.asarray((X > 0).sum(axis=0)).ravel().astype(np.float64) / n_cells
    df = np.maximum(df, 1.0 / n_cells)  # corpus df: every cCRE seen somewhere
    return X, df


def run_epiflow(X, df, repeat: int, n_jobs=None):
    from epiflow.tokenize import cell_sentences, global_tfidf

    best = None
    first = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        tf = global_tfidf(X, df, n_jobs=n_jobs)
        t1 = time.perf_counter()
        indptr, tokens = cell_sentences(tf, n_jobs=n_jobs)
        t2 = time.perf_counter()
        if first is None:
            first = t2 - t0
        if best is None or t2 - t0 < best[0]:
            best = (t2 - t0, t1 - t0, t2 - t1)
    return best, indptr, tokens, tf, first


def run_authors(X, df, path, repeat: int = 1):
    if path:
        sys.path.insert(0, path)
    try:
        from epiagent.preprocessing import global_TFIDF
        from epiagent.tokenization import tokenization
    except ImportError as exc:
        return None, f"epiagent not importable ({exc}); pip install --no-deps epiagent==0.0.3"
    import contextlib
    import io

    import anndata as ad

    best = None
    for _ in range(repeat):  # best of `repeat`, like ours
        a = ad.AnnData(X=sp.csr_matrix(X))
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            b = global_TFIDF(a, df)
            t1 = time.perf_counter()
            tokenization(b, num_cCREs=X.shape[1])
        t2 = time.perf_counter()
        if best is None or t2 - t0 < best[0]:
            best = (t2 - t0, t1 - t0, t2 - t1)
    sents = [np.asarray(json.loads(s), dtype=np.int64) for s in b.obs["cell_sentences"]]
    return (*best, sents), None


def compare(indptr, tokens, tf, sents):
    same = tie_only = differ = 0
    tf = sp.csr_matrix(tf)
    for i, s in enumerate(sents):
        ours = tokens[indptr[i]:indptr[i + 1]]
        if len(ours) == len(s) and np.array_equal(ours, s):
            same += 1
            continue
        row = tf.getrow(i)
        vals = dict(zip(row.indices.tolist(), row.data.tolist()))
        v_theirs = np.array([vals.get(int(t) - 4, np.nan) for t in s])
        v_ours = np.array([vals[int(t) - 4] for t in ours])
        if sorted(ours.tolist()) == sorted(s.tolist()) and np.array_equal(v_ours, v_theirs):
            tie_only += 1
        else:
            differ += 1
    return {"identical": same, "identical_up_to_ties": tie_only, "different": differ}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run (100 cells)")
    ap.add_argument("--cells", type=int, default=None)
    ap.add_argument("--ccres", type=int, default=1_355_445)
    ap.add_argument("--per-cell", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--epiagent-path", default=None, help="folder holding the epiagent package")
    ap.add_argument("--authors-repeat", type=int, default=2, help="runs of the authors' code (best kept)")
    args = ap.parse_args(argv)
    n_cells = args.cells or (100 if args.quick else 2000)
    X, df = make_counts(n_cells, args.ccres, args.per_cell)
    from epiflow.tokenize.core import _threads

    t_import = time.perf_counter()
    import epiflow.tokenize._kernels  # noqa: F401  (numba import + cached machine code)
    t_import = time.perf_counter() - t_import
    (t_ours, t_ours_tfidf, t_ours_sent), indptr, tokens, tf, t_first = run_epiflow(X, df, args.repeat)
    (t_one, _, _), indptr1, tokens1, _, _ = run_epiflow(X, df, args.repeat, n_jobs=1)
    assert np.array_equal(indptr, indptr1) and np.array_equal(tokens, tokens1)
    out = {
        "benchmark": "tokenization", "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "python": platform.python_version(), "cells": n_cells, "ccres": args.ccres,
        "mean_accessible_per_cell": float(np.diff(X.indptr).mean()),
        "epiflow_s": round(t_ours, 4), "epiflow_tfidf_s": round(t_ours_tfidf, 4),
        # once per process: importing numba and the kernels, then the first call (loads the
        # cached machine code; the very first run after an install compiles it, a few seconds)
        "epiflow_kernel_import_s": round(t_import, 4), "epiflow_first_call_s": round(t_first, 4),
        "epiflow_sentences_s": round(t_ours_sent, 4), "epiflow_cells_per_s": round(n_cells / t_ours, 1),
        "epiflow_threads": _threads(None), "usable_cores": len(os.sched_getaffinity(0)),
        "epiflow_1thread_s": round(t_one, 4), "epiflow_1thread_cells_per_s": round(n_cells / t_one, 1),
    }
    res, note = run_authors(X, df, args.epiagent_path, args.authors_repeat)
    if res is None:
        out["authors"] = "skipped"
        out["note"] = note
    else:
        t_a, t_a_tfidf, t_a_tok, sents = res
        out.update({"authors_s": round(t_a, 4), "authors_tfidf_s": round(t_a_tfidf, 4),
                    "authors_tokenization_s": round(t_a_tok, 4),
                    "authors_cells_per_s": round(n_cells / t_a, 1),
                    "speedup": round(t_a / t_ours, 1), "speedup_1thread": round(t_a / t_one, 1),
                    "speedup_tokenization_only": round(t_a_tok / t_ours_sent, 1), "target_speedup": 100,
                    "sentences": compare(indptr, tokens, tf, sents)})
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
