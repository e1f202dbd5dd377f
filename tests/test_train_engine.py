"""The one fine-tuning engine (epiflow.train.engine): batches, steps, parameter groups and schedule,
the reconstruction objective's targets and negatives, the classification objective, seeds, errors."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from epiflow.errors import ConfigError
from epiflow.model import EpiAgentConfig, from_config
from epiflow.tasks.common import load_cells
from epiflow.train import rng as krng
from epiflow.train.engine import (Classification, FitConfig, Reconstruction, StepContext, cca_queries,
                                  epoch_batches, fit, input_ids, planned_steps)
from epiflow.train.objectives import sr_mse_sum
from epiflow.train.optim import finetune_param_groups


@pytest.fixture(scope="module")
def shard(toy_corpus):
    return load_cells(toy_corpus(n_cells=60, n_ccres=120, n_types=3, seed=4, shard_size=60))


def _model(n=120, **kw):
    torch.manual_seed(0)
    return from_config(EpiAgentConfig.preset("tiny", n_ccres=n, **kw))


def _ctx(epoch=0, seed=0):
    return StepContext(epoch=epoch, step=0, seed=seed, device=torch.device("cpu"), rng=np.random.default_rng(0))


def test_sr_mse_sum_equals_dense():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 30, generator=g)
    rows = torch.tensor([0, 0, 2, 3, 3, 3])
    cols = torch.tensor([1, 7, 0, 2, 29, 5])
    vals = torch.rand(6, generator=g) * 5
    dense = torch.zeros(4, 30)
    dense[rows, cols] = vals
    assert (sr_mse_sum(pred, rows, cols, vals) / pred.numel()).item() == pytest.approx(
        torch.mean((pred - dense) ** 2).item(), rel=1e-6)
    assert sr_mse_sum(pred, rows[:0], cols[:0], vals[:0]).item() == pytest.approx((pred ** 2).sum().item())


@pytest.mark.parametrize("k,max_pos", [(1, None), (3, None), (2, 5)])
def test_cca_queries_negatives_are_distinct_inaccessible(k, max_pos):
    ptr = np.array([0, 4, 4, 10])
    col = np.array([5, 1, 9, 3, 0, 2, 4, 6, 8, 11])
    rows, ccres, lab = cca_queries(ptr, col, 40, k, krng.cell_keys(0, 0, krng.NEGATIVES, [0, 1, 2]), max_pos)
    for i in range(3):
        pos = set(col[ptr[i]:ptr[i + 1]].tolist())
        qp = ccres[(rows == i) & (lab == 1)].tolist()
        qn = ccres[(rows == i) & (lab == 0)].tolist()
        n_pos = len(pos) if max_pos is None else min(len(pos), max_pos)
        assert len(qp) == n_pos and set(qp) <= pos
        assert len(qn) == k * n_pos and len(set(qn)) == len(qn) and not pos & set(qn)


def test_reconstruction_targets_default_csr_and_other_cells(shard):
    # default: the input cell's own accessible cCREs, with its TF-IDF for the MSE variant
    obj = Reconstruction(shard, sr="mse")
    ptr, col, val = obj._targets(np.array([3, 10, 50]))
    dense = shard.tfidf_csr()[[3, 10, 50]].toarray()
    r = np.repeat(np.arange(3), np.diff(ptr))
    np.testing.assert_allclose(dense[r, col], val)
    assert int((dense > 0).sum()) == len(val)
    # a CSR target (integration's partner profile) and another cell's profile (perturbation)
    t = sp.random(60, 120, density=0.1, format="csr", random_state=0)
    ptr, col, _ = Reconstruction(shard, targets=t)._targets(np.array([2, 7]))
    assert sorted(col[ptr[1]:ptr[2]]) == sorted(t[7].indices)
    t.data[t.indices == t[7].indices[0]] = 0.0  # an explicit zero is not a positive (and the caller's matrix is kept)
    nnz = t.nnz
    ptr, col, _ = Reconstruction(shard, targets=t)._targets(np.array([2, 7]))
    assert sorted(col[ptr[1]:ptr[2]]) == sorted(c for c, v in zip(t[7].indices, t[7].data) if v) and t.nnz == nnz
    obj = Reconstruction(shard, input_rows=[0, 1], targets=shard, target_rows=[5, 6])
    ptr, col, _ = obj._targets(np.array([1]))
    assert sorted(col + 4) == sorted(shard.tokens[shard.indptr[6]:shard.indptr[7]])


def test_input_ids_keyed_subsample_keeps_rank_order(shard):
    ids = input_ids(shard, [0, 1], 5, krng.cell_keys(0, 0, krng.SUBSAMPLE, [0, 1]))
    again = input_ids(shard, [0, 1], 5, krng.cell_keys(0, 0, krng.SUBSAMPLE, [0, 1]))
    assert torch.equal(ids, again) and ids.shape[1] == 7
    full = shard.tokens[shard.indptr[0]:shard.indptr[1]].tolist()
    got = ids[0, 1:6].tolist()
    assert [full.index(t) for t in got] == sorted(full.index(t) for t in got)
    top = input_ids(shard, [0], 5, None)
    assert top[0, 1:6].tolist() == full[:5]


def test_batches_and_planned_steps():
    cfg = FitConfig(batch_size=4, epochs=2)
    b = epoch_batches(10, cfg, np.random.default_rng(0), None)
    assert [len(x) for x in b] == [4, 4, 2] and sorted(np.concatenate(b)) == list(range(10))
    assert planned_steps(10, cfg) == 6 and planned_steps(10, FitConfig(batch_size=4, epochs=0.5)) == 2
    assert planned_steps(10, FitConfig(batch_size=4, epochs=3, max_steps=4)) == 4
    lens = np.array([10, 20, 30, 40, 50])
    tb = epoch_batches(5, FitConfig(batch_tokens=60), np.random.default_rng(0), lens)
    assert sorted(np.concatenate(tb)) == list(range(5)) and all(lens[x].max() * len(x) <= 60 or len(x) == 1 for x in tb)
    with pytest.raises(ConfigError, match="batch_tokens"):
        epoch_batches(5, FitConfig(batch_tokens=60), np.random.default_rng(0), None)


def test_param_groups_policy():
    m = _model(classifier="linear", num_classes=3)
    groups = finetune_param_groups(m.named_parameters(), ("classifier.",), 1e-4, 1e-3, 0.01)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(m.classifier.fc.weight)]["lr"] == 1e-3 and by_id[id(m.classifier.fc.weight)]["weight_decay"] == 0.01
    assert by_id[id(m.classifier.fc.bias)]["weight_decay"] == 0.0
    emb = by_id[id(m.cCRE_embedding.weight)]
    assert emb["lr"] == 1e-4 and emb["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len([p for p in m.parameters() if p.requires_grad])


def test_fit_reconstruction_learns_logs_terms_and_schedule(shard):
    m = _model()
    obj = Reconstruction(shard, k=1)
    hist = fit(m, obj, FitConfig(epochs=6, batch_size=16, lr=3e-3, schedule="cosine", warmup=2, progress=False))
    assert len(hist) == 6 * 4 and list(hist["step"]) == list(range(1, 25))
    assert {"loss", "cca", "sr", "lr", "epoch"} <= set(hist.columns)
    assert hist["lr"].iloc[0] < hist["lr"].iloc[2] and hist["lr"].iloc[-1] < 0.1 * 3e-3  # warm-up, cosine decay
    assert hist["cca"].tail(4).mean() < hist["cca"].head(4).mean()
    assert not m.training


def test_fit_is_seeded_and_uses_given_threads(shard):
    def run(seed):
        m = _model()
        h = fit(m, Reconstruction(shard), FitConfig(max_steps=3, batch_size=8, seed=seed, progress=False))
        return h["loss"].to_numpy(), m.cCRE_embedding.weight.detach().clone()

    (a, wa), (b, wb), (c, _) = run(0), run(0), run(1)
    np.testing.assert_array_equal(a, b)
    assert torch.equal(wa, wb) and not np.array_equal(a, c)


def test_fit_classification_and_aux_head(shard):
    y = np.searchsorted(["type0", "type1", "type2"], shard.obs["cell_type"].astype(str).to_numpy())
    m = _model(classifier="linear", num_classes=3)
    h = fit(m, Classification(shard, np.arange(60), y), FitConfig(epochs=8, batch_size=16, lr=3e-3, head_lr=1e-2,
                                                                   progress=False))
    assert h["classify"].tail(4).mean() < h["classify"].head(4).mean() and "accuracy" in h
    # an auxiliary head (perturbation's perturbed / unperturbed) is created, trained and weighted
    obj = Reconstruction(shard, aux_labels=(y == 1).astype(float), weights={"aux": 0.5})
    h = fit(_model(), obj, FitConfig(max_steps=2, batch_size=8, progress=False))
    assert obj.aux is not None and "aux" in h
    np.testing.assert_allclose(h["loss"], h["cca"] + h["sr"] + 0.5 * h["aux"], rtol=1e-5)


def test_the_guard_catches_advanced_indexing_with_repeated_rows(ordered_accumulation):
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(AssertionError, match="repeated indices"):
        with ordered_accumulation():
            x[torch.tensor([0, 0, 2])].sum().backward()
    with ordered_accumulation():  # the replacement, and unique indices, pass
        x.index_select(0, torch.tensor([0, 0, 2])).sum().backward()
        x[torch.tensor([3, 1]), torch.tensor([0, 2])].sum().backward()


@pytest.mark.parametrize("sr", ["bce", "multinomial"])
def test_fit_backward_sums_in_a_fixed_order(shard, sr, ordered_accumulation):
    """Every fine-tuning task goes through this objective: no backward adds with parallel atomics
    (CCA queries repeat each cell's row, the multinomial SR repeats each cell's log-sum-exp)."""
    m = _model(num_batches=2)
    obj = Reconstruction(shard, sr=sr, k=2, conditions=np.arange(60) % 2, condition_key="batch_ids",
                         aux_labels=(np.arange(60) % 3 == 0).astype(float))
    with ordered_accumulation():
        h = fit(m, obj, FitConfig(max_steps=2, batch_size=8, progress=False))
    assert len(h) == 2 and np.isfinite(h["loss"]).all()


def test_conditions_reach_the_model(shard):
    m = _model(num_batches=2)
    with torch.no_grad():
        m.batch_embedding.weight.normal_()
    obj = Reconstruction(shard, conditions=np.arange(60) % 2, condition_key="batch_ids")
    out1 = obj(m.eval(), np.array([0, 1]), _ctx()).terms["sr"]
    obj.conditions = np.zeros(60, dtype=np.int64)
    out0 = obj(m, np.array([0, 1]), _ctx()).terms["sr"]
    assert not torch.isclose(out0, out1)


def test_errors(shard):
    with pytest.raises(ConfigError, match="epochs"):
        fit(_model(), Reconstruction(shard), FitConfig(epochs=0))
    with pytest.raises(ConfigError, match="SR loss"):
        Reconstruction(shard, sr="l1")
    with pytest.raises(ConfigError, match="labels"):
        Classification(shard, [0, 1], [0])
    with pytest.raises(ConfigError, match="no training examples"):
        fit(_model(), Reconstruction(shard, input_rows=[]), FitConfig(progress=False))
    with pytest.raises(ConfigError, match="targets"):
        Reconstruction(shard, input_rows=[0, 1], target_rows=[0])


def test_predict_heads_match_the_model_and_batching(shard):
    from epiflow.train.engine import predict

    m = _model(classifier="linear", num_classes=3).eval()
    rows = np.array([5, 0, 17, 33])
    out = predict(m, shard, ("embedding", "classify", "logits", "signal"), rows=rows, max_len=20)
    with torch.no_grad():
        ids = input_ids(shard, rows, 20, None)
        cell = m(ids).cell_embedding
        np.testing.assert_allclose(out["embedding"], cell.numpy(), atol=1e-5)
        np.testing.assert_allclose(out["logits"], m.classify(cell).numpy(), atol=1e-5)
        np.testing.assert_allclose(out["signal"], m.signal_logits(cell).numpy(), atol=1e-5)
    np.testing.assert_allclose(out["classify"].sum(1), 1, rtol=1e-5)
    # one cell a batch gives the same numbers; columns and calibration
    one = predict(m, shard, "signal", rows=rows, max_len=20, max_cells=1, columns=[3, 7], calibrate=True)
    pw = float(m.pos_weight("SR"))
    np.testing.assert_allclose(one, 1 / (1 + np.exp(-(out["signal"][:, [3, 7]] - np.log(pw)))), atol=1e-5)
    assert predict(m, shard, "embedding", rows=[]).shape == (0, 64)
    with pytest.raises(ConfigError, match="head"):
        predict(m, shard, "umap")


def test_token_budget_counts_the_capped_input(shard):
    """Token budgets count each example's model input (top max_len + [CLS]/[SEP]), not its full sentence."""
    obj = Reconstruction(shard, max_len=8)
    obj.setup(_model())
    assert (obj.lengths() == np.minimum(np.diff(shard.indptr), 8) + 2).all()
    h = fit(_model(), obj, FitConfig(epochs=1, batch_tokens=100, progress=False))
    assert len(h) == planned_steps(60, FitConfig(batch_tokens=100), obj.lengths()) == 6  # 10 cells x 10 tokens
