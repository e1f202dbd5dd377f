"""CLI verb ``epiflow figure``: one panel of the paper's figures from a run's results tables."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "figure", help="draw one of the paper's figure panels (fig2b ... fig6g) from results tables",
        description="Draw one figure panel from the tables the task verbs wrote: long metrics tables "
                    "(--metrics) and per-dataset tables (--table DATASET=PATH, known by their file name: "
                    "cells.tsv, predictions.tsv, per_cell.tsv, mean_accessibility.tsv.gz ...). "
                    "'epiflow figure --list' prints every panel, its inputs and the paper panel it "
                    "shows, and the paper panels that are not drawn and why (docs/paper.md). Names: "
                    "fig<N><letter> draws the paper's panel N<letter>, fig<N><letter>_<view> another "
                    "view of its data.")
    p.add_argument("panel", nargs="?", help="panel name, e.g. fig2b")
    p.add_argument("--metrics", nargs="*", default=[], help="metrics.tsv files (task dataset method metric value)")
    p.add_argument("--table", action="append", default=[], metavar="DATASET=PATH",
                   help="a per-dataset table (repeatable)")
    p.add_argument("--out", metavar="FILE", help="output PNG (with --list: the panel table as TSV)")
    p.add_argument("--svg", action="store_true", help="also write an SVG beside the PNG")
    p.add_argument("--group", action="append", default=[], metavar="GROUP",
                   help="panels with per-group views (fig3d, fig3g): draw only this held-out group (repeatable; "
                        "the paper's mono-1)")
    p.add_argument("--list", action="store_true",
                   help="list the panels (drawn, and the paper panels not drawn with the reason) and exit")
    p.add_argument("--skip", action="append", default=[], metavar="PANEL=REASON",
                   help="with --list: a panel this configuration cannot build, and why (repeatable; the "
                        "workflow passes them)")
    p.set_defaults(func=_figure)


def _figure(args: argparse.Namespace) -> int:
    from ..errors import EpiflowError
    from .figures import build_panel, panel_table

    if args.list:
        import pandas as pd

        skipped = {}
        for item in args.skip:
            name, sep, why = item.partition("=")
            if not sep or not name or not why:
                raise EpiflowError(f"--skip '{item}' is not PANEL=REASON", field="--skip",
                                   fix="e.g. --skip 'fig2f=no trajectory dataset'")
            skipped[name] = why
        tab = panel_table(skipped)
        if args.out:
            from ..io import atomic_path

            with atomic_path(args.out) as tmp:
                tab.to_csv(tmp, sep="\t", index=False)
            print(f"wrote {args.out} ({int(tab['status'].eq('drawn').sum())} drawn of {len(tab)} panels)")
            return 0
        with pd.option_context("display.width", 250, "display.max_colwidth", 110, "display.max_rows", 200):
            print(tab[["panel", "config_task", "inputs", "paper", "status"]].to_string(index=False))
        return 0
    if not args.panel or not args.out:
        raise EpiflowError("give a panel name and --out (or --list)", field="panel",
                           fix="e.g. epiflow figure fig2b --metrics results/tasks/feature_extraction/x/metrics.tsv "
                               "--out fig2b.png")
    tables: dict[str, list[str]] = {}
    for item in args.table:
        ds, sep, path = item.partition("=")
        if not sep or not ds or not path:
            raise EpiflowError(f"--table '{item}' is not DATASET=PATH", field="--table",
                               fix="e.g. --table atlas_b1=results/tasks/feature_extraction/atlas_b1/cells.tsv")
        tables.setdefault(ds, []).append(path)
    written = build_panel(args.panel, metrics=args.metrics, tables=tables, out=args.out, svg=args.svg,
                          groups=args.group)
    print("wrote " + ", ".join(map(str, written)))
    return 0
