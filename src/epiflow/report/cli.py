"""CLI verb ``epiflow summarize``: one table of a workflow run's results."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "summarize", help="gather the tasks' metrics tables (+ corpus, pretraining) into one summary TSV",
        description="Concatenate metrics tables in the long format 'task dataset method metric value' "
                    "(written by the task verbs), add the corpus size (corpus.json) and the last "
                    "pretraining losses (metrics.csv), write --out and print the headline numbers.")
    p.add_argument("--metrics", nargs="*", default=[], help="metrics.tsv files of the tasks")
    p.add_argument("--corpus", help="corpus folder (adds its corpus.json numbers)")
    p.add_argument("--downstream", nargs="*", default=[],
                   help="folders of downstream datasets (epiflow tokenize-downstream): never seen in pretraining")
    p.add_argument("--external-checkpoint", action="store_true",
                   help="the model is an external checkpoint: whether it saw a dataset is unknown")
    p.add_argument("--no-corpus-rows", action="store_true",
                   help="--corpus / --downstream only fill seen_in_pretraining (no corpus size rows)")
    p.add_argument("--pretrain-metrics", help="metrics.csv of 'epiflow pretrain' (adds the last values)")
    p.add_argument("--out", metavar="FILE", help="summary TSV (task, dataset, method, metric, value, seen_in_pretraining, source)")
    p.add_argument("--table", help="only print an existing summary TSV (e.g. results/summary.tsv)")
    p.add_argument("--all", action="store_true", help="print every metric, not only the headline ones")
    p.set_defaults(func=_summarize)


def _summarize(args: argparse.Namespace) -> int:
    from .summary import format_summary, read_summary, summarize

    if args.table:
        print(format_summary(read_summary(args.table), all_metrics=args.all))
        return 0
    table = summarize(args.metrics, corpus=args.corpus, pretrain_metrics=args.pretrain_metrics, out=args.out,
                      downstream=args.downstream, external_checkpoint=args.external_checkpoint,
                      corpus_rows=not args.no_corpus_rows)
    print(format_summary(table, all_metrics=args.all))
    return 0
