"""Gathering the workflow's results: :func:`summarize` joins the metrics tables of the tasks (and the
corpus / pretraining facts) into one long table, ``results/summary.tsv``."""

from .summary import METRIC_COLUMNS, format_summary, read_summary, summarize

__all__ = ["METRIC_COLUMNS", "format_summary", "read_summary", "summarize"]
