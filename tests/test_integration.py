"""Reference integration and query mapping on a tiny synthetic two-batch corpus and tiny model."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from epiflow.cli import main
from epiflow.corpus.shard import shard_from_counts, write_corpus_meta, write_shard
from epiflow.model import load_epiagent_checkpoint
from epiflow.tasks.integration import gmm_keep, map_query, match_batches, ot_match, partner_targets

# the files `epiflow integrate` writes (workflow rule integrate, registry outputs), with a query
INTEGRATE_FILES = {"metrics.tsv", "checkpoint.pth", "checkpoint.pth.json", "batches.tsv", "matches.tsv", "cells.tsv",
                   "embeddings.h5ad", "umap_batch.png", "umap_cell_type.png", "query_predictions.tsv",
                   "train_log.tsv"}

N_CCRES = 120


def _counts(t, b, seed):
    """Types open their own third of cCREs 0..89; batch 1 also opens cCREs 90..119 (a batch effect)."""
    rng = np.random.default_rng(seed)
    n = len(t)
    j = np.arange(N_CCRES)
    p = np.where((j[None, :] < 90) & (j[None, :] % 3 == t[:, None]), 0.6, 0.03)
    p = np.where((j[None, :] >= 90) & (b[:, None] == 1), 0.6, p)
    acc = rng.random((n, N_CCRES)) < p
    return sp.csr_matrix(acc.astype(np.float32))


def _corpus(root: Path, n=120, seed=0, batches=("d1", "d2"), dataset="ref", panel0=None):
    """``panel0``: cCREs measured in the first batch (the others are never accessible there)."""
    rng = np.random.default_rng(seed)
    (root / "shards").mkdir(parents=True)
    t = rng.integers(0, 3, n)
    b = rng.integers(0, len(batches), n)
    counts = _counts(t, b, seed)
    if panel0 is not None:
        off = np.setdiff1d(np.arange(N_CCRES), panel0)
        counts = counts.tolil()
        for i in np.flatnonzero(b == 0):
            counts[i, off] = 0
        counts = sp.csr_matrix(counts)
        counts.eliminate_zeros()
    df = np.full(N_CCRES, 0.3)
    (root / "vocab.bed").write_text("".join(f"chr1\t{i * 1000}\t{i * 1000 + 500}\n" for i in range(N_CCRES)))
    np.save(root / "df.npy", df)
    obs = pd.DataFrame({"cell_id": [f"{dataset}{i}" for i in range(n)], "dataset": dataset,
                        "donor": np.asarray(batches, dtype=object)[b],
                        "cell_type": np.asarray(["HSC", "GMP", "CLP"], dtype=object)[t]})
    write_shard(root / "shards/shard_00000.h5", shard_from_counts(counts, df, obs, vocab_id="toy"))
    write_corpus_meta(root, {"n_cells": n, "n_ccres": N_CCRES, "vocab_id": "toy", "genome": "hg38",
                             "shards": ["shards/shard_00000.h5"], "shard_cells": [n]})
    return root


@pytest.fixture(scope="module")
def base_ckpt(tiny_checkpoint):
    return tiny_checkpoint(N_CCRES, dropout=0.0)


def test_ot_match_recovers_a_permutation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 8))
    perm = rng.permutation(40)
    b = a[perm] + 1e-4 * rng.normal(size=(40, 8))
    pa, da, pb, db = ot_match(a, b)
    assert (perm[pa] == np.arange(40)).all()  # b[pa[i]] is a[i]
    assert (pb == perm).all()
    assert da.max() < 1e-3 and db.max() < 1e-3
    # chunked matching still pairs every cell with one in the other set
    pa2, _, pb2, _ = ot_match(a, b, max_cells=15)
    assert pa2.min() >= 0 and pa2.max() < 40 and pb2.max() < 40


def test_gmm_keeps_the_low_component():
    rng = np.random.default_rng(0)
    d = np.concatenate([rng.normal(0.1, 0.01, 80), rng.normal(0.9, 0.02, 20)])
    keep = gmm_keep(d)
    assert keep[:80].all() and not keep[80:].any()
    assert gmm_keep(np.ones(5)).all()


def test_partner_targets_union():
    from epiflow.corpus.shard import shard_from_counts

    x = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]], dtype=np.float32))
    cells = shard_from_counts(x, np.full(4, 0.5), pd.DataFrame({"cell_id": ["a", "b", "c"]}))
    m = pd.DataFrame({"cell": [0, 1, 2], "partner": [1, 0, 0], "kept": [True, True, False]})
    t = partner_targets(cells, m).toarray()
    assert t.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]]


def test_match_batches_pairs_every_cell_across_batches():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(30, 4))
    b = np.array(["x"] * 10 + ["y"] * 12 + ["z"] * 8)
    m = match_batches(emb, b)
    assert len(m) == (10 + 12) + (10 + 8) + (12 + 8)  # one match per cell and per other batch
    assert (m["batch"] != m["partner_batch"]).all()
    assert (b[m["cell"]] == m["batch"]).all() and (b[m["partner"]] == m["partner_batch"]).all()


def test_map_query_majority_of_neighbours():
    ref = np.array([[0.0], [0.1], [0.2], [10.0], [10.1], [10.2]])
    lab = np.array(["A", "A", "A", "B", "B", "B"])
    pred, frac = map_query(ref, lab, np.array([[0.05], [10.05], [4.0]]), k=3)
    assert pred.tolist() == ["A", "B", "A"]
    assert frac.tolist() == [1.0, 1.0, 1.0]
    pred, frac = map_query(ref, lab, np.array([[4.9]]), k=4)  # 3 A + 1 B
    assert pred.tolist() == ["A"] and frac[0] == pytest.approx(0.75)


def test_integrate_cli_end_to_end(tmp_path, base_ckpt):
    ref = _corpus(tmp_path / "ref", n=120, seed=0)
    query = _corpus(tmp_path / "query", n=40, seed=3, batches=("q",), dataset="query")
    out = tmp_path / "integ"
    rc = main(["integrate", "--checkpoint", str(base_ckpt), "--corpus", str(ref), "--batch-key", "donor",
               "--query", str(query), "--max-steps", "15", "--batch-size", "16", "--lr", "1e-3",
               "--device", "cpu", "--no-progress", "--out", str(out)])
    assert rc == 0
    # the same files as before the verb moved onto its settings (issue #18), and no other
    assert {f.name for f in out.iterdir()} == INTEGRATE_FILES
    for f in INTEGRATE_FILES:
        assert (out / f).stat().st_size > 0, f
    # authors' batch-conditioned layout: base keys, then batch_embedding [n_batches, D]
    sd = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    base = torch.load(base_ckpt, map_location="cpu", weights_only=True)
    assert list(sd) == list(base) + ["batch_embedding.weight"]
    assert sd["batch_embedding.weight"].shape == (2, 64)
    assert not torch.equal(sd["signal_decoder.weight"], base["signal_decoder.weight"])  # really trained
    assert load_epiagent_checkpoint(out / "checkpoint.pth").kind == "batch-conditioned"
    assert pd.read_csv(out / "batches.tsv", sep="\t")["batch"].tolist() == ["d1", "d2"]
    # the UMAP of every embedding, for panels fig4c / fig4d
    cells_tab = pd.read_csv(out / "cells.tsv", sep="\t")
    assert {"cell", "role", "batch", "cell_type", "umap1_EpiAgent-BC", "umap2_EpiAgent-zeroshot"} <= set(cells_tab.columns)
    ref_rows = cells_tab[cells_tab["role"] == "reference"]
    assert set(ref_rows["batch"]) == {"d1", "d2"} and ref_rows["umap1_EpiAgent-BC"].notna().all()
    assert ref_rows["prediction"].isna().all()
    # the query's rows on the joint UMAP of reference and query, with their transferred labels (fig4f / fig4g)
    q_rows = cells_tab[cells_tab["role"] == "query"]
    assert len(q_rows) == 40 and set(cells_tab["role"]) == {"reference", "query"}
    assert (q_rows["batch"] == "query").all() and q_rows["umap1_EpiAgent-BC"].isna().all()
    assert cells_tab[["joint_umap1", "joint_umap2"]].notna().all().all()
    qp0 = pd.read_csv(out / "query_predictions.tsv", sep="\t")
    assert q_rows["prediction"].tolist() == qp0["pred_EpiAgent-BC"].tolist()
    assert q_rows["cell_type"].tolist() == qp0["label"].tolist()

    m = pd.read_csv(out / "metrics.tsv", sep="\t")
    assert list(m.columns) == ["task", "dataset", "method", "metric", "value"]
    integ = m[m["task"] == "integration"]
    assert set(integ["method"]) == {"EpiAgent-BC", "EpiAgent-BC-nobatch", "EpiAgent-zeroshot", "LSI"}
    for metric in ("NMI", "ARI", "iLISI", "kBET", "graph_connectivity", "batch_ASW"):
        v = integ[integ["metric"] == metric]["value"]
        assert len(v) == 4 and v.between(0, 1).all(), metric
    q = m[(m["task"] == "query_mapping") & (m["metric"] == "accuracy")]
    assert len(q) == 3 and q["value"].between(0, 1).all()
    qp = pd.read_csv(out / "query_predictions.tsv", sep="\t")
    assert len(qp) == 40 and set(qp["pred_EpiAgent-BC"]) <= {"HSC", "GMP", "CLP"}

    import anndata as ad

    e = ad.read_h5ad(out / "embeddings.h5ad")
    assert e.n_obs == 120
    # the batch token changes the embedding
    assert not np.allclose(e.obsm["X_epiagent_bc"], e.obsm["X_epiagent_bc_nobatch"])


def _run(ckpt, ref, *, query=None, **settings):
    from epiflow.tasks.common import load_cells, load_model
    from epiflow.tasks.config import IntegrationConfig
    from epiflow.tasks.integration import run

    cells = load_cells(ref)
    cfg = IntegrationConfig(**{"device": "cpu", "progress": False, **settings})
    model = load_model(ckpt, n_ccres=cells.n_ccres)
    return run(cells, model, cfg, query=None if query is None else load_cells(query))


def test_integrate_on_the_cCREs_common_to_all_batches(tmp_path, base_ckpt):
    """Batches on different peak panels: common_ccres keeps the cCREs accessible in every batch, for the
    reference and the query alike."""
    from epiflow.report.results import write_task_result

    ref = _corpus(tmp_path / "ref", n=80, seed=0, panel0=np.arange(90))  # d1 never has cCREs 90..119
    query = _corpus(tmp_path / "query", n=20, seed=3, batches=("q",), dataset="query")
    res = _run(base_ckpt, ref, query=query, batch_key="donor", common_ccres=True, max_steps=2, lr=1e-3,
               umap=False, lsi=False)
    write_task_result(res, tmp_path / "o", models=True)
    t = res.metrics.set_index(["task", "method", "metric"])["value"]
    assert t[("integration", "EpiAgent-BC", "n_common_ccres")] == 90
    # the partner targets (cell + partners) hold no cCRE outside the common panel
    own = t[("integration", "EpiAgent-BC", "mean_own_ccres")]
    assert 0 < own < t[("integration", "EpiAgent-BC", "mean_target_ccres")]
    assert t[("query_mapping", "EpiAgent-BC", "n_query_cells")] == 20
    qp = pd.read_csv(tmp_path / "o" / "query_predictions.tsv", sep="\t")
    assert len(qp) == 20 and set(qp["pred_EpiAgent-BC"]) <= {"HSC", "GMP", "CLP"}
    # umap off: no coordinates to draw, and the result folder has every file but the figures and the
    # table of UMAP coordinates
    assert res.data["umap"] == {} and res.data["batches"] == ["d1", "d2"]
    assert {f.name for f in (tmp_path / "o").iterdir()} == INTEGRATE_FILES - {"umap_batch.png", "umap_cell_type.png",
                                                                               "cells.tsv"}
    # without the option the batch-1-only cCREs stay: more cCREs per cell
    res2 = _run(base_ckpt, ref, batch_key="donor", max_steps=1, umap=False, lsi=False)
    t2 = res2.metrics.set_index(["task", "method", "metric"])["value"]
    assert t2[("integration", "EpiAgent-BC", "n_common_ccres")] == N_CCRES
    assert t2[("integration", "EpiAgent-BC", "mean_own_ccres")] > own
    assert "query_predictions" not in res2.tables and len(res2.history) == 1


def test_integrate_needs_two_batches(tmp_path, base_ckpt, monkeypatch):
    import epiflow.tasks.integration as integ
    from epiflow.errors import EpiflowError

    ref = _corpus(tmp_path / "ref", n=30, batches=("only",))
    embedded = []
    monkeypatch.setattr(integ, "embed_cells", lambda *a, **k: embedded.append(1))
    with pytest.raises(EpiflowError, match="2 batches"):
        _run(base_ckpt, ref, batch_key="donor", max_steps=1, umap=False)
    assert embedded == []  # refused before any embedding
    monkeypatch.undo()
    with pytest.raises(EpiflowError, match=r"found \['only'\]") as ei:  # plain strings, not np.str_('only')
        match_batches(np.zeros((3, 2)), np.array(["only"] * 3))
    assert "np.str_" not in str(ei.value)


def test_integrate_flags_are_its_settings_and_former_names_still_parse():
    """The verb's flags come from IntegrationConfig; --input / --out-dir (former names) still parse."""
    from epiflow.cli import build_parser
    from epiflow.cliargs import config_from_args
    from epiflow.tasks.config import IntegrationConfig

    parser = build_parser(["integrate"])
    new = parser.parse_args(["integrate", "--corpus", "c", "--checkpoint", "m.pth", "--out", "o", "--no-lsi",
                             "--no-umap", "--max-steps", "7", "--common-ccres", "--backend", "sdpa"])
    old = parser.parse_args(["integrate", "--input", "c", "--checkpoint", "m.pth", "--out-dir", "o", "--no-lsi",
                             "--no-umap", "--max-steps", "7", "--common-ccres", "--backend", "sdpa"])
    assert vars(new) == vars(old)
    cfg = config_from_args(IntegrationConfig, new)
    assert (cfg.lsi, cfg.umap, cfg.max_steps, cfg.common_ccres, cfg.backend) == (False, False, 7, True, "sdpa")
    assert config_from_args(IntegrationConfig, parser.parse_args(
        ["integrate", "--corpus", "c", "--checkpoint", "m", "--out", "o"])) == IntegrationConfig()


# ------------------------------------------------------------------ workflow: query outputs and fig4g_confusion
def _snakemake_dry(target, *args):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    binp = Path(sys.executable).parent
    exe = [str(binp / "snakemake")] if (binp / "snakemake").exists() else [sys.executable, "-m", "snakemake"]
    env = dict(os.environ, PATH=f"{binp}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([*exe, target, "-n", "-p", "--cores", "1", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=180)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("configfile", [None, "config/realdata.yaml"])
def test_fig4g_confusion_is_a_named_target_built_from_the_declared_query_predictions(configfile, tmp_path):
    """query_predictions.tsv is an output of rule integrate when the config names query datasets, so
    `snakemake <results>/figures/fig4g_confusion.png` plans integrate -> figure (demo and real-data configs)."""
    if configfile and not (Path(__file__).resolve().parents[2] / "shared" / "data").exists():
        pytest.skip("config/realdata.yaml reads ../shared/data, which is absent")
    res = tmp_path / "res"
    rc, out = _snakemake_dry(f"{res}/figures/fig4g_confusion.png", *(["--configfile", configfile] if configfile else []),
                             "--config", f"results_dir={res}")
    assert rc == 0, out
    name = "bonemarrow" if configfile else "atlas"
    qp = f"{res}/tasks/integration/{name}/query_predictions.tsv"
    integ = out[out.index("rule integrate:"):]
    assert qp in integ.split("\n", 3)[2]  # the output line of the integrate job
    assert re.search(rf"epiflow figure fig4g_confusion --table {name}={re.escape(qp)} --out {re.escape(str(res))}"
                     r"/figures/fig4g_confusion.png", out), out
    assert "--query-dataset" in out
    # and `all` builds the panel too
    rc, out = _snakemake_dry("all", *(["--configfile", configfile] if configfile else []),
                             "--config", f"results_dir={res}")
    assert rc == 0 and f"{res}/figures/fig4g_confusion.png" in out, out


def test_fig4g_confusion_without_query_names_the_missing_table(tmp_path):
    import yaml

    over = tmp_path / "over.yaml"
    over.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "res"), "tasks": {"integration": {"query": []}}}))
    rc, out = _snakemake_dry(f"{tmp_path}/res/figures/fig4g_confusion.png", "--configfile", str(over))
    assert rc != 0
    assert "fig4g_confusion" in out and "no rule of this workflow writes" in out and "query_predictions.tsv" in out, out
    rc, out = _snakemake_dry("all", "--configfile", str(over))
    assert rc == 0, out
    # not planned; listed in figures/panels.tsv as not built, with the missing table as the reason
    listing = next(ln for ln in out.splitlines() if "epiflow figure --list" in ln)
    rest = out.replace(listing, "")
    assert "fig4g_confusion.png" not in rest and "query_predictions.tsv" not in rest, out
    assert re.search(r"--skip 'fig4g_confusion=no rule of this workflow writes \S+/query_predictions.tsv'", listing)


def test_reference_from_several_folders_and_an_unlabelled_query(tmp_path, base_ckpt):
    """The paper's brain reference spans corpus and downstream folders (Li2023a + Lee2023 in the corpus,
    Li2023b downstream): `integrate --corpus A B` reads them together, batch = dataset; its query (a new
    10x multiome dataset) has no labels: predictions, no scores."""
    from epiflow.cli import main

    a = _corpus(tmp_path / "a", n=60, seed=0, batches=("d1",), dataset="study_a")
    b = _corpus(tmp_path / "b", n=50, seed=1, batches=("d2",), dataset="study_b")
    q = _corpus(tmp_path / "q", n=20, seed=3, batches=("q",), dataset="newstudy")
    from epiflow.corpus.shard import open_corpus, write_shard
    sh = next(iter(open_corpus(q).iter_shards()))
    sh.obs = sh.obs.drop(columns=["cell_type"])
    write_shard(q / "shards/shard_00000.h5", sh)
    out = tmp_path / "o"
    rc = main(["integrate", "--corpus", str(a), str(b), "--query", str(q), "--checkpoint", str(base_ckpt),
               "--batch-key", "dataset", "--max-steps", "2", "--lr", "1e-3", "--no-lsi",
               "--device", "cpu", "--no-progress", "--out", str(out)])
    assert rc == 0
    # the unlabelled query on the joint UMAP: its transferred labels, no known label
    ct = pd.read_csv(out / "cells.tsv", sep="\t")
    qc = ct[ct["role"] == "query"]
    assert len(qc) == 20 and qc["cell_type"].isna().all() and set(qc["prediction"]) <= {"HSC", "GMP", "CLP"}
    assert ct[["joint_umap1", "joint_umap2"]].notna().all().all()
    t = pd.read_csv(out / "metrics.tsv", sep="\t")
    batches = pd.read_csv(out / "batches.tsv", sep="\t")
    assert set(batches.astype(str).to_numpy().ravel()) >= {"study_a", "study_b"}
    integ = t[(t["task"] == "integration") & (t["method"] == "EpiAgent-BC")].set_index("metric")["value"]
    assert {"NMI", "ARI", "iLISI", "kBET"} <= set(integ.index)
    qm = t[(t["task"] == "query_mapping") & (t["method"] == "EpiAgent-BC")].set_index("metric")["value"]
    assert qm["n_query_cells"] == 20 and qm["n_query_labelled"] == 0 and "accuracy" not in qm.index
    qp = pd.read_csv(out / "query_predictions.tsv", sep="\t")
    assert len(qp) == 20 and qp["label"].isna().all() and set(qp["pred_EpiAgent-BC"]) <= {"HSC", "GMP", "CLP"}
    # a named query label column that is missing is still an error naming it
    rc = main(["integrate", "--corpus", str(a), str(b), "--query", str(q), "--checkpoint", str(base_ckpt),
               "--batch-key", "dataset", "--query-label-key", "cell_type", "--max-steps", "1", "--no-umap",
               "--no-lsi", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "o2")])
    assert rc != 0 and not (tmp_path / "o2" / "metrics.tsv").exists()
