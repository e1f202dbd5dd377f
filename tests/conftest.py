import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EPIFLOW_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"
DATA = SHARED / "data"

os.environ.setdefault("OMP_NUM_THREADS", "2")


def _need(path: Path, what: str):
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set EPIFLOW_SHARED to the shared/ folder)")
    return path


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return _need(FIXTURES, "golden fixtures")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _need(DATA, "shared real data")


def build_bone_marrow_corpus(out: Path, data: Path, shard_size: int) -> Path:
    """Buenrostro 2018 BM0828 + Granja 2019 (hg19, ../shared/data) mapped onto their union of peaks
    and built into a small corpus at ``out/corpus`` (the real-data task tests share it)."""
    from epiflow.corpus.build import build_corpus, candidate_set
    from epiflow.corpus.manifest import load_manifest
    from epiflow.corpus.mapping import map_dataset, write_mapped

    (out / "manifest.tsv").write_text(
        "name\tformat\tpath\tgenome\ttissue\tbatch_key\n"
        f"bm0828\th5ad\t{data}/buenrostro2018_bm0828.h5ad\thg19\tbone_marrow\tdonor\n"
        f"granja\th5ad\t{data}/granja2019_bmmc.h5ad\thg19\tbone_marrow\tdonor\n")
    entries = load_manifest(out / "manifest.tsv")
    cand, _ = candidate_set(entries, "hg19")
    for e in entries:
        a, rep = map_dataset(e, cand, "hg19", tss={"hg19": data / "hg19_tss.bed.gz"})
        write_mapped(a, out / f"{e.name}.h5ad", rep, out / f"{e.name}.json")
    build_corpus(cand, [out / f"{e.name}.h5ad" for e in entries], out / "corpus", genome="hg19",
                 min_cells=10, min_ccres_per_cell=30, shard_size=shard_size)
    return out / "corpus"
