"""epiflow.model.derive: the one way to make a fine-tuning model from a pretrained base (classifier,
batch tokens, [PER] tokens, gene GNN): what is copied, what is new and how it is initialised, the
seeded and RNG-neutral initialisation, and the errors."""

import copy

import numpy as np
import pytest
import torch

from epiflow.errors import CheckpointError, ConfigError
from epiflow.genome.gene_graph import GeneGraph
from epiflow.model import EpiAgentConfig, derive, from_config, load_epiagent_checkpoint, token_scale

N_CCRES = 60
SMALL = dict(max_rank=128, num_layers=1, dim=32, num_heads=2, ffn=64, dropout=0.0)


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    return load_epiagent_checkpoint(tiny_checkpoint(N_CCRES, **SMALL))


@pytest.fixture(scope="module")
def graph():
    return GeneGraph(
        ["g0", "g1", "g2"],
        np.array([[0, 1, 2, 0], [1, 2, 0, 2]], dtype=np.int64),
        np.array([0.5, 0.25, 1.0, 0.75], dtype=np.float32),
    )


def _copied_equal(model, base, new_prefixes=()):
    """Every key of ``model`` outside ``new_prefixes`` equals the base's; returns how many were compared."""
    bsd, n = base.state_dict(), 0
    for k, v in model.state_dict().items():
        if k.startswith(tuple(new_prefixes)):
            assert k not in bsd or not torch.equal(v, bsd[k])
            continue
        assert k in bsd, k
        assert torch.equal(v, bsd[k]), k
        n += 1
    return n


def test_classifier_is_new_and_everything_else_copied(base):
    before = {k: v.clone() for k, v in base.state_dict().items()}
    for kind, leaf in (("linear", "fc"), ("mlp", "fc3")):
        m = derive(base, classes=5, classifier=kind, seed=1)
        assert m.config.classifier == kind and m.config.num_classes == 5 and m.config.pretrain_heads
        assert getattr(m.classifier, leaf).weight.shape == (5, m.config.dim if kind == "linear" else 128)
        assert m.classify(torch.zeros(2, m.config.dim)).shape == (2, 5)
        n = _copied_equal(m, base, ["classifier."])
        assert n == len(base.state_dict())  # all base keys (incl. pretraining heads and criterion buffers)
        assert m.backend == base.backend and m.config.dropout == base.config.dropout
    assert derive(base, classes=3).config.classifier == "mlp"  # the authors' head by default
    for k, v in base.state_dict().items():  # the base is not modified
        assert torch.equal(v, before[k])
    assert not hasattr(base, "classifier")


def test_supervised_layout_drops_the_pretraining_heads(base):
    m = derive(base, classes=4, classifier="mlp", pretrain_heads=False)
    assert m.kind == "supervised"
    assert not any(k.startswith(("signal_decoder", "fc1_for_", "criterion_")) for k in m.state_dict())
    n = _copied_equal(m, base, ["classifier."])
    assert n == sum(
        1 for k in base.state_dict() if k.startswith(("cCRE_embedding.", "rank_embedding.", "EpiAgent_transformer."))
    )


def test_batch_tokens_start_at_zero_and_drop_a_classifier(base):
    sup = derive(base, classes=3, classifier="linear")
    m = derive(sup, batches=4, seed=2)
    assert m.config.num_batches == 4 and m.config.classifier is None and m.kind == "batch-conditioned"
    assert m.batch_embedding.weight.shape == (4, m.config.dim)
    assert torch.count_nonzero(m.batch_embedding.weight) == 0
    assert _copied_equal(m, base, ["batch_embedding."]) == len(base.state_dict())
    # zero tokens: the derived model starts as the base
    ids = torch.tensor([[1, 7, 9, 12, 2], [1, 30, 5, 2, 0]])
    m.eval(), base.eval()
    with torch.no_grad():
        a = m(ids, batch_ids=torch.tensor([0, 3])).cell_embedding
        b = base(ids).cell_embedding
    torch.testing.assert_close(a, b)


def test_condition_tokens_on_the_scale_of_the_input_embeddings(base):
    m = derive(base, conditions=400, seed=0)
    w = m.condition_embedding.weight.detach()
    assert w.shape == (400, m.config.dim)
    assert token_scale(base) == pytest.approx(float(base.cCRE_embedding.weight.detach()[4:].std()), rel=1e-5)
    assert float(w.std()) == pytest.approx(token_scale(base), rel=0.05)
    assert abs(float(w.mean())) < 0.05 * token_scale(base)
    assert _copied_equal(m, base, ["condition_embedding."]) == len(base.state_dict())


def test_gene_gnn_gets_the_graph(base, graph):
    m = derive(base, gene_graph=graph, conditions=1)
    gnn = m.perturbation_gnn
    assert m.config.num_genes == 3 and m.config.gnn_edges == 4 and gnn.gene_embedding.weight.shape == (3, 32)
    assert torch.equal(gnn.edge_index, torch.from_numpy(graph.edge_index))
    assert torch.equal(gnn.edge_weight, torch.from_numpy(graph.edge_weight))
    assert m(torch.tensor([[1, 7, 9, 2]]), perturbation=torch.tensor([1])).cell_embedding.shape == (1, 32)
    assert _copied_equal(m, base, ["perturbation_gnn.", "condition_embedding."]) == len(base.state_dict())


def test_seeded_and_the_global_random_state_untouched(base, graph):
    kw = dict(classes=3, classifier="mlp", conditions=2, gene_graph=graph)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = derive(base, seed=7, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(11)  # whatever ran before does not matter
    b = derive(base, seed=7, **kw)
    c = derive(base, seed=8, **kw)
    new = ("classifier.", "condition_embedding.", "perturbation_gnn.")
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    keys = [k for k in sa if k.startswith(new) and sa[k].is_floating_point()]
    assert len(keys) >= 10
    assert all(torch.equal(sa[k], sb[k]) for k in keys)
    assert not torch.equal(sa["classifier.fc3.weight"], sc["classifier.fc3.weight"])
    assert not torch.equal(sa["condition_embedding.weight"], sc["condition_embedding.weight"])
    # the batch-token model too (its construction draws a whole model's default initialisation)
    state = torch.get_rng_state()
    derive(base, batches=2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)


def test_device_dtype_and_gradient_checkpointing_follow_the_base(base):
    b64 = copy.deepcopy(base).double().set_gradient_checkpointing(True)
    m = derive(b64, classes=2)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert m.encoder.gradient_checkpointing
    assert torch.equal(m.cCRE_embedding.weight, b64.cCRE_embedding.weight)


def test_errors(base):
    enc = derive(base, classes=2, pretrain_heads=False)
    with pytest.raises(ConfigError, match="signal decoder / CCA head") as e:
        derive(enc, batches=2)
    assert e.value.field == "batches"
    with pytest.raises(ConfigError, match="signal decoder / CCA head"):
        derive(base, batches=2, pretrain_heads=False)
    with pytest.raises(ConfigError, match="unknown classifier"):
        derive(base, classes=3, classifier="mlp_focal")
    with pytest.raises(ConfigError, match="needs classes"):
        derive(base, classifier="linear")
    for kw in (dict(classes=-1), dict(batches=-2), dict(conditions=-1)):
        with pytest.raises(ConfigError, match=">= 0"):
            derive(base, **kw)
    # weights that do not match the base's config
    other = from_config(EpiAgentConfig.preset("tiny", n_ccres=N_CCRES, **SMALL))
    other.rank_embedding = torch.nn.Embedding(64, 32)
    with pytest.raises(CheckpointError, match="rank_embedding.weight"):
        derive(other, classes=2)
