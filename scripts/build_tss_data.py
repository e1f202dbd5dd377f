#!/usr/bin/env python
"""Build the compact TSS tables that ship inside the package for genome-build detection.

    python scripts/build_tss_data.py /work/shared/data/hg19_tss.bed.gz /work/shared/data/hg38_tss.bed.gz

reads two TSS BED files (chrom, start, end[, name, score, strand]; one line per gene, as the
project's shared hg19_tss.bed.gz / hg38_tss.bed.gz: GENCODE/RefSeq gene starts) and writes
src/epiflow/genome/data/tss_<build>.npz: for each of chr1..chr22, chrX, chrY the sorted unique TSS
positions (0-based; the strand-aware position rule of epiflow.genome.build._tss_positions), stored as
uint32 differences of consecutive positions (np.savez_compressed; about 100 KB per build).
:func:`epiflow.genome.build.packaged_tss` reads them back. The build is taken from the file name
(hg19 / hg38).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from epiflow.genome.build import _tss_positions  # noqa: E402

CHROMS = [f"chr{i}" for i in range(1, 23)] + ["chrX", "chrY"]


def main(paths: list[str]) -> int:
    out_dir = ROOT / "src" / "epiflow" / "genome" / "data"
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in paths:
        m = re.search(r"(hg19|hg38)", Path(p).name)
        if not m:
            raise SystemExit(f"{p}: cannot tell the build (hg19/hg38) from the file name")
        pos = _tss_positions(p)
        arrays = {}
        for c in CHROMS:
            v = pos.get(c)
            if v is None or len(v) == 0:
                continue
            v = np.unique(np.asarray(v, dtype=np.int64))
            arrays[c] = np.diff(v, prepend=0).astype(np.uint32)
        dest = out_dir / f"tss_{m.group(1)}.npz"
        np.savez_compressed(dest, **arrays)
        n = sum(len(a) for a in arrays.values())
        print(f"{p} -> {dest} ({n:,} positions on {len(arrays)} chromosomes, {dest.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    raise SystemExit(main(sys.argv[1:]))
