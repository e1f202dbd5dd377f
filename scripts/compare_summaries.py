"""Side by side: two summary.tsv tables of the workflow (e.g. before / after a change).

    python scripts/compare_summaries.py BEFORE.tsv AFTER.tsv [--tasks annotation,imputation] \
        [--metrics NMI,ARI,accuracy] [--all]

Prints a Markdown table (task, dataset, method, metric, before, after, change) of the rows present in
both, by default only those whose value changed by more than 1e-6 (``--all``: every row).
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

KEYS = ["task", "dataset", "method", "metric"]


def compare(before: pd.DataFrame, after: pd.DataFrame, tasks=None, metrics=None, changed_only=True) -> pd.DataFrame:
    def prep(t):
        t = t[KEYS + ["value"]].copy()
        t["value"] = pd.to_numeric(t["value"], errors="coerce")
        return t.dropna(subset=["value"]).drop_duplicates(KEYS)

    m = prep(before).merge(prep(after), on=KEYS, suffixes=("_before", "_after"))
    if tasks:
        m = m[m["task"].isin(tasks)]
    if metrics:
        m = m[m["metric"].isin(metrics)]
    m["change"] = m["value_after"] - m["value_before"]
    if changed_only:
        m = m[m["change"].abs() > 1e-6]
    return m.reset_index(drop=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--tasks", help="comma-separated task names")
    p.add_argument("--metrics", help="comma-separated metric names")
    p.add_argument("--all", action="store_true", help="also the rows that did not change")
    a = p.parse_args(argv)
    split = (lambda s: [x for x in s.split(",") if x] if s else None)
    try:
        t = compare(pd.read_csv(a.before, sep="\t"), pd.read_csv(a.after, sep="\t"), split(a.tasks),
                    split(a.metrics), not a.all)
    except (OSError, KeyError, pd.errors.ParserError) as exc:
        print(f"error: cannot compare {a.before} and {a.after}: {exc} (pass two summary.tsv files of the "
              "workflow)", file=sys.stderr)
        return 2
    print("| task | dataset | method | metric | before | after | change |\n|---|---|---|---|---|---|---|")
    for r in t.itertuples():
        print(f"| {r.task} | {r.dataset} | {r.method} | {r.metric} | {r.value_before:.4g} | {r.value_after:.4g} | "
              f"{r.change:+.3g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
