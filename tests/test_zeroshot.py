"""Zero-shot annotators: train-annotator / annotate-zeroshot on a tiny synthetic corpus and tiny model."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from epiflow.cli import main
from epiflow.corpus.shard import shard_from_counts, write_corpus_meta, write_shard
from epiflow.errors import InputFormatError
from epiflow.model import load_epiagent_checkpoint
from epiflow.tasks.common import load_cells, load_model
from epiflow.tasks.config import AnnotatorConfig, ZeroshotConfig
from epiflow.tasks.zeroshot import (apply_label_map, classification_scores, mask_rare_classes, read_label_map)

N_CCRES = 120
TYPES = ["HSC", "GMP", "CLP"]


def _counts(n, seed, types_idx=None):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 3, n) if types_idx is None else types_idx
    block = np.arange(N_CCRES) % 3
    p = np.where(block[None, :] == t[:, None], 0.6, 0.03)
    acc = rng.random((n, N_CCRES)) < p
    acc[np.arange(n), rng.integers(0, N_CCRES, n)] = True
    return sp.csr_matrix(acc.astype(np.float32) * rng.integers(1, 3, (n, N_CCRES))), t


def _corpus(root: Path, n=150, seed=0, names=TYPES, dataset="atlas"):
    (root / "shards").mkdir(parents=True)
    counts, t = _counts(n, seed)
    df = np.full(N_CCRES, 0.3)
    (root / "vocab.bed").write_text("".join(f"chr1\t{i * 1000}\t{i * 1000 + 500}\n" for i in range(N_CCRES)))
    np.save(root / "df.npy", df)
    obs = pd.DataFrame({"cell_id": [f"{dataset}_{i}" for i in range(n)], "dataset": dataset,
                        "cell_type": np.asarray(names, dtype=object)[t]})
    write_shard(root / "shards/shard_00000.h5", shard_from_counts(counts, df, obs, vocab_id="toy", genome="hg38"))
    write_corpus_meta(root, {"n_cells": n, "n_ccres": N_CCRES, "vocab_id": "toy", "genome": "hg38",
                             "shards": ["shards/shard_00000.h5"], "shard_cells": [n]})
    return root


@pytest.fixture(scope="module")
def base_ckpt(tiny_checkpoint):
    return tiny_checkpoint(N_CCRES, dropout=0.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_ckpt):
    tmp = tmp_path_factory.mktemp("zs")
    corpus = _corpus(tmp / "atlas", names=["HSC", "GMP", "CLP.2"])
    lm = tmp / "map.tsv"
    lm.write_text("# coarse\nsource\ttarget\nHSC\tHSC\nGMP\tGMP\nCLP.2\tCLP\n")
    out = tmp / "annot"
    rc = main(["train-annotator", "--checkpoint", str(base_ckpt), "--input", str(corpus), "--label-map", str(lm),
               "--out-dir", str(out), "--max-steps", "60", "--batch-size", "16", "--lr", "3e-4",
               "--head-lr", "3e-3", "--device", "cpu"])
    assert rc == 0
    # the annotator folder annotate-zeroshot reads: the same files as before the settings refactoring (#18)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pth", "checkpoint.pth.json", "classes.tsv",
                                                     "metrics.tsv", "reference_ccres.npy", "train_log.tsv"]
    return tmp, out


def test_train_annotator_writes_authors_supervised_checkpoint(trained, base_ckpt):
    _, out = trained
    ckpt = out / "checkpoint.pth"
    model = load_epiagent_checkpoint(ckpt)  # num_heads from the side file
    assert model.kind == "supervised"
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    base_keys = [k for k in torch.load(base_ckpt, map_location="cpu", weights_only=True)
                 if k.startswith(("cCRE_embedding", "rank_embedding", "EpiAgent_transformer"))]
    cls_keys = [f"classifier.{m}.{p}" for m in ("fc1", "layer_norm1", "fc2", "layer_norm2", "fc3")
                for p in ("weight", "bias")]
    assert list(sd) == base_keys + cls_keys
    assert sd["classifier.fc1.weight"].shape == (256, 64)
    assert sd["classifier.fc3.weight"].shape == (3, 128)
    classes = pd.read_csv(out / "classes.tsv", sep="\t")
    assert classes["label"].tolist() == ["CLP", "GMP", "HSC"]  # coarsened through the map, sorted
    log = pd.read_csv(out / "train_log.tsv", sep="\t")
    assert len(log) == 60 and np.isfinite(log["loss"]).all()
    # the encoder was really fine-tuned (weights moved away from the pretrained ones)
    base = torch.load(base_ckpt, map_location="cpu", weights_only=True)
    assert not torch.equal(base["EpiAgent_transformer.layers.0.mlp.fc1.weight"],
                           sd["EpiAgent_transformer.layers.0.mlp.fc1.weight"])
    m = pd.read_csv(out / "metrics.tsv", sep="\t")
    assert list(m.columns) == ["task", "dataset", "method", "metric", "value"]
    assert {"accuracy", "macro_F1"} <= set(m.loc[m["method"] == "validation", "metric"])


def test_annotate_zeroshot_on_new_dataset(trained):
    tmp, out = trained
    query = _corpus(tmp / "query", n=90, seed=5, names=["HSC", "GMP", "CLP"], dataset="query")
    qmap = tmp / "qmap.tsv"
    qmap.write_text("source\ttarget\nHSC\tHSC\nGMP\tGMP\n")  # CLP unmapped -> excluded from the metrics
    res_dir = tmp / "annotated"
    rc = main(["annotate-zeroshot", "--checkpoint", str(out / "checkpoint.pth"), "--corpus", str(query),
               "--label-key", "cell_type", "--label-map", str(qmap), "--out", str(res_dir), "--device", "cpu"])
    assert rc == 0
    assert sorted(p.name for p in res_dir.iterdir()) == ["cells.tsv", "confusion.png", "metrics.tsv",
                                                         "predictions.tsv"]
    assert list(pd.read_csv(res_dir / "predictions.tsv", sep="\t").columns) == [
        "cell", "prediction", "probability", "prediction_masked", "label", "label_mapped"]
    # unmapped known labels are written as empty fields, as before
    assert "\tCLP\t\n" in (res_dir / "predictions.tsv").read_text()
    pred = pd.read_csv(res_dir / "predictions.tsv", sep="\t")
    assert len(pred) == 90 and set(pred["prediction"]) <= {"CLP", "GMP", "HSC"}
    assert pred["label_mapped"].isna().sum() == (pred["label"] == "CLP").sum()
    m = pd.read_csv(res_dir / "metrics.tsv", sep="\t")
    v = m[m["method"] == "EpiAgent-zeroshot"].set_index("metric")["value"]
    assert {"accuracy", "micro_F1", "balanced_accuracy", "macro_F1"} <= set(v.index)
    assert v["n_cells"] == (pred["label"] != "CLP").sum()
    # cell types differ in a third of the cCREs: the fine-tuned annotator is far above chance (1/3)
    assert v["accuracy"] > 0.6
    assert (res_dir / "confusion.png").stat().st_size > 0
    # cells.tsv: labels, predictions and the UMAP of the annotator's cell embeddings (panels fig6b / fig6e)
    cells = pd.read_csv(res_dir / "cells.tsv", sep="\t")
    assert list(cells.columns) == ["cell", "label", "label_mapped", "prediction", "umap1", "umap2"]
    assert cells["cell"].tolist() == pred["cell"].tolist() and cells["prediction"].tolist() == pred["prediction"].tolist()
    assert cells["label_mapped"].isna().sum() == (cells["label"] == "CLP").sum()
    assert cells[["umap1", "umap2"]].notna().all().all() and cells["umap1"].std() > 0
    # a named annotator (the workflow's tasks.zeroshot_annotation.annotators) labels its metric rows
    named = tmp / "annotated_b"
    rc = main(["annotate-zeroshot", "--checkpoint", str(out / "checkpoint.pth"), "--input", str(query),
               "--label-key", "cell_type", "--label-map", str(qmap), "--out-dir", str(named), "--device", "cpu",
               "--method", "EpiAgent-B"])
    assert rc == 0
    mb = pd.read_csv(named / "metrics.tsv", sep="\t")
    assert set(mb["method"]) <= {"EpiAgent-B", "EpiAgent-B-masked"} and "EpiAgent-B" in set(mb["method"])
    vb = mb[mb["method"] == "EpiAgent-B"].set_index("metric")["value"]
    assert vb["accuracy"] == v["accuracy"]


def test_annotate_rejects_base_checkpoint(base_ckpt, tmp_path):
    from epiflow.errors import ConfigError
    from epiflow.tasks.zeroshot import run_annotate

    corpus = _corpus(tmp_path / "c", n=20)
    with pytest.raises(ConfigError, match="without a classifier"):
        run_annotate(load_model(base_ckpt), load_cells(corpus), ["a", "b"])


def test_run_train_and_run_annotate_compute_without_writing(base_ckpt, trained, tmp_path):
    """The Python API: run_train returns the annotator (model, classes, cCREs seen, log, metrics) and
    run_annotate its predictions; write_annotator writes the folder annotate-zeroshot reads."""
    from epiflow.errors import ConfigError
    from epiflow.tasks.zeroshot import read_classes, run_annotate, run_train
    from epiflow.tasks.zeroshot_cli import write_annotator

    tmp, _ = trained
    cells = load_cells(tmp / "atlas")
    cfg = AnnotatorConfig(max_steps=5, batch_size=8, device="cpu", progress=False)
    res = run_train(load_model(base_ckpt), cells, cfg, label_map={"HSC": "HSC", "GMP": "GMP", "CLP.2": "CLP"})
    assert res.data["classes"] == ["CLP", "GMP", "HSC"] and res.models["checkpoint"].kind == "supervised"
    assert len(res.history) == 5 and list(res.history.columns) == ["step", "loss"]
    assert res.tables["classes"]["label"].tolist() == ["CLP", "GMP", "HSC"]
    assert res.data["reference_ccres"].dtype == np.int64
    assert {"train", "validation"} == set(res.metrics["method"])
    out = write_annotator(res, tmp_path / "annot")
    assert sorted(p.name for p in out.parent.iterdir()) == ["checkpoint.pth", "checkpoint.pth.json", "classes.tsv",
                                                            "metrics.tsv", "reference_ccres.npy", "train_log.tsv"]
    model = load_model(out)
    pred = run_annotate(model, load_cells(tmp / "atlas"), read_classes(out.parent / "classes.tsv"),
                        ZeroshotConfig(device="cpu", progress=False, mask=False))
    assert len(pred.data["predictions"]) == 150 and "prediction_masked" not in pred.data["predictions"]
    # the embeddings are those the classifier reads: classifying them gives the predictions
    emb = pred.data["embeddings"]
    assert emb.shape == (150, model.config.dim)
    model.eval()
    with torch.no_grad():
        again = model.classify(torch.from_numpy(emb)).argmax(1).numpy()
    names = np.asarray(read_classes(out.parent / "classes.tsv"))
    assert (names[again] == pred.data["predictions"]["prediction"].to_numpy()).mean() > 0.98
    # without UMAPs cells.tsv keeps the labels and predictions only (no label key: no label columns)
    nou = run_annotate(model, load_cells(tmp / "atlas"), read_classes(out.parent / "classes.tsv"),
                       ZeroshotConfig(device="cpu", progress=False, umap=False))
    assert list(nou.data["cells"].columns) == ["cell", "prediction"]
    assert list(pred.data["cells"].columns) == ["cell", "prediction", "umap1", "umap2"]
    assert not list(tmp_path.glob("*.tsv"))
    with pytest.raises(ConfigError, match="2 names"):
        run_annotate(model, cells, ["a", "b"], ZeroshotConfig(device="cpu", progress=False))
    with pytest.raises(ConfigError, match="val_fraction"):
        run_train(load_model(base_ckpt), cells, AnnotatorConfig(val_fraction=0.95))


def test_label_map_parsing(tmp_path):
    p = tmp_path / "m.tsv"
    p.write_text("# c\nsource\ttarget\nHSC\tHSC\nMPP\tHSC\nMEP\t\n")
    m = read_label_map(p)
    assert m == {"HSC": "HSC", "MPP": "HSC", "MEP": ""}
    out = apply_label_map(np.array(["HSC", "MPP", "MEP", "X", None, "nan"], dtype=object), m)
    assert out.tolist() == ["HSC", "HSC", None, None, None, None]
    bad = tmp_path / "bad.tsv"
    bad.write_text("from\tto\nA\tB\n")
    with pytest.raises(InputFormatError, match="header"):
        read_label_map(bad)
    dup = tmp_path / "dup.tsv"
    dup.write_text("source\ttarget\nA\tB\nA\tC\n")
    with pytest.raises(InputFormatError, match="line 3"):
        read_label_map(dup)


def test_repository_label_maps_parse():
    root = Path(__file__).resolve().parents[1] / "resources" / "label_maps"
    m = read_label_map(root / "buenrostro2018_to_granja2019.tsv")
    assert m["MPP"] == "HSC" and m["CMP"] == "CMP.LMPP" and m["LMPP"] == "CMP.LMPP" and m["MEP"] == ""
    g = read_label_map(root / "granja2019_coarse.tsv")
    targets = {v for v in m.values() if v}
    assert targets <= set(g.values())


def test_mask_rare_classes_known_case():
    logits = np.zeros((1000, 3))
    logits[:, 0] = 1.0
    logits[:, 1] = 0.5
    logits[:3, 2] = 5.0  # class 2 predicted for 0.3 % of cells
    pred, masked = mask_rare_classes(logits, 0.005)
    assert masked == [1, 2] or masked == [2, 1] or set(masked) == {1, 2}
    assert (pred == 0).all()
    logits[:10, 2] = 5.0  # 1 %: kept
    pred, masked = mask_rare_classes(logits, 0.005)
    assert 2 not in masked and (pred[:10] == 2).all()


def test_classification_scores_known_values():
    s = classification_scores(["a", "a", "a", "b"], ["a", "a", "b", "b"])
    assert s["accuracy"] == pytest.approx(0.75)
    assert s["micro_F1"] == pytest.approx(0.75)
    assert s["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["macro_F1"] == pytest.approx((0.8 + 2 / 3) / 2)



def test_load_cells_selects_several_datasets():
    """`--dataset a,b` (the workflow's integration / annotator reference) keeps the cells of every named
    dataset, in corpus order; a name without cells is an error naming it."""
    from epiflow.errors import EpiflowError

    counts, _ = _counts(9, seed=1)
    names = np.array(["b1", "b2", "b3"] * 3, dtype=object)
    obs = pd.DataFrame({"cell_id": [f"c{i}" for i in range(9)], "dataset": names})
    sh = shard_from_counts(counts, np.full(N_CCRES, 0.3), obs)
    for sel in ("b1,b3", ["b3", "b1"], " b1 , b3 "):
        got = load_cells(sh, dataset=sel)
        assert got.obs["cell_id"].tolist() == ["c0", "c2", "c3", "c5", "c6", "c8"], sel
    assert load_cells(sh, dataset="b2").obs["dataset"].tolist() == ["b2"] * 3
    assert load_cells(sh, dataset=None).n_cells == 9
    with pytest.raises(EpiflowError, match="'b9'"):
        load_cells(sh, dataset="b1,b9")


def test_restrict_to_ccres_keeps_rank_order_and_counts():
    from epiflow.corpus.shard import shard_from_counts
    from epiflow.tasks.zeroshot import covered_ccres, restrict_to_ccres
    from epiflow.tokenize import NUM_SPECIAL

    counts, _ = _counts(30, seed=2)
    sh = shard_from_counts(counts, np.full(N_CCRES, 0.3), pd.DataFrame({"cell_id": range(30)}))
    keep = np.arange(N_CCRES) < 40
    r = restrict_to_ccres(sh, keep)
    assert r.n_cells == 30 and r.n_ccres == N_CCRES and len(r.obs) == 30
    full = sh.counts_csr().toarray()
    np.testing.assert_array_equal(r.counts_csr().toarray(), np.where(keep[None, :], full, 0))
    for i in (0, 7, 29):  # each sentence is the old one without the dropped cCREs, same order
        old = sh.sentence(i)
        np.testing.assert_array_equal(r.sentence(i), old[keep[old - NUM_SPECIAL]])
    assert covered_ccres(r).sum() <= 40 and not covered_ccres(r)[40:].any()
    # indices work like a mask; a mask of the wrong length is an error naming the fix
    np.testing.assert_array_equal(restrict_to_ccres(sh, np.arange(40)).tokens, r.tokens)
    from epiflow.errors import EpiflowError

    with pytest.raises(EpiflowError, match="cCRE mask has 5 entries"):
        restrict_to_ccres(sh, np.ones(5, bool))


def test_annotate_restricted_to_the_reference_ccres(trained, tmp_path):
    """train-annotator writes the cCREs of its training cells; annotate-zeroshot --restrict-ccres drops the
    others from new cells (a new dataset measured on a larger panel than the reference)."""
    from epiflow.errors import InputFormatError
    from epiflow.tasks.zeroshot import REFERENCE_CCRES_FILE, read_reference_ccres, run_annotate

    tmp, out = trained
    seen = np.load(out / REFERENCE_CCRES_FILE)
    assert seen.dtype.kind == "i" and len(seen) == N_CCRES  # the synthetic atlas opens every cCRE
    query = _corpus(tmp_path / "q", n=60, seed=7, names=["HSC", "GMP", "CLP"], dataset="query")
    panel = tmp_path / "panel.npy"
    np.save(panel, np.arange(60))  # as if the reference had only the first half of the cCREs
    res_dir = tmp_path / "restricted"
    rc = main(["annotate-zeroshot", "--checkpoint", str(out / "checkpoint.pth"), "--input", str(query),
               "--label-key", "cell_type", "--restrict-ccres", str(panel), "--out-dir", str(res_dir),
               "--device", "cpu"])
    assert rc == 0
    v = pd.read_csv(res_dir / "metrics.tsv", sep="\t").query("method == 'EpiAgent-zeroshot'").set_index(
        "metric")["value"]
    assert v["median_ccres_per_cell_kept"] < 0.7 * v["median_ccres_per_cell"]
    assert v["accuracy"] > 0.5  # the types still differ within the kept half
    # no value: the list beside the checkpoint (all cCREs here: nothing dropped)
    rc = main(["annotate-zeroshot", "--checkpoint", str(out / "checkpoint.pth"), "--input", str(query),
               "--label-key", "cell_type", "--restrict-ccres", "--out-dir", str(tmp_path / "auto"),
               "--device", "cpu", "--no-progress"])
    assert rc == 0
    t = pd.read_csv(tmp_path / "auto" / "metrics.tsv", sep="\t").set_index(["method", "metric"])["value"]
    assert t[("EpiAgent-zeroshot", "median_ccres_per_cell_kept")] == t[("EpiAgent-zeroshot",
                                                                         "median_ccres_per_cell")]
    # the same through the Python API
    r = run_annotate(load_model(out / "checkpoint.pth"), load_cells(query),
                     pd.read_csv(out / "classes.tsv", sep="\t")["label"].tolist(),
                     ZeroshotConfig(label_key="cell_type", device="cpu", progress=False),
                     restrict_ccres=read_reference_ccres(out / REFERENCE_CCRES_FILE))
    pd.testing.assert_series_equal(r.metrics.set_index(["method", "metric"])["value"], t, check_names=False)
    with pytest.raises(InputFormatError, match="cCRE list is missing"):
        read_reference_ccres(tmp_path / "nope.npy")
    assert main(["annotate-zeroshot", "--checkpoint", str(out / "checkpoint.pth"), "--input", str(query),
                 "--restrict-ccres", str(tmp_path / "nope.npy"), "--out", str(tmp_path / "nope")]) == 2
