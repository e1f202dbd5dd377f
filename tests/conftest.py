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


# ----------------------------------------------------------------------------- shared toy data
@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory):
    """Factory of toy corpora (:func:`epiflow.train.toy.write_toy_corpus`), one per parameter set and
    test process: ``toy_corpus(n_cells=120, n_ccres=250, n_types=3, seed=2, shard_size=70)``."""
    cache: dict = {}

    def make(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            from epiflow.train.toy import write_toy_corpus

            cache[key] = write_toy_corpus(tmp_path_factory.mktemp("toy_corpus") / "corpus", **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory of untrained checkpoints (authors' format + ``.json`` side file) of the ``tiny`` preset with
    overrides, seeded: ``tiny_checkpoint(250)``, ``tiny_checkpoint(240, dim=32, dropout=0.0)``."""
    cache: dict = {}

    def make(n_ccres: int, seed: int = 0, **overrides):
        key = (int(n_ccres), int(seed), tuple(sorted(overrides.items())))
        if key not in cache:
            import torch

            from epiflow.model import EpiAgentConfig, from_config, save_epiagent_checkpoint

            torch.manual_seed(seed)
            model = from_config(EpiAgentConfig.preset("tiny", n_ccres=int(n_ccres), **overrides))
            cache[key] = save_epiagent_checkpoint(model, tmp_path_factory.mktemp("tiny_ckpt") / "checkpoint.pth",
                                                  write_config=True)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def assert_same_task_files():
    """Check that two result folders of a task verb hold the same numbers: the given tables and
    metrics.tsv (but its wall-time rows ``train_seconds``), to float tolerance (sums on other threads)."""

    def check(out: Path, ref: Path, tables, *, rtol: float = 1e-4, atol: float = 1e-5) -> None:
        import pandas as pd

        for name in tables:
            pd.testing.assert_frame_equal(pd.read_csv(out / name, sep="\t"), pd.read_csv(ref / name, sep="\t"),
                                          check_exact=False, rtol=rtol, atol=atol)
        a, b = (pd.read_csv(d / "metrics.tsv", sep="\t") for d in (out, ref))
        pd.testing.assert_frame_equal(a[a["metric"] != "train_seconds"].reset_index(drop=True),
                                      b[b["metric"] != "train_seconds"].reset_index(drop=True), check_exact=False,
                                      rtol=rtol, atol=atol)

    return check


@pytest.fixture(scope="session")
def ordered_accumulation():
    """A context manager that records every ``index_put`` with ``accumulate=True`` and repeated
    indices (forward or backward) and, on leaving, fails the test if there was one.

    That op is the backward of advanced indexing with repeated rows (``x[idx]``); on CPU with >= 2
    threads and >= 32,768 elements it adds with parallel atomic float adds, so training differs from
    run to run in the last digits. ``x.index_select(0, idx)`` has the same forward and a backward
    (``index_add_``) that sums in a fixed order. Checking the op at any size catches the pattern
    where the tests' small tensors would never take the parallel path."""
    import contextlib
    import traceback

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    ops = {aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}

    class Guard(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.hits: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in ops and kwargs.get("accumulate", args[3] if len(args) > 3 else False):
                index = [i for i in args[1] if i is not None]
                if index and not (len(index) == 1 and index[0].dtype == torch.bool):
                    flat = torch.stack([i.reshape(-1).long() for i in torch.broadcast_tensors(*index)])
                    if torch.unique(flat, dim=1).shape[1] < flat.shape[1]:
                        where = "".join(traceback.format_stack(limit=12)[:-1])
                        self.hits.append(f"{func} on {list(args[0].shape)}, repeated indices\n{where}")
            return func(*args, **kwargs)

    @contextlib.contextmanager
    def guard():
        g = Guard()
        with g:
            yield g
        assert not g.hits, ("index_put(accumulate=True) with repeated indices (use index_select): "
                            f"{len(g.hits)} call(s); first:\n{g.hits[0]}")

    return guard
