"""Downstream tasks (SPEC §5). Each task is a library function plus a CLI verb (``tasks/cli.py``)
and writes the common long metrics table (``task, dataset, method, metric, value``; see
:mod:`epiflow.tasks.features`) and figures.

Task modules are imported on demand (``from epiflow.tasks.features import run``) so that
importing the package stays light.
"""

__all__ = ["features"]
