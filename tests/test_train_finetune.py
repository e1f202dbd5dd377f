"""The generic fine-tuning loop of the downstream tasks: CCA + SR, classifier, MSE regression."""

import numpy as np
import pytest
import torch

from epiflow.model import EpiAgentConfig, from_config
from epiflow.corpus.shard import Shard
from epiflow.train.finetune import embed_cells, finetune
from epiflow.train.toy import write_toy_corpus

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_toy_corpus(tmp_path_factory.mktemp("ft") / "corpus", n_cells=120, n_ccres=200, n_types=3,
                            seed=5, shard_size=60)


def _model(**kw):
    torch.manual_seed(0)
    return from_config(EpiAgentConfig.preset("tiny", n_ccres=200, dropout=0.0, **kw))


def test_cca_sr_finetune_reduces_losses(corpus):
    m = _model()
    r = finetune(m, corpus, ("cca", "sr"), epochs=3, lr=3e-3, batch_tokens=1024, progress=False)
    h = r["history"]
    assert r["steps"] > 5 and h[-1]["cca"] < h[0]["cca"] and h[-1]["sr"] < h[0]["sr"]
    assert not m.training


def test_classifier_finetune_learns_labels(corpus):
    cs = Shard.from_any(corpus)
    y = cs.obs["cell_type"].astype("category").cat.codes.to_numpy()
    m = _model(classifier="linear", num_classes=3)
    r = finetune(m, cs, ("classify",), labels=y, epochs=4, lr=3e-3, batch_tokens=1024, progress=False)
    assert r["history"][-1]["classify"] < r["history"][0]["classify"]
    emb = embed_cells(m, cs)
    assert emb.shape == (120, 64)
    with torch.no_grad():
        pred = m.classify(torch.from_numpy(emb)).argmax(1).numpy()
    assert (pred == y).mean() > 0.6


def test_mse_regression_variant(corpus):
    m = _model()
    r = finetune(m, corpus, ("mse",), epochs=3, lr=3e-3, batch_tokens=1024, progress=False,
                 cells=np.arange(0, 120, 2))
    h = r["history"]
    assert h[-1]["sr"] < h[0]["sr"] and h[-1]["cca"] < h[0]["cca"]


def test_bad_objective_and_vocab(corpus):
    from epiflow.errors import ConfigError, VocabularyMismatchError

    with pytest.raises(ConfigError, match="unknown fine-tuning objective"):
        finetune(_model(), corpus, ("nope",))
    torch.manual_seed(0)
    other = from_config(EpiAgentConfig.preset("tiny", n_ccres=50))
    with pytest.raises(VocabularyMismatchError):
        finetune(other, corpus, ("cca",))
    with pytest.raises(ConfigError, match="labels"):
        finetune(_model(classifier="linear", num_classes=3), corpus, ("classify",))
