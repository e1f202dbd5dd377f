"""Per-cell quality control and the per-dataset QC table.

A cell is kept when it has at least ``min_ccres`` accessible cCREs (count > 0; SPEC §1: 100).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

QC_COLUMNS = ["dataset", "cells_in", "cells_kept", "cells_dropped", "cells_dropped_candidates",
              "cells_dropped_vocab", "median_ccres_per_cell", "frac_fragments_in_ccres",
              "lift_fraction_lost"]


def accessible_per_cell(counts) -> np.ndarray:
    """Number of accessible (count > 0) cCREs in each row of a sparse/dense matrix."""
    X = sp.csr_matrix(counts)
    return np.bincount(np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))[X.data > 0],
                       minlength=X.shape[0]).astype(np.int64)


def cell_qc(counts, min_ccres: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """``(keep, n_accessible)``: cells with at least ``min_ccres`` accessible cCREs (and never a cell
    with none)."""
    n = accessible_per_cell(counts)
    return n >= max(int(min_ccres), 1), n


def qc_table(rows: list[dict]) -> pd.DataFrame:
    """One row per dataset with :data:`QC_COLUMNS` (NaN where a figure does not apply)."""
    df = pd.DataFrame(rows)
    for c in QC_COLUMNS:
        if c not in df.columns:
            df[c] = np.nan
    return df[QC_COLUMNS + [c for c in df.columns if c not in QC_COLUMNS]]
