"""Baselines placed beside EpiAgent in every evaluation table."""

from .lsi import lsi, tfidf_lsi_matrix

__all__ = ["lsi", "tfidf_lsi_matrix"]
