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
