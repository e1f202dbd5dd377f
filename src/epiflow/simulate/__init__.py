"""The embedded synthetic scATAC-seq corpus (``epiflow simulate``): realistic raw inputs plus ground
truth, seeded and deterministic, so that every stage and benchmark runs without data files.
See ``docs/simulate.md``."""

from .core import simulate_corpus
from .presets import PRESETS, SimPreset, get_preset

__all__ = ["simulate_corpus", "SimPreset", "PRESETS", "get_preset"]
