"""EpiAgent model: golden fixtures from the authors' code, backends, heads, losses, config, GNN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from epiflow.errors import ConfigError, VocabularyMismatchError
from epiflow.model import (
    EpiAgent,
    EpiAgentConfig,
    Packing,
    expand_rows,
    from_config,
    load_epiagent_checkpoint,
    losses,
    resolve_backend,
    token_mask,
)
from epiflow.model.attention import attention_packed, attention_padded, flash_attn_available
from epiflow.model.gnn import gcn_norm

TOL = dict(atol=1e-5, rtol=1e-5)
CPU_BACKENDS = ["sdpa", "packed"]


def close(a, b):
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    np.testing.assert_allclose(a, np.asarray(b), **TOL)


@pytest.fixture(scope="module")
def io(fixtures_dir):
    return {name: dict(np.load(fixtures_dir / f"{name}_io.npz", allow_pickle=False))
            for name in ("epiagent_tiny", "epiagent_tiny_supervised", "epiagent_tiny_bc")}


def _load(fixtures_dir, name, backend):
    return load_epiagent_checkpoint(fixtures_dir / f"{name}.pth", num_heads=4, backend=backend)


# --------------------------------------------------------------------------- golden fixtures
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_base_fixture_all_outputs(fixtures_dir, io, backend):
    d = io["epiagent_tiny"]
    model = _load(fixtures_dir, "epiagent_tiny", backend)
    assert model.kind == "base" and model.n_ccres == 300 and not model.training
    ids = torch.from_numpy(d["input_ids"])
    mask = d["attention_mask"]
    with torch.no_grad():
        out = model(ids)
        assert out.hidden.shape == (4, 102, 64)
        close(out.hidden.numpy()[mask], d["transformer_outputs"][mask])
        close(out.cell_embedding, d["cls"])
        sig = model.signal_logits(out.cell_embedding)
        close(sig, d["signal_logits"])
        rows = expand_rows(out.cell_embedding, torch.from_numpy(d["cca_offsets"]))
        cca = model.cca_logits(rows, torch.from_numpy(d["cca_ids"]))
        close(cca, d["cca_logits"])
        rlm = model.rlm_logits(out.hidden[token_mask(ids)])
        close(rlm, d["rlm_logits"])
        close(losses.sr_loss(sig, torch.from_numpy(d["sr_target"]), model.pos_weight("SR")), d["sr_loss"])
        r, c = losses.positives_from_input_ids(ids)
        close(losses.sr_loss_sparse(sig, r, c, model.pos_weight("SR")), d["sr_loss"])
        close(losses.cca_loss(cca, torch.from_numpy(d["cca_target"]), model.pos_weight("CCA")), d["cca_loss"])
        close(losses.rlm_loss(rlm, torch.from_numpy(d["rlm_target"]), model.pos_weight("RLM")), d["rlm_loss"])


def test_base_fixture_layer_outputs_and_embeddings(fixtures_dir, io):
    d = io["epiagent_tiny"]
    model = _load(fixtures_dir, "epiagent_tiny", "sdpa")
    mask = d["attention_mask"]
    with torch.no_grad():
        emb, l0, l1 = model.layer_outputs(torch.from_numpy(d["input_ids"]))
    np.testing.assert_array_equal(emb.numpy()[mask], d["embeddings"][mask])  # bit-identical
    close(l0.numpy()[mask], d["layer0_output"][mask])
    close(l1.numpy()[mask], d["layer1_output"][mask])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_supervised_fixture(fixtures_dir, io, backend):
    d = io["epiagent_tiny_supervised"]
    model = _load(fixtures_dir, "epiagent_tiny_supervised", backend)
    assert model.kind == "supervised" and model.config.num_classes == 5
    assert model.config.classifier == "mlp" and model.config.classifier_hidden == (256, 128)
    mask = d["attention_mask"]
    with torch.no_grad():
        out = model(torch.from_numpy(d["input_ids"]))
        close(out.hidden.numpy()[mask], d["transformer_outputs"][mask])
        close(out.cell_embedding, d["cls"])
        logits = model.classify(out.cell_embedding)
        close(logits, d["logits"])
        close(losses.focal_loss(logits, torch.from_numpy(d["class_target"])), d["focal_loss"])
    with pytest.raises(ConfigError, match="signal decoder"):
        model.signal_logits(out.cell_embedding)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batch_conditioned_fixture(fixtures_dir, io, backend):
    d = io["epiagent_tiny_bc"]
    model = _load(fixtures_dir, "epiagent_tiny_bc", backend)
    assert model.kind == "batch-conditioned" and model.config.num_batches == 3
    ids = torch.from_numpy(d["input_ids"])
    mask = d["attention_mask"]
    with torch.no_grad():
        out = model(ids, batch_ids=torch.from_numpy(d["batch_ids"]))
        close(out.hidden.numpy()[mask], d["transformer_outputs"][mask])
        close(out.cell_embedding, d["cls"])
        sig = model.signal_logits(out.cell_embedding)
        close(sig, d["signal_logits"])
        cca = model.cca_logits(expand_rows(out.cell_embedding, torch.from_numpy(d["cca_offsets"])),
                               torch.from_numpy(d["cca_ids"]))
        close(cca, d["cca_logits"])
        rlm = model.rlm_logits(out.hidden[token_mask(ids)])
        close(rlm, d["rlm_logits"])
        close(losses.sr_loss(sig, torch.from_numpy(d["sr_target"]), model.pos_weight("SR")), d["sr_loss"])
        close(losses.cca_loss(cca, torch.from_numpy(d["cca_target"]), model.pos_weight("CCA")), d["cca_loss"])
        close(losses.rlm_loss(rlm, torch.from_numpy(d["rlm_target"]), model.pos_weight("RLM")), d["rlm_loss"])
        nob = model(ids)
        close(nob.hidden.numpy()[mask], d["transformer_outputs_no_batch"][mask])
        close(nob.cell_embedding, d["cls_no_batch"])
        close(model.signal_logits(nob.cell_embedding), d["signal_logits_no_batch"])
        # the batch token is exactly an added conditional embedding at position 0
        cond = model.batch_embedding(torch.from_numpy(d["batch_ids"]))
        via_cond = model(ids, cond_embedding=cond)
        close(via_cond.cell_embedding, d["cls"])
    emb = model.layer_outputs(ids, batch_ids=torch.from_numpy(d["batch_ids"]))[0]
    np.testing.assert_array_equal(emb.detach().numpy()[mask], d["embeddings"][mask])


def test_encode_packed_matches_fixture(fixtures_dir, io):
    d = io["epiagent_tiny"]
    model = _load(fixtures_dir, "epiagent_tiny", "sdpa")  # encode_packed always uses varlen attention
    ids = torch.from_numpy(d["input_ids"])
    mask = ids != 0
    tokens = ids[mask]
    cu = torch.zeros(5, dtype=torch.int64)
    cu[1:] = mask.sum(1).cumsum(0)
    with torch.no_grad():
        po = model.encode_packed(tokens, cu)
    close(po.hidden, d["transformer_outputs"][d["attention_mask"]])
    close(po.cell_embedding, d["cls"])
    with torch.no_grad():
        rlm = model.rlm_logits(po.hidden[tokens >= 4])
    close(rlm, d["rlm_logits"])


# --------------------------------------------------------------------------- backends
def _tiny(**kw):
    torch.manual_seed(0)
    cfg = EpiAgentConfig.preset("tiny", n_ccres=50, dropout=0.0, **kw)
    return from_config(cfg)


def _random_batch(lengths, n_ccres=50, seed=1):
    g = torch.Generator().manual_seed(seed)
    L = max(lengths) + 2
    ids = torch.zeros(len(lengths), L, dtype=torch.int64)
    for i, n in enumerate(lengths):  # tiny test batch
        ids[i, 0] = 1
        ids[i, 1:n + 1] = torch.randperm(n_ccres, generator=g)[:n] + 4
        ids[i, n + 1] = 2
    return ids


def test_sdpa_and_packed_agree_forward_and_backward():
    model = _tiny()
    model.train()  # dropout is 0: train mode must still agree
    ids = _random_batch([3, 30, 11, 45])
    mask = ids != 0
    grads = {}
    outs = {}
    for backend in CPU_BACKENDS:
        model.zero_grad()
        out = model(ids, backend=backend)
        loss = (out.hidden[mask] ** 2).mean() + model.signal_logits(out.cell_embedding).mean()
        loss.backward()
        outs[backend] = out.hidden[mask].detach()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    close(outs["sdpa"], outs["packed"].numpy())
    assert grads["sdpa"].keys() == grads["packed"].keys()
    for n in grads["sdpa"]:
        close(grads["packed"][n], grads["sdpa"][n].numpy())


def test_attention_kernels_agree_directly():
    torch.manual_seed(3)
    lens = [2, 7, 5]
    H, d = 2, 8
    T = sum(lens)
    q, k, v = (torch.randn(T, H, d) for _ in range(3))
    packing = Packing.from_lengths(lens)
    packed = attention_packed(q, k, v, packing)
    L = max(lens)
    pad = torch.zeros(3, 3, H, L, d)
    mask = torch.zeros(3, L, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(packing.cu_seqlens[:-1].tolist(), lens)):
        for j, x in enumerate((q, k, v)):
            pad[j, i, :, :n] = x[s:s + n].transpose(0, 1)
        mask[i, :n] = True
    padded = attention_padded(pad[0], pad[1], pad[2], mask)
    for i, (s, n) in enumerate(zip(packing.cu_seqlens[:-1].tolist(), lens)):
        close(packed[s:s + n], padded[i, :, :n].transpose(0, 1).numpy())
    assert packing.positions().tolist() == [0, 1, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]


def test_attention_calls_sdpa_on_4d_blocks(monkeypatch):
    """SDPA's fused kernels take 4-D inputs only: a 3-D call falls back to the math kernel, which
    materialises every L x L attention matrix (on an H200 the packed training path filled 137 GB
    that way). Both paths must hand SDPA [B, H, L, d] and get the same numbers back."""
    import torch.nn.functional as F

    from epiflow.model import attention

    real, shapes = F.scaled_dot_product_attention, []

    def spy(q, k, v, *a, **kw):
        shapes.append((q.dim(), k.dim(), v.dim()))
        return real(q, k, v, *a, **kw)

    torch.manual_seed(4)
    lens = [3, 6]
    q, k, v = (torch.randn(sum(lens), 2, 8) for _ in range(3))
    packing = Packing.from_lengths(lens)
    ref = attention_packed(q, k, v, packing)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    out = attention_packed(q, k, v, packing, dropout_p=0.0)
    attention_padded(torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8),
                     torch.ones(2, 6, dtype=torch.bool))
    assert shapes == [(4, 4, 4)] * 3
    assert torch.equal(out, ref) and out.shape == q.shape


@torch.library.custom_op("epiflow_test::varlen_attention", mutates_args=())
def _reference_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                      max_q: int, max_k: int, p: float, causal: bool, debug: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in for aten::_flash_attention_forward that torch.compile treats as one opaque operator."""
    out = torch.empty_like(q)
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        w = torch.softmax(torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) / q.shape[-1] ** 0.5, -1)
        out[s:e] = torch.einsum("hqk,khd->qhd", w, v[s:e])
    return out, q.new_zeros(0)


@_reference_varlen.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, p, causal, debug):
    return torch.empty_like(q), q.new_empty(0)


def test_packed_flash_varlen_dispatch(monkeypatch):
    """Where the varlen flash kernel runs (CUDA, fp16/bf16, sm80+), the packed backend makes ONE call
    for the whole batch with the training dropout, instead of one SDPA call per sequence. A CPU
    reference stands in for the kernel here (the kernel itself is checked on the GPU by
    benchmarks/gpu_check.py, golden part): it must receive the packed [T, H, d] tensors, int32
    cu_seqlens, the longest length and p, and its output comes back unchanged."""
    from epiflow.model import attention
    from epiflow.model import epiagent as ep

    calls = []

    def fake_kernel(q, k, v, cu_q, cu_k, max_q, max_k, p, causal, debug):
        calls.append({"shape": tuple(q.shape), "cu": cu_q.tolist(), "dtype": cu_q.dtype, "same_cu": cu_k is cu_q,
                      "max": (max_q, max_k), "p": p, "causal": causal, "debug": debug})
        return _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, p, causal, debug)

    torch.manual_seed(5)
    lens = [4, 9, 2]
    qkv = torch.randn(sum(lens), 3, 2, 8)
    q, k, v = qkv.unbind(1)
    packing = Packing.from_lengths(lens)
    ref = attention_packed(q, k, v, packing)
    assert attention.packed_kernel(q) == "per-sequence"  # CPU: no flash kernel
    monkeypatch.setattr(attention, "_flash_varlen_ok", lambda device, dtype: True)
    monkeypatch.setattr(attention, "_flash_varlen_op", lambda: fake_kernel)
    monkeypatch.delenv("EPIFLOW_PACKED_PER_SEQUENCE", raising=False)
    assert attention.packed_kernel(q) == "flash-varlen"
    out = attention_packed(q, k, v, packing, dropout_p=0.25)
    close(out, ref.numpy())
    assert calls == [{"shape": (15, 2, 8), "cu": [0, 4, 13, 15], "dtype": torch.int32, "same_cu": True,
                      "max": (9, 9), "p": 0.25, "causal": False, "debug": False}]
    for var in ("EPIFLOW_PACKED_PER_SEQUENCE", "EPIFLOW_SDPA_CUDNN"):  # the per-sequence loop: comparisons,
        monkeypatch.setenv(var, "1")                                 # or SDPA allowed to pick cuDNN
        assert attention.packed_kernel(q) == "per-sequence"
        attention_packed(q, k, v, packing)
        assert len(calls) == 1
        monkeypatch.delenv(var)
    # the model hands its attention dropout to the kernel in training, 0 in eval
    model = from_config(EpiAgentConfig.preset("tiny", n_ccres=50, dropout=0.1)).set_backend("packed")
    ids = _random_batch([10, 20, 3])
    calls.clear()
    model.train()(ids)
    model.eval()(ids)
    assert [c["p"] for c in calls] == [0.1] * model.config.num_layers + [0.0] * model.config.num_layers
    assert all(c["cu"] == [0, 12, 34, 39] for c in calls)
    assert ep.attention_packed is attention_packed


def test_cudnn_sdpa_switch(monkeypatch):
    from epiflow.model.attention import cudnn_sdpa_allowed

    monkeypatch.delenv("EPIFLOW_SDPA_CUDNN", raising=False)
    assert not cudnn_sdpa_allowed()
    for value, expected in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv("EPIFLOW_SDPA_CUDNN", value)
        assert cudnn_sdpa_allowed() is expected


def test_backend_selection_errors():
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("auto", "cpu", training=True) == "packed"  # CPU training: no pad waste
    assert resolve_backend("PACKED") == "packed"
    with pytest.raises(ConfigError, match="unknown attention backend"):
        resolve_backend("xformers")
    if not flash_attn_available():
        with pytest.raises(ConfigError, match="flash"):
            resolve_backend("flash", "cpu")
        with pytest.raises(ConfigError, match="flash"):
            _tiny().set_backend("flash")


def test_auto_backend_packs_in_training_and_pads_in_inference(monkeypatch):
    """backend 'auto' on CPU: a model in train mode runs the packed path, in eval mode the padded
    sdpa path; both give the padded model's outputs (dropout 0 here)."""
    import epiflow.model.epiagent as ep

    torch.manual_seed(0)
    ref = from_config(EpiAgentConfig.preset("tiny", n_ccres=50, dropout=0.0))
    auto = from_config(EpiAgentConfig.preset("tiny", n_ccres=50, dropout=0.0)).set_backend("auto")
    auto.load_state_dict(ref.state_dict())
    assert auto.backend == "auto"
    ids = _random_batch([10, 20, 3])
    calls = []
    real = ep.attention_packed
    monkeypatch.setattr(ep, "attention_packed", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        expect = ref.eval()(ids)
        auto.train()
        got = auto(ids)
        assert len(calls) == auto.config.num_layers  # one packed attention per layer
        close(got.cell_embedding, expect.cell_embedding.numpy())
        mask = ids != 0
        close(got.hidden[mask], expect.hidden[mask].numpy())
        auto.eval()
        auto(ids)
        assert len(calls) == auto.config.num_layers  # eval: the padded sdpa path
    assert auto.backend == "auto"


def test_dropout_active_in_training_only():
    torch.manual_seed(0)
    model = from_config(EpiAgentConfig.preset("tiny", n_ccres=50, dropout=0.5))
    ids = _random_batch([10, 20])
    model.eval()
    with torch.no_grad():
        a, b = model(ids).cell_embedding, model(ids).cell_embedding
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        c = model(ids, backend="packed").cell_embedding
    assert not torch.allclose(a, c)


def test_gradient_checkpointing_same_gradients():
    model = _tiny()
    model.train()
    ids = _random_batch([5, 9])
    res = []
    for flag in (False, True):
        model.set_gradient_checkpointing(flag)
        model.zero_grad()
        model(ids, backend="packed").cell_embedding.sum().backward()
        res.append(model.cCRE_embedding.weight.grad.clone())
    close(res[1], res[0].numpy())


def test_input_validation():
    model = _tiny()
    with pytest.raises(VocabularyMismatchError, match="outside the model vocabulary"):
        model(torch.tensor([[1, 60, 2]]))
    with pytest.raises(ConfigError, match="rank embeddings"):
        model(torch.ones(1, model.config.max_rank + 10, dtype=torch.int64))
    with pytest.raises(ConfigError, match="batch_embedding"):
        model(torch.tensor([[1, 5, 2]]), batch_ids=torch.tensor([0]))


# --------------------------------------------------------------------------- conditional tokens, GNN
def test_conditional_modes_and_negative_ids():
    model = _tiny(num_batches=2, num_conditions=3)
    model.eval()
    ids = _random_batch([4, 6])
    with torch.no_grad():
        base = model(ids).cell_embedding
        none = model(ids, batch_ids=torch.tensor([-1, -1])).cell_embedding
        assert torch.equal(base, none)
        both = model(ids, batch_ids=torch.tensor([0, 1]), condition_ids=torch.tensor([2, 0])).cell_embedding
        cond = model.batch_embedding.weight[[0, 1]] + model.condition_embedding.weight[[2, 0]]
        close(model(ids, cond_embedding=cond).cell_embedding, both.numpy())
        mixed = model(ids, batch_ids=torch.tensor([0, -1])).cell_embedding
        close(mixed[1], base[1].numpy())
        assert not torch.allclose(mixed[0], base[0])
    rep = _tiny(cond_mode="replace")
    rep.eval()
    z = torch.randn(2, 64)
    with torch.no_grad():
        x = rep.embed_padded(ids, z)
        close(x[:, 0], (z + rep.rank_embedding.weight[0]).numpy())


def test_gcn_norm_matches_dense():
    ei = torch.tensor([[0, 1, 1, 2, 3], [1, 0, 2, 1, 3]])
    w = torch.tensor([0.5, 0.5, 2.0, 2.0, 3.0])
    src, dst, norm = gcn_norm(ei, w, 4)
    A = torch.zeros(4, 4)
    A[ei[1], ei[0]] = w  # A[target, source]
    A[3, 3] = 3.0        # existing self loop kept
    A[0, 0] = A[1, 1] = A[2, 2] = 1.0
    deg = A.sum(1)
    dense = deg.rsqrt()[:, None] * A * deg.rsqrt()[None, :]
    got = torch.zeros(4, 4)
    got[dst, src] = norm
    close(got, dense.numpy())


def test_perturbation_gnn_token_and_checkpoint(tmp_path):
    model = _tiny(num_genes=5, gnn_edges=0)
    model.perturbation_gnn.set_graph(torch.tensor([[0, 1, 2], [1, 0, 3]]), torch.tensor([0.3, 0.3, 0.9]))
    model.eval()
    ids = _random_batch([4, 6, 3])
    genes = torch.tensor([[1, -1], [2, 4], [-1, -1]])
    with torch.no_grad():
        node = model.perturbation_gnn.node_embeddings()
        cond = model.perturbation_gnn(genes)
        close(cond[0], node[1].numpy())
        close(cond[1], (node[2] + node[4]).numpy())
        close(cond[2], np.zeros(64))
        a = model(ids, perturbation=genes).cell_embedding
        close(model(ids, cond_embedding=cond).cell_embedding, a.numpy())
    path = tmp_path / "gnn.pth"
    model.save_epiagent_checkpoint(path, write_config=True)
    back = load_epiagent_checkpoint(path)  # num_heads from the side file
    assert back.config.num_genes == 5 and back.config.gnn_edges == 3
    with torch.no_grad():
        close(back(ids, perturbation=genes).cell_embedding, a.numpy())


def test_perturbation_gnn_backward_sums_in_a_fixed_order(ordered_accumulation):
    """Genes repeat across cells and every node is gathered by several edges: the GNN's gathers are
    index_select (their backward adds in order), not advanced indexing (parallel atomic adds on CPU
    with >= 2 threads: the genetic task's fine-tuning differed from run to run in the 6th digit)."""
    model = _tiny(num_genes=5, gnn_edges=0)
    model.perturbation_gnn.set_graph(torch.tensor([[0, 1, 2, 2], [1, 0, 3, 1]]), torch.tensor([0.3, 0.3, 0.9, 0.5]))
    genes = torch.tensor([[1, -1], [2, 1], [1, 1], [-1, -1]])
    with ordered_accumulation():
        out = model.perturbation_gnn(genes)
        out.square().sum().backward()
    node = model.perturbation_gnn.node_embeddings().detach()
    close(out[2].detach(), (2 * node[1]).numpy())  # same values as the indexing it replaced
    assert model.perturbation_gnn.gene_embedding.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- config, losses
def test_presets_and_paper_parameter_count():
    with torch.device("meta"):
        paper = EpiAgent(EpiAgentConfig.preset("paper"))
    c = paper.parameter_counts()
    per_layer = sum(p.numel() for p in paper.EpiAgent_transformer.layers[0].parameters())
    assert per_layer == 3_152_384
    assert paper.n_ccres == 1_355_445 and paper.config.vocab_size == 1_355_449
    assert c["embeddings"] == 1_355_449 * 512 + 8192 * 512
    assert abs(c["total"] - 1.45e9) < 0.01e9
    small = EpiAgentConfig.preset("small", n_ccres=1000)
    assert small.n_ccres == 1000 and small.max_rank == 8192
    with pytest.raises(ConfigError, match="needs n_ccres"):
        EpiAgentConfig.preset("tiny")
    with pytest.raises(ConfigError, match="unknown model preset"):
        EpiAgentConfig.preset("huge", n_ccres=3)
    with pytest.raises(ConfigError, match="divisible"):
        EpiAgentConfig.preset("tiny", n_ccres=3, num_heads=5)
    cfg = EpiAgentConfig.preset("tiny", n_ccres=7, classifier="linear", num_classes=3)
    assert EpiAgentConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("key, value, words", [
    ("dim", "sixty-four", "expected an integer"), ("num_layers", 2.5, "expected an integer"),
    ("dropout", "high", "expected a number"), ("pretrain_heads", 1, "expected true or false"),
    ("classifier", 3, "expected a string or null"), ("classifier_hidden", [256], "a list of two integers"),
])
def test_model_config_wrong_types_name_file_and_field(key, value, words):
    with pytest.raises(ConfigError) as ei:
        EpiAgentConfig.from_dict({"n_ccres": 7, key: value}, path="m.json")
    msg = str(ei.value)
    assert msg.startswith(f"m.json, field '{key}'") and words in msg and "Fix:" in msg, msg
    with pytest.raises(ConfigError, match=f"field '{key}'"):
        EpiAgentConfig.preset("tiny", n_ccres=7, **{key: value})
    with pytest.raises(ConfigError) as ei:
        EpiAgentConfig.from_dict({"n_ccres": 7, "corpus": "x"}, path="m.json")
    assert "m.json" in str(ei.value) and "'corpus'" in str(ei.value) and "Fix: remove" in str(ei.value)


def test_linear_classifier_and_bert_init():
    torch.manual_seed(0)
    cfg = EpiAgentConfig.preset("tiny", n_ccres=50, classifier="linear", num_classes=3,
                                pretrain_heads=False, init="bert")
    model = from_config(cfg)
    assert model.kind == "supervised"
    assert model.cCRE_embedding.weight.std().item() < 0.05
    x = torch.randn(4, 64)
    logits = model.classify(x)
    assert logits.shape == (4, 3)
    t = torch.tensor([0, 1, 2, 0])
    close(losses.classification_loss(logits, t), torch.nn.functional.cross_entropy(logits, t).item())
    # focal loss with gamma 0 is the cross-entropy
    close(losses.focal_loss(logits, t, gamma=0.0), losses.classification_loss(logits, t).item())


def test_sparse_sr_loss_matches_dense_random():
    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 4
    rows = torch.tensor([0, 0, 1, 2, 2, 2])
    cols = torch.tensor([3, 17, 0, 5, 6, 39])
    dense = losses.dense_target(rows, cols, (3, 40))
    close(losses.sr_loss_sparse(logits, rows, cols, 7.0), losses.sr_loss(logits, dense, 7.0).item())
    # and it is differentiable the same way
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    losses.sr_loss_sparse(a, rows, cols).backward()
    losses.sr_loss(b, dense).backward()
    close(a.grad, b.grad.numpy())


def test_compiled_blocks_trace_whole_and_match_eager(monkeypatch):
    """`compile_blocks` (pretrain --compile) compiles each encoder block in place: one graph per block
    (fullgraph) on the padded sdpa path and on the packed path with the varlen kernel (a stand-in
    operator here; CUDA's is aten::_flash_attention_forward), whose kernel is decided before the
    blocks; outputs and gradients equal the eager model's, batch lengths may change, and the
    parameter names (the checkpoint format) stay the same."""
    import copy

    from epiflow.model import attention

    graphs = []

    def backend(gm, example_inputs):  # records each graph dynamo hands over, runs it as traced
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = from_config(EpiAgentConfig.preset("tiny", n_ccres=50, dropout=0.0)).set_backend("sdpa")
    compiled = copy.deepcopy(eager).compile_blocks(backend=backend, fullgraph=True)
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    for lengths in ([10, 20, 3], [7, 31]):  # a new padded width: dynamic shapes, no error
        ids = _random_batch(lengths)
        out_e, out_c = eager.train()(ids), compiled.train()(ids)
        close(out_c.cell_embedding, out_e.cell_embedding.detach().numpy())
        out_e.cell_embedding.sum().backward()
        out_c.cell_embedding.sum().backward()
        for (n, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
            if a.grad is not None:
                close(b.grad, a.grad.numpy())
        eager.zero_grad(), compiled.zero_grad()
    assert graphs and all("scaled_dot_product_attention" in g.code for g in graphs)  # whole blocks traced
    n_padded = len(graphs)
    # the packed path with the varlen kernel: the blocks hold no data-dependent Python
    monkeypatch.setattr(attention, "_flash_varlen_ok", lambda device, dtype: True)
    monkeypatch.setattr(attention, "_flash_varlen_op", lambda: torch.ops.epiflow_test.varlen_attention)
    eager.set_backend("packed"), compiled.set_backend("packed")
    with torch.no_grad():
        for lengths in ([10, 20, 3], [5, 40, 12, 8]):
            ids = _random_batch(lengths)
            ref = eager.eval()(ids)
            got = compiled.eval()(ids)
            close(got.cell_embedding, ref.cell_embedding.numpy())
            close(got.hidden[ids != 0], ref.hidden[ids != 0].numpy())
    assert len(graphs) > n_padded and all("varlen_attention" in g.code for g in graphs[n_padded:])


def test_packed_flash_varlen_call_matches_the_real_operator_schema(monkeypatch):
    """The varlen call of the packed backend against PyTorch's own aten::_flash_attention_forward, on the
    meta device (its shape functions; CUDA runs the kernel): the arguments fit the operator's schema, the
    output is [T, H, d], and autograd's backward (aten::_flash_attention_backward) reaches the fused QKV
    projection, through a bf16 model too."""
    from epiflow.model import attention

    monkeypatch.setattr(attention, "_flash_varlen_ok", lambda device, dtype: True)
    lens, H, d = [5, 9, 3], 2, 8
    qkv = torch.empty(sum(lens), 3, H, d, device="meta", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = qkv.unbind(1)
    out = attention_packed(q, k, v, Packing.from_lengths(lens, device="meta"), dropout_p=0.1)
    assert out.shape == (17, H, d) and out.device.type == "meta" and out.dtype == torch.bfloat16
    out.sum().backward()
    assert qkv.grad is not None and qkv.grad.shape == qkv.shape
    from epiflow.model.epiagent import _compute_dtype, _Ctx

    x32 = torch.zeros(2, 4)  # the encoder decides the kernel for the dtype Wqkv will output
    assert _compute_dtype(x32) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _compute_dtype(x32) == torch.bfloat16
    with torch.device("meta"):  # the encoder as the model runs it (the data checks around it need real ids)
        model = from_config(EpiAgentConfig.preset("tiny", n_ccres=50, dropout=0.1)).to(torch.bfloat16).train()
    x = torch.empty(39, model.config.dim, device="meta", dtype=torch.bfloat16, requires_grad=True)
    h = model.EpiAgent_transformer(x, _Ctx("packed", packing=Packing.from_lengths([12, 22, 5], device="meta")))
    assert h.shape == x.shape
    h.sum().backward()
    assert model.EpiAgent_transformer.layers[0].mixer.Wqkv.weight.grad.shape == (3 * model.config.dim, model.config.dim)
