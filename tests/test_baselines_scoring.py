"""A baseline is scored as EpiAgent's task scores its own rows: the same cells, split, features,
reference and metric function. Each test feeds one matrix through the task's scoring and through
:func:`epiflow.baselines.run.evaluate` and asks for the same numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from epiflow.baselines.base import BaselineOutput
from epiflow.baselines.run import canonical_input, evaluate

from test_baselines import synthetic


def _rows(rows, method) -> dict:
    return {r["metric"]: r["value"] for r in rows if r["method"] == method}


@pytest.fixture
def cells():
    """The synthetic cells with a corpus TF-IDF layer and 20 cells without a label ('unknown', NaN)."""
    from epiflow.tokenize.core import global_tfidf

    a = synthetic(n_per=40, seed=3)
    x = sp.csr_matrix(a.X)
    df = np.maximum(np.asarray((x > 0).mean(0)).ravel(), 1e-3)
    a.layers["tfidf"] = sp.csr_matrix(global_tfidf(x, df), dtype=np.float32)
    lab = a.obs["cell_type"].astype(object).to_numpy()
    lab[::12] = "unknown"
    lab[5::24] = np.nan
    a.obs["cell_type"] = lab
    return a


def test_imputation_baseline_is_scored_against_the_raw_tfidf_as_epiagent(cells):
    """EpiAgent's imputation scores each matrix against the per-type mean of the raw TF-IDF of the
    labelled cells, on the cCREs open in >= min_cell_fraction of all cells. A baseline whose imputation
    is the raw TF-IDF must get the task's `Raw` row exactly; a baseline imputing each type's mean of
    noise must not score Pearson 1 (it did: the baselines were scored against their own type means)."""
    from epiflow.metrics.imputation import N_NEIGHBORS, open_fraction_filter
    from epiflow.tasks.features import labelled_mask
    from epiflow.tasks.imputation import evaluate_against_raw

    lab = labelled_mask(cells.obs["cell_type"].to_numpy(dtype=object))
    y = cells.obs["cell_type"].to_numpy(dtype=object)[lab].astype(str)
    keep = np.flatnonzero(open_fraction_filter(cells.X, 0.1))
    raw = cells.layers["tfidf"][:, keep]
    task, _ = evaluate_against_raw(raw, raw.toarray(), lab, y, n_pcs=20, n_neighbors=N_NEIGHBORS, seed=1)

    inp, ctx = canonical_input(cells, "imputation", min_cell_fraction=0.1, seed=1)
    assert inp.n_obs == cells.n_obs  # the tool imputes every cell, as EpiAgent does
    np.testing.assert_array_equal(ctx["features"], keep)  # filtered over all cells, not the labelled ones
    assert ctx["reference_kind"] == "corpus TF-IDF"
    rows = _rows(evaluate(BaselineOutput(imputed=raw.toarray()), inp, ctx, dataset="syn", method="X", seed=1,
                          n_pcs=20), "X")
    for k, v in task["Raw"].items():
        assert rows[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k
    assert rows["n_cells"] == lab.sum() and rows["n_ccres_kept"] == len(keep)

    noise = np.random.default_rng(0).random((cells.n_obs, len(keep)), dtype=np.float32)
    means = pd.DataFrame(noise).groupby(cells.obs["cell_type"].astype(str).to_numpy()).transform("mean").to_numpy()
    rows = _rows(evaluate(BaselineOutput(imputed=means), inp, ctx, dataset="syn", method="X", seed=1, n_pcs=20), "X")
    assert rows["pearson_cell_median"] < 0.5


def test_imputation_reference_without_a_corpus_tfidf(cells):
    """An h5ad without the corpus' TF-IDF: var['df'] gives it as the corpus would; without that, the
    cells' own document frequency, and the run says so."""
    from epiflow.tokenize.core import global_tfidf

    a = cells.copy()
    df = np.maximum(np.asarray((sp.csr_matrix(a.X) > 0).mean(0)).ravel(), 1e-3)
    del a.layers["tfidf"]
    a.var["df"] = df
    _, ctx = canonical_input(a, "imputation", min_cell_fraction=0.1)
    _, ref = canonical_input(cells, "imputation", min_cell_fraction=0.1)
    np.testing.assert_array_equal(ctx["reference"], ref["reference"])
    assert ctx["reference_kind"] == "TF-IDF with var['df']"
    del a.var["df"]
    _, ctx = canonical_input(a, "imputation", min_cell_fraction=0.1)
    assert ctx["reference_kind"] == "TF-IDF with the cells' own df"
    own = np.asarray((sp.csr_matrix(a.X) > 0).mean(0)).ravel()
    lab = ctx["labelled"]
    want = global_tfidf(sp.csr_matrix(a.X), np.where(own > 0, own, 1))[:, ctx["features"]][np.flatnonzero(lab)]
    np.testing.assert_allclose(ctx["reference"], want.toarray().astype(np.float32))


def test_feature_extraction_baseline_is_scored_as_evaluate_features(cells):
    """The same embedding through the feature-extraction task and through a baseline's scoring: the
    same NMI, ARI, ASW and Leiden result, on the labelled cells only; the tool embeds every cell."""
    from epiflow.tasks.config import FeaturesConfig
    from epiflow.tasks.features import run

    emb = np.asarray(sp.csr_matrix(cells.X) @ np.random.default_rng(1).normal(size=(cells.n_vars, 8)),
                     dtype=np.float32)
    a = cells.copy()
    a.obsm["X_tool"] = emb
    cfg = FeaturesConfig(n_neighbors=10, max_iter=20, seed=2, umap=False)
    task = _rows(run(a, cfg, embeddings={"Tool": "X_tool"}, dataset="syn").metrics.to_dict("records"), "Tool")

    inp, ctx = canonical_input(cells, "feature_extraction", seed=2)
    assert inp.n_obs == cells.n_obs
    rows = _rows(evaluate(BaselineOutput(embedding=emb), inp, ctx, dataset="syn", method="Tool", seed=2,
                          n_neighbors=10, max_iter=20), "Tool")
    for k in ("NMI", "ARI", "ASW_cell_type", "n_clusters", "n_cell_types", "leiden_reached", "leiden_resolution",
              "n_cells", "n_cells_unlabelled", "n_dims"):
        assert rows[k] == pytest.approx(task[k], rel=1e-12), k
    assert rows["n_cell_types"] == 3 and rows["n_cells_unlabelled"] > 0


def test_integration_baseline_is_scored_as_integrate(cells):
    """An integration baseline: integrate's cells (its random max_cells subset), its mapped labels
    (cells without a label, or unmapped, left out; they were counted as one more type), its scores."""
    from epiflow.tasks.common import _chosen_rows
    from epiflow.tasks.features import labelled_mask
    from epiflow.tasks.integration import evaluate_integration
    from epiflow.tasks.zeroshot import apply_label_map

    label_map = {"T0": "A", "T1": "A", "T2": "B"}  # T3 unmapped
    rows_sel = _chosen_rows(cells.obs, [], 100, 5)
    inp, ctx = canonical_input(cells, "integration", max_cells=100, seed=5, label_map=label_map)
    assert list(inp.obs_names) == list(cells.obs_names[rows_sel])
    sub = cells[rows_sel]
    emb = np.asarray(sp.csr_matrix(sub.X) @ np.random.default_rng(2).normal(size=(cells.n_vars, 6)), np.float32)
    labels = apply_label_map(sub.obs["cell_type"].to_numpy(dtype=object), label_map)
    want, _, ok = evaluate_integration({"Tool": emb}, sub.obs["batch"].to_numpy(), labels, dataset="syn", seed=5,
                                       umap=False)
    got = _rows(evaluate(BaselineOutput(embedding=emb), inp, ctx, dataset="syn", method="Tool", seed=5), "Tool")
    want = _rows(want, "Tool")
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12), k
    assert got["n_cell_types"] == 2 and got["n_cells"] == int(ok.sum()) == int(labelled_mask(labels).sum())


def test_integration_common_ccres_keeps_the_ccres_open_in_every_batch(cells):
    x = sp.csr_matrix(cells.X)
    b = cells.obs["batch"].to_numpy()
    want = np.flatnonzero(np.logical_and.reduce([np.asarray((x[b == v] > 0).sum(0)).ravel() > 0
                                                  for v in np.unique(b)]))
    inp, ctx = canonical_input(cells, "integration", common_ccres=True)
    np.testing.assert_array_equal(ctx["features"], want)
    assert inp.n_vars == len(want)


def test_annotation_split_is_the_tasks_for_its_settings(cells):
    """The query cells of a baseline are those of EpiAgent's annotation task with the same
    query_fraction and seed (labelled cells only)."""
    from epiflow.tasks.features import labelled_mask
    from epiflow.tasks.split import stratified_split

    lab = labelled_mask(cells.obs["cell_type"].to_numpy(dtype=object))
    y = cells.obs["cell_type"].to_numpy(dtype=object)[lab].astype(str)
    want = np.asarray(cells.obs_names)[lab][stratified_split(y, 0.25, 7)]
    inp, ctx = canonical_input(cells, "annotation", query_fraction=0.25, seed=7)
    assert list(inp.obs_names[ctx["is_query"]]) == list(want)


@pytest.mark.parametrize("extra", [["--label-map", "m.tsv"], ["--max-cells", "10"], ["--common-ccres"]])
def test_integration_settings_on_another_task_are_refused(tmp_path, capsys, extra):
    """integrate's own settings given to another task's baseline would be ignored: refused, naming them."""
    from epiflow.cli import main

    rc = main(["run-baseline", "--tool", "pca", "--task", "feature_extraction", "--counts", str(tmp_path / "x.h5ad"),
               "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and f"{extra[0]} belong to --task integration, not feature_extraction" in err and "Fix:" in err
    assert not (tmp_path / "o").exists()
