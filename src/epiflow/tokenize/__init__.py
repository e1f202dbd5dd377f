"""Tokenization (SPEC §2): global TF-IDF and rank-ordered cell sentences."""

from .core import (
    CLS,
    MASK,
    NUM_SPECIAL,
    PAD,
    SEP,
    binarize,
    build_input_ids,
    cell_sentences,
    document_frequency,
    gather_rows,
    global_tfidf,
    subsample_sentences,
    truncate_sentences,
)

__all__ = [
    "PAD", "CLS", "SEP", "MASK", "NUM_SPECIAL",
    "global_tfidf", "cell_sentences", "document_frequency", "binarize",
    "truncate_sentences", "subsample_sentences", "build_input_ids", "gather_rows",
]
