"""Unit tests of the pretraining pieces: samplers, losses, schedules, data plans."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from epiflow.tokenize import NUM_SPECIAL
from epiflow.train import rng as krng
from epiflow.train.data import (
    BatchConfig,
    MicroBatchStream,
    PlanConfig,
    ShardCache,
    build_index,
    epoch_plan,
    loader,
    make_batch,
    rank_part,
    split_cells,
    step_normalizers,
)
from epiflow.train.lean import FactorStore, chunked_sr_loss_sum
from epiflow.train.objectives import k_for_epoch, sr_loss_dense_reference, sr_loss_sum, sr_multinomial_sum
from epiflow.train.optim import RowwiseAdamW, inverse_sqrt_lambda, lr_factor, make_scheduler
from epiflow.train.sampling import distinct_ranks, rlm_replace, sample_complement
from epiflow.train.toy import write_toy_corpus

torch.set_num_threads(1)


def _random_positives(rng, n, lens):
    pos = [rng.choice(n, size=l, replace=False) for l in lens]
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return pos, indptr, np.concatenate(pos).astype(np.int64)


# ----------------------------------------------------------------------------- samplers
def test_negatives_disjoint_unique_and_counted():
    rng = np.random.default_rng(0)
    N = 200
    lens = np.array([0, 1, 5, 30, 90, 150, 199, 200])  # includes rows needing > half the complement
    pos, indptr, flat = _random_positives(rng, N, lens)
    k = np.array([3, 5, 10, 2 * 30, 5 * 90, 40, 7, 3])
    keys = krng.cell_keys(1, 0, krng.NEGATIVES, np.arange(len(lens)))
    ip, neg = sample_complement(keys, indptr, flat, N, k)
    got = np.diff(ip)
    np.testing.assert_array_equal(got, np.minimum(k, N - lens))  # min(K * L, N - L)
    for i in range(len(lens)):
        n = neg[ip[i]:ip[i + 1]]
        assert len(np.unique(n)) == len(n)
        assert not set(n.tolist()) & set(pos[i].tolist())
        assert n.min(initial=0) >= 0 and n.max(initial=0) < N


def test_negatives_are_uniform_and_split_invariant():
    rng = np.random.default_rng(1)
    N = 50
    lens = np.array([10, 20])
    pos, indptr, flat = _random_positives(rng, N, lens)
    counts = np.zeros(N)
    for rep in range(400):
        keys = krng.cell_keys(rep, 0, krng.NEGATIVES, np.array([7]))
        ip, neg = sample_complement(keys, indptr[:2], flat[:10], N, np.array([5]))
        counts[neg] += 1
    comp = np.setdiff1d(np.arange(N), pos[0])
    assert counts[pos[0]].sum() == 0
    # each of the 40 complement cCREs drawn ~ 400 * 5 / 40 = 50 times
    assert counts[comp].min() > 25 and counts[comp].max() < 80
    # a cell's negatives do not depend on the other cells of its batch
    keys2 = krng.cell_keys(3, 1, krng.NEGATIVES, np.array([7, 8]))
    ip2, n2 = sample_complement(keys2, indptr, flat, N, np.array([6, 6]))
    ip1, n1 = sample_complement(keys2[:1], indptr[:2], flat[:10], N, np.array([6]))
    np.testing.assert_array_equal(n2[ip2[0]:ip2[1]], n1)


def test_distinct_ranks_flip_branch_exact():
    keys = krng.cell_keys(0, 0, 9, np.arange(3))
    ip, v = distinct_ranks(keys, np.array([10, 10, 10]), np.array([9, 10, 0]))
    assert np.diff(ip).tolist() == [9, 10, 0]
    assert len(set(v[:9].tolist())) == 9 and sorted(v[9:19].tolist()) == list(range(10))


def test_rlm_replacement_exact():
    rng = np.random.default_rng(2)
    N = 120
    lens = np.array([1, 4, 7, 40, 60])
    pos, indptr, flat = _random_positives(rng, N, lens)
    tokens = flat + NUM_SPECIAL  # the model input = every accessible cCRE here
    uids = np.arange(len(lens))
    new, labels = rlm_replace(krng.cell_keys(0, 0, krng.RLM_POSITIONS, uids),
                              krng.cell_keys(0, 0, krng.RLM_TOKENS, uids), indptr, tokens, indptr, flat, N, 0.5)
    for i in range(len(lens)):
        a, b = indptr[i], indptr[i + 1]
        lab, nt, ot = labels[a:b], new[a:b], tokens[a:b]
        assert int((lab == 0).sum()) == int(np.rint(0.5 * lens[i]))  # 50 % replaced
        np.testing.assert_array_equal(nt[lab == 1], ot[lab == 1])      # the rest untouched, in place
        repl = nt[lab == 0] - NUM_SPECIAL
        assert not set(repl.tolist()) & set(pos[i].tolist())           # replacements are inaccessible
        assert len(np.unique(repl)) == len(repl)


def test_keyed_subsampling_keeps_rank_order():
    from epiflow.tokenize import subsample_sentences

    indptr = np.array([0, 30, 35])
    tokens = np.arange(35) + 100
    u = krng.per_element_uniform(krng.cell_keys(0, 0, krng.SUBSAMPLE, np.array([0, 1])), np.diff(indptr))
    ip, tok = subsample_sentences(indptr, tokens, 10, krng.KeyedUniform(u))
    assert np.diff(ip).tolist() == [10, 5]
    assert np.all(np.diff(tok[:10]) > 0)  # rank order kept
    np.testing.assert_array_equal(tok[10:], tokens[30:])


# ----------------------------------------------------------------------------- losses
def test_sr_softplus_identity_equals_dense_bce():
    torch.manual_seed(0)
    B, N = 5, 37
    logits = torch.randn(B, N) * 3
    target = (torch.rand(B, N) < 0.2).float()
    rows, cols = torch.nonzero(target, as_tuple=True)
    dense = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(100.0))
    ours = sr_loss_sum(logits, rows, cols, 100.0) / (B * N)
    assert torch.allclose(ours, dense, rtol=1e-6, atol=1e-6)
    assert torch.allclose(sr_loss_dense_reference(logits, target), dense)
    from epiflow.model import sr_loss

    assert torch.allclose(ours, sr_loss(logits, target, 100.0), rtol=1e-6)


def test_sr_multinomial_is_per_cell_mean_nll_and_shift_invariant():
    torch.manual_seed(1)
    B, N = 4, 23
    logits = torch.randn(B, N) * 2
    target = torch.rand(B, N) < 0.3
    target[3] = False  # a cell without positives adds nothing
    rows, cols = torch.nonzero(target, as_tuple=True)
    logp = torch.log_softmax(logits, dim=1)
    want = sum(-(logp[i][target[i]]).mean() for i in range(B) if target[i].any())
    got = sr_multinomial_sum(logits, rows, cols)
    assert torch.allclose(got, want, rtol=1e-6)
    # a per-cell constant (depth) does not change it, unlike the paper's BCE
    shifted = logits + torch.arange(B, dtype=logits.dtype)[:, None] * 5.0
    assert torch.allclose(sr_multinomial_sum(shifted, rows, cols), got, rtol=1e-5)
    assert not torch.allclose(sr_loss_sum(shifted, rows, cols), sr_loss_sum(logits, rows, cols))
    assert sr_multinomial_sum(logits, rows[:0], cols[:0]).item() == 0.0


def test_sr_matches_golden_fixture(fixtures_dir):
    io = np.load(fixtures_dir / "epiagent_tiny_io.npz")
    logits = torch.from_numpy(io["signal_logits"])
    rows, cols = torch.nonzero(torch.from_numpy(io["sr_target"]), as_tuple=True)
    val = sr_loss_sum(logits, rows, cols, 100.0) / logits.numel()
    assert abs(float(val) - float(io["sr_loss"])) < 1e-5


def test_chunked_sr_loss_and_lowrank_gradient():
    torch.manual_seed(1)
    B, D, N = 4, 8, 53
    h = torch.randn(B, D, requires_grad=True)
    W = torch.randn(N, D, requires_grad=True)
    b = torch.randn(N, requires_grad=True)
    target = (torch.rand(B, N) < 0.3).float()
    rows, cols = torch.nonzero(target, as_tuple=True)
    ref = F.binary_cross_entropy_with_logits(h @ W.t() + b, target, pos_weight=torch.tensor(100.0),
                                             reduction="sum")
    ref.backward()
    gh, gW, gb = h.grad.clone(), W.grad.clone(), b.grad.clone()
    h.grad = W.grad = b.grad = None
    store = FactorStore()
    val = chunked_sr_loss_sum(h, W, b, rows, cols, 100.0, store, chunk=16)
    assert torch.allclose(val, ref, rtol=1e-5)
    (val * 0.5).backward()
    assert W.grad is None  # no dense weight gradient
    G, H = store.cat()
    assert torch.allclose(G.t() @ H, 0.5 * gW, rtol=1e-4, atol=1e-4)
    assert torch.allclose(h.grad, 0.5 * gh, rtol=1e-4, atol=1e-4)
    assert torch.allclose(b.grad, 0.5 * gb, rtol=1e-4, atol=1e-4)


def test_rowwise_adamw_sparse_and_lowrank_agree():
    torch.manual_seed(2)
    w0 = torch.randn(10, 4)
    w1, w2 = w0.clone(), w0.clone()
    src = torch.optim.SGD([torch.zeros(1)], lr=0.1)
    o1, o2 = RowwiseAdamW(w1, src, weight_decay=0.01), RowwiseAdamW(w2, src, weight_decay=0.01)
    G, H = torch.randn(3, 10), torch.randn(3, 4)
    o1.begin_step()
    o1.step_lowrank(G, H, chunk=3)
    o2.begin_step()
    o2.step_sparse((G.t() @ H).to_sparse(sparse_dim=1))
    assert torch.allclose(w1, w2, atol=1e-6)
    # first step without momentum: each row moves by lr * g / rms(g) (+ decay), i.e. ~lr per entry
    step = (w0 * (1 - 0.1 * 0.01) - w1)
    rms = step.pow(2).mean(1).sqrt()
    assert torch.allclose(rms, torch.full((10,), 0.1), rtol=1e-4)
    assert o1.state_bytes() == 10 * 4


@pytest.mark.parametrize("momentum", [False, True], ids=["no-momentum", "bf16-momentum"])
def test_rowwise_adamw_slice_update_equals_indexed_update(momentum):
    """A slice of contiguous rows (the decoder's chunks, updated in place through a view) and the same
    rows given as indices (a gathered copy) give the same weights and states, over two steps; rows
    outside the slice are untouched."""
    torch.manual_seed(3)
    w0 = torch.randn(12, 5)
    w1, w2 = w0.clone(), w0.clone()
    src = torch.optim.SGD([torch.zeros(1)], lr=0.05)
    o1 = RowwiseAdamW(w1, src, weight_decay=0.01, momentum=momentum)
    o2 = RowwiseAdamW(w2, src, weight_decay=0.01, momentum=momentum)
    for _ in range(2):
        g = torch.randn(6, 5)
        o1.begin_step()
        o1.update_rows(slice(3, 9), g)
        o2.begin_step()
        o2.update_rows(torch.arange(3, 9), g)
    assert torch.allclose(w1, w2, atol=1e-7) and torch.allclose(o1.v, o2.v, atol=1e-9)
    if momentum:
        assert torch.equal(o1.m, o2.m)
    assert torch.equal(w1[:3], w0[:3]) and torch.equal(w1[9:], w0[9:])
    assert bool((w1[3:9] != w0[3:9]).all())


# ----------------------------------------------------------------------------- schedules
def test_inverse_sqrt_peak_is_lr_over_sqrt_warmup():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, inverse_sqrt_lambda(100))
    lrs = []
    for _ in range(400):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert int(np.argmax(lrs)) == 99
    assert max(lrs) == pytest.approx(1e-2 / np.sqrt(100), rel=1e-9)
    assert lrs[399] == pytest.approx(1e-2 / np.sqrt(400), rel=1e-9)
    assert lrs[0] == pytest.approx(1e-2 / 100 ** 1.5)


def test_warmup_cosine_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = make_scheduler(opt, "cosine", warmup=10, total_steps=110, min_lr_ratio=0.1)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert np.all(np.diff(lrs[9:]) <= 1e-12) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(60, "linear", 10, 110, 0.0) == pytest.approx(0.5)


def test_k_schedule_paper_blocks():
    ks = [k_for_epoch(e, (1, 2, 5), None, 12) for e in range(12)]
    assert ks == [1] * 4 + [2] * 4 + [5] * 4
    assert [k_for_epoch(e, (1, 3), 1, 5) for e in range(5)] == [1, 3, 3, 3, 3]


# ----------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_toy_corpus(tmp_path_factory.mktemp("c") / "corpus", n_cells=150, n_ccres=250, seed=0,
                            shard_size=40)


def test_plan_budget_coverage_determinism(corpus):
    idx = build_index(corpus)
    tr, ev = split_cells(idx.n_cells, 0.1, 0)
    assert len(ev) == 15 and not set(tr) & set(ev)
    cfg = PlanConfig(batch_tokens=300, world_size=2, max_len=60, bucket_cells=50, seed=1)
    plan = epoch_plan(idx, tr, 0, cfg)
    assert [b.tolist() for b in plan] == [b.tolist() for b in epoch_plan(idx, tr, 0, cfg)]
    assert [b.tolist() for b in plan] != [b.tolist() for b in epoch_plan(idx, tr, 1, cfg)]
    cells = np.concatenate(plan)
    assert len(np.unique(cells)) == len(cells) and set(cells) <= set(tr)
    assert len(cells) >= len(tr) - 4  # only a too-small last batch of a window may be dropped
    padded = np.minimum(idx.lengths, 60) + 2
    for b in plan:
        assert len(b) >= 2
        if len(b) > 2:
            assert len(b) * padded[b].max() <= 600  # token budget x world
        parts = [rank_part(b, r, 2) for r in range(2)]
        assert sorted(np.concatenate(parts).tolist()) == sorted(b.tolist())


def test_batch_contents_and_normalizers(corpus):
    idx = build_index(corpus)
    cache = ShardCache(idx)
    uids = np.array([3, 50, 121, 7])
    cfg = BatchConfig(n_ccres=idx.n_ccres, max_len=20, k=2, rlm=True, seed=0)
    b = make_batch(cache, uids, 0, cfg)
    again = make_batch(ShardCache(idx), uids, 0, cfg)
    for key in b:
        assert torch.equal(b[key], again[key]), key
    L = idx.lengths[uids]
    ids = b["input_ids"]
    assert ids.shape == (4, min(20, L.max()) + 2) and (ids[:, 0] == 1).all()
    assert ((ids > 3).sum(1).numpy() == np.minimum(L, 20)).all()
    assert (np.diff(b["pos_ptr"].numpy()) == L).all()  # ALL accessible cCREs are SR/CCA positives
    lab = b["cca_label"].numpy()
    cell = b["cca_cell"].numpy()
    n_ccres = idx.n_ccres
    for i in range(4):
        q = b["cca_ids"].numpy()[cell == i] - NUM_SPECIAL
        pos = set(b["pos_ccre"].numpy()[b["pos_ptr"][i]:b["pos_ptr"][i + 1]].tolist())
        assert set(q[lab[cell == i] == 1].tolist()) == pos
        negs = q[lab[cell == i] == 0]
        assert len(negs) == min(2 * L[i], n_ccres - L[i]) and not set(negs.tolist()) & pos
    n = step_normalizers(L, n_ccres, 2, 20, True)
    assert n["cca"] == len(lab) and n["rlm"] == len(b["rlm_label"]) and n["sr"] == 4 * n_ccres
    assert ((b["rlm_input_ids"] > 3).sum() == len(b["rlm_label"]))


def test_stream_with_workers_equals_without(corpus):
    idx = build_index(corpus)
    tr, _ = split_cells(idx.n_cells, 0.1, 0)
    plan = epoch_plan(idx, tr, 0, PlanConfig(batch_tokens=400, max_len=40))
    bcfg = BatchConfig(n_ccres=idx.n_ccres, max_len=40, k=1, seed=0)
    a = list(loader(MicroBatchStream(idx, plan, 0, 2, 0, 1, bcfg, stop=8), num_workers=0))
    b = list(loader(MicroBatchStream(idx, plan, 0, 2, 0, 1, bcfg, stop=8), num_workers=2))
    assert [int(x["micro_index"]) for x in b] == list(range(2, 8))
    for x, y in zip(a, b):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["cca_ids"], y["cca_ids"])


def test_pretrain_model_config_json_is_a_valid_model_config(tmp_path, toy_corpus):
    """pretrain's own model_config.json (sizes + vocab_id, corpus) is accepted as --model-config;
    a wrong type names the file and the field."""
    import json

    from epiflow.errors import ConfigError
    from epiflow.train.pretrain import PretrainConfig, build_model_config, pretrain

    corpus = toy_corpus(n_cells=60, n_ccres=120, n_types=3, seed=1, shard_size=25)
    pretrain(corpus, tmp_path / "run", PretrainConfig(model_config="tiny", epochs=1, max_steps=1, rlm_epochs=1,
                                                      batch_tokens=2048, max_len=64, ckpt_every=0,
                                                      progress=False, device="cpu"))
    written = tmp_path / "run" / "model_config.json"
    assert {"corpus", "vocab_id"} <= set(json.loads(written.read_text()))
    assert build_model_config(str(written), 120) == build_model_config("tiny", 120)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dim": "sixty-four"}))
    with pytest.raises(ConfigError) as ei:
        build_model_config(str(bad), 120)
    assert str(bad) in str(ei.value) and "field 'dim'" in str(ei.value) and "an integer" in str(ei.value)


def test_step_profiler_writes_the_op_table_of_the_chosen_steps(tmp_path, monkeypatch, toy_corpus):
    """EPIFLOW_PROFILE_STEPS=A:B profiles whole pretraining steps (forward, backward, optimiser) and
    writes one op table; a bad spec is a clear error; unset, nothing is written."""
    from epiflow.errors import ConfigError
    from epiflow.train.metrics import StepProfiler
    from epiflow.train.pretrain import PretrainConfig, pretrain

    corpus = toy_corpus(n_cells=60, n_ccres=120, n_types=3, seed=1, shard_size=25)
    cfg = dict(model_config="tiny", epochs=1, max_steps=3, rlm_epochs=1, batch_tokens=2048, max_len=64,
               ckpt_every=0, progress=False, device="cpu")
    monkeypatch.setenv("EPIFLOW_PROFILE_STEPS", "2:30")  # past the end: the table covers the steps run
    monkeypatch.setenv("EPIFLOW_PROFILE_OUT", str(tmp_path / "prof.txt"))
    pretrain(corpus, tmp_path / "run", PretrainConfig(**cfg))
    text = (tmp_path / "prof.txt").read_text()
    import pandas as pd

    n = len(pd.read_csv(tmp_path / "run" / "metrics.csv"))
    assert n >= 2 and text.startswith(f"# steps 2..{n}, sorted by self_cpu_time_total")
    assert "aten::" in text and "Self CPU" in text
    import re

    calls, per_step = map(int, re.search(r"aten operator calls: (\d+) \((\d+) per step\)", text.splitlines()[0]).groups())
    assert calls > 0 and abs(per_step - calls / (n - 1)) <= 1
    # the second table: the operators called most often, with their share of every call
    head, rows = text.split("# the aten operators called most often")[1].split("\n", 1)
    rows = [r.split() for r in rows.strip().splitlines()]
    assert 0 < len(rows) <= 25 and all(r[0].startswith("aten::") for r in rows)
    counts = [int(r[1]) for r in rows]
    assert counts == sorted(counts, reverse=True) and sum(counts) <= calls
    monkeypatch.delenv("EPIFLOW_PROFILE_OUT")
    monkeypatch.delenv("EPIFLOW_PROFILE_STEPS")
    pretrain(corpus, tmp_path / "run2", PretrainConfig(**cfg))
    assert not (tmp_path / "run2" / "profile_steps.txt").exists()
    for bad in ("x", "3:2", "0"):
        monkeypatch.setenv("EPIFLOW_PROFILE_STEPS", bad)
        with pytest.raises(ConfigError, match="EPIFLOW_PROFILE_STEPS"):
            StepProfiler(tmp_path)


@pytest.mark.slow
def test_pretrain_compile_runs_the_compiled_blocks_and_refuses_where_they_would_recompile(tmp_path, toy_corpus):
    """--compile compiles the encoder blocks (one graph on the padded sdpa path; on CUDA the bf16 varlen
    path): a CPU run with --backend sdpa trains and writes a checkpoint with the usual parameter names
    (~20 s, most of it inductor compiling the block); the per-sequence packed attention (CPU, fp32)
    would recompile at every batch, so compile is refused there before any work, with the fix."""
    from epiflow.errors import ConfigError
    from epiflow.model import load_epiagent_checkpoint
    from epiflow.train.pretrain import PretrainConfig, pretrain

    import shutil

    corpus = toy_corpus(n_cells=60, n_ccres=120, n_types=3, seed=1, shard_size=25)
    cfg = dict(model_config="tiny", epochs=1, max_steps=2, batch_tokens=2048, max_len=64, ckpt_every=0,
               progress=False, device="cpu", compile=True)
    with pytest.raises(ConfigError, match="compile needs the varlen flash attention kernel") as err:
        pretrain(corpus, tmp_path / "packed", PretrainConfig(**cfg))
    assert "--backend sdpa" in str(err.value) and not (tmp_path / "packed").exists()
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile (inductor) on CPU needs a C++ compiler (g++), which this machine lacks")
    s = pretrain(corpus, tmp_path / "sdpa", PretrainConfig(**cfg, backend="sdpa"))
    assert s["steps"] == 2 and np.isfinite(s["last"]["loss"])
    model = load_epiagent_checkpoint(tmp_path / "sdpa" / "checkpoint.pth")
    assert "EpiAgent_transformer.layers.0.mixer.Wqkv.weight" in model.state_dict()
