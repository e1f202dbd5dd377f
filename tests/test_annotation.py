"""Supervised annotation (epiflow.tasks.annotation) on a small structured synthetic corpus with a tiny
model: split, LSI projection, end-to-end fine-tuning, outputs, CLI, errors."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from epiflow.cli import main
from epiflow.corpus.shard import open_corpus
from epiflow.errors import ConfigError, EpiflowError, VocabularyMismatchError
from epiflow.metrics.table import METRIC_COLUMNS
from epiflow.model import EpiAgentConfig, derive, from_config, load_epiagent_checkpoint, save_epiagent_checkpoint
from epiflow.plots.annotation import annotation_figures, sankey_figure
from epiflow.report.results import write_task_result
from epiflow.tasks.annotation import (finetune_classifier, lsi_reference_projection,
                                      predict_proba, run, stratified_split)
from epiflow.tasks.common import corpus_vocab, load_cells, load_inputs, load_model
from epiflow.tasks.config import AnnotationConfig

FILES = {"metrics.tsv", "predictions.tsv", "confusion.tsv", "train_log.tsv", "confusion.png", "sankey.png"}


def annotate(cells, checkpoint, *, out=None, dataset=None, **settings):
    """run() on the cells / checkpoint as the CLI does it (figures with ``figures``), written to ``out``."""
    cfg = AnnotationConfig(**settings)
    res = run(*load_inputs(cells, checkpoint, cfg, dataset=dataset), cfg, dataset=dataset)
    if out is not None:
        write_task_result(res, out, models=cfg.save_model)
        if cfg.figures:
            annotation_figures(res, out, svg=cfg.svg)
    return res


@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_corpus, tiny_checkpoint):
    return (tmp_path_factory.mktemp("ann"), toy_corpus(n_cells=150, n_ccres=300, n_types=3, seed=1, shard_size=80),
            tiny_checkpoint(300))


def test_stratified_split_is_seeded_and_stratified():
    y = np.array(["a"] * 30 + ["b"] * 9 + ["c"] * 2 + ["d"])
    q = stratified_split(y, 1 / 3, seed=3)
    assert q.dtype == bool and q.shape == y.shape
    assert [int(q[y == t].sum()) for t in "abcd"] == [10, 3, 1, 0]  # single cell stays in the reference
    np.testing.assert_array_equal(q, stratified_split(y, 1 / 3, seed=3))
    assert not np.array_equal(q, stratified_split(y, 1 / 3, seed=4))
    with pytest.raises(ConfigError):
        stratified_split(y, 1.0)


def test_lsi_projection_of_reference_equals_its_fit():
    rng = np.random.default_rng(0)
    x = (rng.random((60, 80)) < 0.2).astype(np.float32)
    x[np.arange(60), rng.integers(0, 80, 60)] = 1
    er, eo, info = lsi_reference_projection(x[:40], x, n_components=10, drop_first=False)
    assert er.shape == (40, 10) and eo.shape == (60, 10) and not info["dropped_first"]
    np.testing.assert_allclose(eo[:40], er, rtol=1e-4, atol=1e-4)  # reference cells project onto themselves


def test_load_cells_dataset_filter_and_errors(toy):
    tmp, corpus, _ = toy
    shard = load_cells(corpus)
    assert shard.n_cells == 150 and len(corpus_vocab(corpus)) == 300
    assert load_cells(open_corpus(corpus).shard_paths).n_cells == 150
    assert load_cells(corpus, dataset="toy").n_cells == 150
    with pytest.raises(EpiflowError, match="no cell of dataset"):
        load_cells(corpus, dataset="nope")


def test_annotate_outputs_and_long_table(toy):
    tmp, corpus, ckpt = toy
    out = tmp / "out_linear"
    res = annotate(corpus, ckpt, epochs=1, max_steps=2, seed=0, out=out, progress=False)
    pred, met = res.tables["predictions"], res.metrics
    assert list(met.columns) == METRIC_COLUMNS
    assert set(met["method"]) == {"EpiAgent", "EpiAgent-frozen+LogReg", "LSI+LogReg", "LSI+SVM"}
    assert set(met["task"]) == {"annotation"} and set(met["dataset"]) == {"toy"}
    ep = met[met.method == "EpiAgent"].set_index("metric")["value"]
    assert ep["train_steps"] == 2 and ep["n_query"] == 50 and ep["n_reference"] == 100 and ep["n_classes"] == 3
    assert 0 <= ep["accuracy"] <= 1 and 0 <= ep["macro_F1"] <= 1
    lsi = met[met.method == "LSI+LogReg"].set_index("metric")["value"]
    assert lsi["accuracy"] > 0.9  # separable synthetic types: the baseline must get them
    assert len(pred) == 150 and set(pred["split"]) == {"reference", "query"}
    assert {"cell_id", "dataset", "split", "true", "pred_EpiAgent", "prob_EpiAgent"} <= set(pred.columns)
    assert pred["prob_EpiAgent"].between(0, 1).all()
    for f in FILES:
        assert (out / f).stat().st_size > 0, f
    assert not list(out.glob("*.tmp*")) and not list(out.glob(".*"))
    back = pd.read_csv(out / "metrics.tsv", sep="\t")
    assert list(back.columns) == METRIC_COLUMNS and len(back) == len(met)
    conf = pd.read_csv(out / "confusion.tsv", sep="\t", index_col=0)
    assert conf.to_numpy().sum() == 50
    assert len(pd.read_csv(out / "train_log.tsv", sep="\t")) == 2
    assert res.models["finetuned"].config.num_classes == 3 and not res.texts  # classes.json with save_model


def test_annotate_is_deterministic_and_leaves_the_model_alone(toy):
    tmp, corpus, ckpt = toy
    model = load_epiagent_checkpoint(ckpt, mmap=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shard = load_cells(corpus)
    cfg = AnnotationConfig(epochs=1, max_steps=2, seed=5, baselines=False, progress=False)
    r1 = run(shard, load_model(model, n_ccres=shard.n_ccres), cfg)
    r2 = run(shard, load_model(model, n_ccres=shard.n_ccres), cfg)
    pd.testing.assert_frame_equal(r1.tables["predictions"], r2.tables["predictions"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not hasattr(model, "classifier")
    assert hasattr(r1.models["finetuned"], "classifier")  # run fine-tunes the copy it is given


def test_unlabelled_cells_are_predicted_not_scored(tmp_path, toy):
    from epiflow.corpus.shard import read_shard, write_shard

    _, corpus, ckpt = toy
    sh = read_shard(open_corpus(corpus).shard_paths[0])
    sh.obs.loc[:9, "cell_type"] = ["", "nan", "NA", None, "None", "", "", "", "", ""]
    write_shard(tmp_path / "s.h5", sh)
    res = annotate(tmp_path / "s.h5", ckpt, epochs=1, max_steps=1, baselines=False, figures=False,
                   progress=False, out=tmp_path / "o")
    pred, met = res.tables["predictions"], res.metrics
    assert (pred["split"] == "unlabelled").sum() == 10
    assert met.set_index(["method", "metric"]).loc[("EpiAgent", "n_query"), "value"] + \
        met.set_index(["method", "metric"]).loc[("EpiAgent", "n_reference"), "value"] == 70


def test_mlp_focal_head_and_saved_model(toy):
    tmp, corpus, ckpt = toy
    out = tmp / "out_mlp"
    annotate(corpus, ckpt, head="mlp_focal", epochs=1, max_steps=1, baselines=False, figures=False,
             save_model=True, out=out, progress=False)
    m = load_epiagent_checkpoint(out / "finetuned.pth")
    assert m.config.classifier == "mlp" and m.config.num_classes == 3
    assert json.loads((out / "classes.json").read_text())["classes"] == ["type0", "type1", "type2"]


def test_finetuning_beats_chance_on_separable_types(toy):
    """Real end-to-end training of the tiny (randomly initialised) model: loss falls, query accuracy
    far above chance (1/3) on separable synthetic types."""
    tmp, corpus, ckpt = toy
    met = annotate(corpus, ckpt, epochs=6, lr=5e-4, batch_size=16, seed=0, baselines=False, progress=False).metrics
    ep = met[met.method == "EpiAgent"].set_index("metric")["value"]
    assert ep["train_loss_last"] < 0.5 * ep["train_loss_first"]
    assert ep["accuracy"] > 0.8 and ep["macro_F1"] > 0.8


def test_finetune_classifier_updates_encoder_and_head(toy):
    _, corpus, ckpt = toy
    shard = load_cells(corpus)
    model = load_model(ckpt)
    model = derive(model, classes=3, classifier="linear")
    w0 = model.EpiAgent_transformer.layers[0].mixer.Wqkv.weight.detach().clone()
    h0 = model.classifier.fc.weight.detach().clone()
    y = np.searchsorted(["type0", "type1", "type2"], shard.obs["cell_type"].astype(str).to_numpy())
    log = finetune_classifier(model, shard, np.arange(40), y[:40], epochs=1, batch_size=8, max_steps=3,
                              progress=False)
    assert len(log) == 3 and np.isfinite(log["loss"]).all()
    assert not torch.equal(w0, model.EpiAgent_transformer.layers[0].mixer.Wqkv.weight)
    assert not torch.equal(h0, model.classifier.fc.weight)
    probs, emb = predict_proba(model, shard, np.arange(10))
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    assert emb.shape == (10, 64)


def test_errors(toy, tmp_path):
    tmp, corpus, ckpt = toy
    with pytest.raises(ConfigError):
        annotate(corpus, ckpt, head="svm", progress=False)
    with pytest.raises(EpiflowError, match="label column"):
        annotate(corpus, ckpt, label_key="nope", progress=False)
    with pytest.raises(ConfigError):
        annotate(corpus, ckpt, trainer="shared", max_steps=3, progress=False)
    with pytest.raises(EpiflowError, match="checkpoint does not exist"):
        annotate(corpus, tmp_path / "missing.pth", progress=False)
    other = save_epiagent_checkpoint(from_config(EpiAgentConfig.preset("tiny", n_ccres=299)),
                                     tmp_path / "o.pth", write_config=True)
    with pytest.raises(VocabularyMismatchError):
        annotate(corpus, other, max_steps=1, progress=False)
    with pytest.raises(VocabularyMismatchError):  # run checks a model it is given
        run(load_cells(corpus), load_model(other), AnnotationConfig(max_steps=1, progress=False))


def test_sankey_handles_unmatched_labels(tmp_path):
    p = sankey_figure(["a", "a", "b", "c"], ["a", "x", "b", "b"], tmp_path / "s.png")
    assert p[0].stat().st_size > 0


def test_cli_annotate(toy, capsys):
    tmp, corpus, ckpt = toy
    out = tmp / "cli"
    rc = main(["annotate", "--corpus", str(corpus), "--checkpoint", str(ckpt), "--out-dir", str(out),
               "--max-steps", "2", "--no-figures", "--seed", "1"])
    assert rc == 0
    assert "LSI+SVM" in capsys.readouterr().out
    m = pd.read_csv(out / "metrics.tsv", sep="\t")
    assert m.query("method == 'EpiAgent' and metric == 'train_steps'")["value"].item() == 2
    assert (out / "predictions.tsv").exists() and not (out / "sankey.png").exists()
    rc = main(["annotate", "--corpus", str(corpus), "--checkpoint", str(ckpt), "--out-dir", str(out),
               "--head", "mlp_focal", "--label-key", "nope"])
    assert rc == 2
    assert "label column 'nope'" in capsys.readouterr().err


def test_cli_writes_the_files_of_run(toy, capsys, assert_same_task_files):
    """The CLI (new flag names, figures on) writes exactly the task's files, with the numbers of
    run() + write_task_result for the same settings; --save-model adds the model and its classes."""
    tmp, corpus, ckpt = toy
    out = tmp / "cli_files"
    rc = main(["annotate", "--input", str(corpus), "--checkpoint", str(ckpt), "--out", str(out), "--max-steps", "2",
               "--seed", "3", "--device", "cpu", "--no-progress", "--save-model"])
    assert rc == 0
    assert {p.name for p in out.iterdir()} == FILES | {"finetuned.pth", "finetuned.pth.json", "classes.json"}
    ref = tmp / "run_files"
    annotate(corpus, ckpt, out=ref, max_steps=2, seed=3, device="cpu", progress=False, figures=False)
    assert_same_task_files(out, ref, ("predictions.tsv", "confusion.tsv"))


def test_shared_trainer(toy, capsys):
    """--trainer shared: token-budget batches and a cosine schedule (epiflow.train.finetune)."""
    tmp, corpus, ckpt = toy
    out = tmp / "cli_shared"
    rc = main(["annotate", "--corpus", str(corpus), "--checkpoint", str(ckpt), "--out", str(out),
               "--trainer", "shared", "--epochs", "1", "--no-baselines", "--no-figures", "--no-progress"])
    assert rc == 0
    log = pd.read_csv(out / "train_log.tsv", sep="\t")
    assert len(log) >= 1 and np.isfinite(log["loss"]).all()
    m = pd.read_csv(out / "metrics.tsv", sep="\t")
    assert m.query("method == 'EpiAgent' and metric == 'train_steps'")["value"].item() == len(log)
