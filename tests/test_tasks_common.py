"""epiflow.tasks.common (the one cell loader and model loader of the tasks) and
epiflow.report.results (the one writer of a task's result)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from epiflow.errors import EpiflowError, InputFormatError, VocabularyMismatchError
from epiflow.metrics.table import metric_rows, metrics_frame, read_metrics
from epiflow.report.results import write_task_result
from epiflow.tasks.common import TaskResult, corpus_df, corpus_vocab, load_cells, load_model


@pytest.fixture
def corpus(toy_corpus):
    return toy_corpus(n_cells=60, n_ccres=120, n_types=3, seed=1, shard_size=25)


def test_corpus_folder_shard_and_h5ad_give_the_same_cells(corpus, tmp_path):
    sh = load_cells(corpus)
    assert sh.n_cells == 60 and sh.n_ccres == 120
    assert corpus_vocab(corpus) is not None and len(corpus_vocab(corpus)) == 120
    df = corpus_df(corpus)
    assert df.shape == (120,) and corpus_df(tmp_path) is None and corpus_vocab(tmp_path) is None
    a = sh.to_anndata()
    a.write_h5ad(tmp_path / "cells.h5ad")
    np.save(tmp_path / "df.npy", df)
    again = load_cells(tmp_path / "cells.h5ad", df=tmp_path / "df.npy")
    assert again.n_cells == 60
    assert np.array_equal(again.indptr, sh.indptr) and np.array_equal(again.tokens, sh.tokens)


def test_h5ad_needs_the_corpus_document_frequency(corpus, tmp_path):
    a = load_cells(corpus).to_anndata()
    with pytest.raises(InputFormatError, match="no document frequencies"):
        load_cells(a)
    with pytest.raises(InputFormatError, match="df has 5 entries"):
        load_cells(a, df=np.ones(5))
    a.var["df"] = corpus_df(corpus)
    assert load_cells(a).n_cells == 60


def test_df_size_mismatch_names_the_df_file_and_the_h5ad(corpus, tmp_path):
    load_cells(corpus).to_anndata().write_h5ad(tmp_path / "cells.h5ad")
    np.save(tmp_path / "df.npy", np.ones(5))
    with pytest.raises(InputFormatError) as ei:
        load_cells(tmp_path / "cells.h5ad", df=tmp_path / "df.npy")
    msg = str(ei.value)
    assert msg.startswith(f"{tmp_path / 'df.npy'}, field 'df'") and str(tmp_path / "cells.h5ad") in msg, msg
    assert "5 entries" in msg and "120 cCREs" in msg


def test_dataset_selection_subset_and_errors(corpus, tmp_path):
    sh = load_cells(corpus)
    names = sh.obs["dataset"].astype(str).unique()
    assert load_cells(corpus, dataset=",".join(names)).n_cells == 60
    with pytest.raises(EpiflowError, match="no cell of dataset 'nope'"):
        load_cells(corpus, dataset="nope")
    small = load_cells(corpus, max_cells=10, seed=3)
    assert small.n_cells == 10 and small.obs["cell_id"].tolist() == load_cells(corpus, max_cells=10, seed=3).obs[
        "cell_id"].tolist()
    with pytest.raises(InputFormatError, match="does not exist"):
        load_cells(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFormatError, match="not a corpus folder"):
        load_cells(tmp_path / "empty")


def test_several_inputs_are_read_together_when_they_share_a_vocabulary(corpus, tmp_path):
    import shutil

    from epiflow.corpus.shard import Shard, open_corpus, write_shard

    one = load_cells(corpus)
    both = load_cells([corpus, corpus], dataset=None)
    assert both.n_cells == 2 * one.n_cells and np.array_equal(both.tokens[:len(one.tokens)], one.tokens)
    assert load_cells([corpus]).n_cells == one.n_cells  # a one-element list is the path itself
    assert corpus_vocab([corpus, corpus]).equals(corpus_vocab(corpus))
    assert np.array_equal(corpus_df([corpus, corpus]), corpus_df(corpus))
    # another vocabulary of the same size: refused by name, not silently concatenated
    # (a copy whose cCREs moved, and whose shards say so)
    other = tmp_path / "other"
    shutil.copytree(corpus, other)
    vb = (other / "vocab.bed").read_text().splitlines()
    moved = [f[0] + "\t" + str(int(f[1]) + 1) + "\t" + str(int(f[2]) + 1) for f in (x.split("\t") for x in vb)]
    (other / "vocab.bed").write_text("".join(x + "\n" for x in moved))
    for f in sorted((other / "shards").glob("*.h5")):
        sh = Shard.from_any(f)
        sh.vocab_id = "another-vocabulary"
        write_shard(f, sh)
    with pytest.raises(InputFormatError, match="different vocab.bed"):
        corpus_vocab([corpus, other])
    with pytest.raises(InputFormatError, match="different cCRE vocabularies"):
        load_cells([corpus, other])
    with pytest.raises(InputFormatError, match="no input"):
        load_cells([])
    assert open_corpus(corpus).vocab_id  # the toy corpus carries an id, so the check above is real


def test_integrate_takes_several_corpus_paths_and_other_verbs_one():
    from epiflow.cli import build_parser

    p = build_parser()
    a = p.parse_args(["integrate", "--corpus", "x", "y", "--query", "q", "--checkpoint", "c", "--out", "o"])
    assert a.corpus == ["x", "y"] and a.query == "q"
    a = p.parse_args(["integrate", "--corpus", "x", "--checkpoint", "c", "--out", "o"])
    assert a.corpus == "x"
    with pytest.raises(SystemExit):
        p.parse_args(["annotate", "--corpus", "x", "y", "--checkpoint", "c", "--out", "o"])


def test_load_model_checks_the_vocabulary_and_copies(corpus, tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint(120)
    m = load_model(ckpt, n_ccres=120, backend="sdpa")
    assert m.backend == "sdpa" and next(m.parameters()).dtype.is_floating_point
    copy = load_model(m, n_ccres=120)
    assert copy is not m
    with pytest.raises(VocabularyMismatchError):
        load_model(m, n_ccres=121)
    with pytest.raises(InputFormatError, match="checkpoint does not exist"):
        load_model(tmp_path / "none.pth")


def test_write_task_result_writes_every_part_atomically(tmp_path):
    res = TaskResult(
        metrics=metrics_frame(metric_rows("annotation", "d", "EpiAgent", {"accuracy": 0.5})),
        tables={"predictions": pd.DataFrame({"cell": ["a", "b"], "pred": ["x", np.nan]}),
                "confusion": pd.DataFrame([[1, 0], [0, 1]], index=pd.Index(["x", "y"], name="true"),
                                          columns=["x", "y"])},
        history=pd.DataFrame({"step": [1, 2], "loss": [1.0, 0.5]}),
        texts={"classes.json": '{"classes": ["x", "y"]}'},
        h5ad={"cells": ad.AnnData(np.ones((2, 3), dtype=np.float32))},
    )
    out = tmp_path / "out"
    written = write_task_result(res, out)
    assert [p.name for p in written][-1] == "metrics.tsv"  # last: a folder with metrics.tsv is complete
    assert {p.name for p in out.iterdir()} == {"metrics.tsv", "predictions.tsv", "confusion.tsv", "train_log.tsv",
                                               "classes.json", "cells.h5ad"}
    assert read_metrics(out / "metrics.tsv")["value"].tolist() == [0.5]
    assert pd.read_csv(out / "confusion.tsv", sep="\t", index_col=0).loc["y", "y"] == 1  # the index is kept
    assert "nan" in (out / "predictions.tsv").read_text()
    assert ad.read_h5ad(out / "cells.h5ad").shape == (2, 3)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


# ----------------------------------------------------------------------------- choosing cells before reading them
def _two_dataset_corpus(corpus, tmp_path):
    """A copy of ``corpus`` (3 shards of 25, 25, 10 cells) whose cells 30-44 are dataset 'a', the rest 'b'."""
    import shutil

    from epiflow.corpus.shard import read_shard, write_shard

    out = tmp_path / "two"
    shutil.copytree(corpus, out)
    start = 0
    for f in sorted((out / "shards").glob("*.h5")):
        sh = read_shard(f)
        sh.obs["dataset"] = np.where((np.arange(start, start + sh.n_cells) >= 30)
                                     & (np.arange(start, start + sh.n_cells) < 45), "a", "b")
        sh.obs["frip"] = np.linspace(0, 1, sh.n_cells) + start  # a numeric column too
        start += sh.n_cells
        write_shard(f, sh)
    return out


def _same_cells(x, y):
    for k in ("indptr", "tokens", "counts", "tfidf"):
        a, b = getattr(x, k), getattr(y, k)
        assert a.dtype == b.dtype and np.array_equal(a, b), k
    pd.testing.assert_frame_equal(x.obs, y.obs, check_exact=True)
    assert (x.n_ccres, x.vocab_id, x.genome, x.attrs) == (y.n_ccres, y.vocab_id, y.genome, y.attrs)


def _reference_load(source, df=None, dataset=None, max_cells=None, seed=0):
    """What load_cells gave before it chose cells first: read everything, then keep rows."""
    from epiflow.corpus.shard import Shard

    sources = source if isinstance(source, list) else [source]
    sh = Shard.concat([Shard.from_any(s if not str(s).endswith(".h5ad") else ad.read_h5ad(s), df=df)
                       for s in sources])
    if dataset:
        sh = sh.subset(np.flatnonzero(np.isin(sh.obs["dataset"].astype(str).to_numpy(), dataset.split(","))))
    if max_cells is not None and sh.n_cells > max_cells:
        sh = sh.subset(np.sort(np.random.default_rng(seed).choice(sh.n_cells, max_cells, replace=False)))
    return sh


def test_chosen_cells_are_the_cells_of_reading_everything(corpus, tmp_path):
    two = _two_dataset_corpus(corpus, tmp_path)
    shard = sorted((two / "shards").glob("*.h5"))[1]
    a = load_cells(two).to_anndata()
    a.write_h5ad(tmp_path / "cells.h5ad")
    df = corpus_df(two)
    cases = [(two, {}), (two, dict(dataset="a")), (two, dict(dataset="b", max_cells=7, seed=4)),
             (two, dict(max_cells=13, seed=1)), (two, dict(max_cells=100)), (two, dict(dataset="a,b")),
             (shard, dict(max_cells=5, seed=2)), (shard, dict(dataset="a")),
             (tmp_path / "cells.h5ad", dict(df=df, dataset="a")), (tmp_path / "cells.h5ad", dict(df=df, max_cells=9)),
             ([two, shard, two], dict(max_cells=40, seed=3)), ([shard, two], dict(dataset="a")),
             ([tmp_path / "cells.h5ad", two], dict(df=df, dataset="a", max_cells=20, seed=5))]
    for src, kw in cases:
        _same_cells(load_cells(src, **kw), _reference_load(src, **kw))


def test_a_selection_reads_only_the_chosen_cells(corpus, tmp_path, monkeypatch):
    import h5py

    from epiflow.corpus import shard as shard_mod
    from epiflow.corpus.shard import open_corpus

    two = _two_dataset_corpus(corpus, tmp_path)
    ptrs = [shard_mod.read_shard(p).indptr for p in open_corpus(two).shard_paths]
    read = []
    get = h5py.Dataset.__getitem__

    def spy(self, key):
        out = get(self, key)
        if self.name == "/tokens":
            read.append(len(out))
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    monkeypatch.setattr(shard_mod.Shard, "from_any", None)  # no whole-input read
    sh = load_cells(two, dataset="a")  # cells 30-44: shard 1 (25-49) only
    assert sh.obs["dataset"].eq("a").all() and sh.n_cells == 15
    assert read == [0, int(ptrs[1][20] - ptrs[1][5]), 0]
    read.clear()
    load_cells(two, dataset="a", max_cells=2, seed=0)
    assert len(read) == 3 and read[0] == read[2] == 0 and read[1] <= int(ptrs[1][20] - ptrs[1][5])


def test_read_shard_rows_is_the_subset_of_the_whole_shard(corpus):
    from epiflow.corpus.shard import open_corpus, read_shard, read_shard_obs

    c = open_corpus(corpus)
    p = c.shard_paths[0]
    whole = read_shard(p)
    pd.testing.assert_frame_equal(read_shard_obs(p), whole.obs)
    for rows in ([3, 1, 7, 7], [], [24], list(range(25)), [0, 24]):
        _same_cells(read_shard(p, rows=rows), whole.subset(rows))
    parts = list(c.read_rows([None, [2, 0], []], c.shard_obs()))
    _same_cells(parts[0], whole)
    _same_cells(parts[1], read_shard(c.shard_paths[1]).subset([2, 0]))
    assert parts[2].n_cells == 0 and list(parts[2].obs.columns) == list(whole.obs.columns)
