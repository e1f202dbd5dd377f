"""Annotation and imputation on real data (../shared/data): Buenrostro 2018 BM0828 and Granja 2019
mapped by the corpus stage onto one hg19 cCRE set, a tiny randomly initialised model, a few
fine-tuning steps on the 256 top-ranked cCREs of each cell (plumbing and baselines on real inputs; the
Buenrostro cells hold thousands of accessible cCREs, so full-length sentences would cost 5x the time). A full run uses a pretrained model
and all epochs: ``epiflow annotate --corpus CORPUS --checkpoint checkpoint.pth --dataset bm0828
--out OUT`` and ``epiflow impute ... --dataset granja``."""

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def real(tmp_path_factory, data_dir):
    from conftest import build_bone_marrow_corpus
    from epiflow.corpus.shard import open_corpus
    from epiflow.model import EpiAgentConfig, from_config, save_epiagent_checkpoint

    tmp = tmp_path_factory.mktemp("real_tasks")
    corpus_dir = build_bone_marrow_corpus(tmp, Path(data_dir), shard_size=600)
    corpus = open_corpus(corpus_dir)
    torch.manual_seed(0)
    ckpt = save_epiagent_checkpoint(from_config(EpiAgentConfig.preset("tiny", n_ccres=corpus.n_ccres)),
                                    tmp / "checkpoint.pth", write_config=True)
    return tmp, tmp / "corpus", ckpt


def test_annotate_buenrostro(real):
    from epiflow.plots.annotation import annotation_figures
    from epiflow.tasks.annotation import run
    from epiflow.tasks.common import load_cells, load_model
    from epiflow.tasks.config import AnnotationConfig

    tmp, corpus, ckpt = real
    cells = load_cells(corpus, dataset="bm0828")
    res = run(cells, load_model(ckpt, n_ccres=cells.n_ccres), AnnotationConfig(max_steps=3, max_len=256,
                                                                                progress=False), dataset="bm0828")
    pred, met = res.tables["predictions"], res.metrics
    annotation_figures(res, tmp / "ann")
    t = met.set_index(["method", "metric"])["value"]
    assert t[("EpiAgent", "n_classes")] == 7
    assert t[("EpiAgent", "n_query")] + t[("EpiAgent", "n_reference")] == len(pred) > 500
    assert set(pred["dataset"]) == {"bm0828"}
    # the LSI baseline on the real progenitors is far above chance (1/7)
    assert t[("LSI+LogReg", "accuracy")] > 0.5
    assert (tmp / "ann" / "sankey.png").exists() and (tmp / "ann" / "confusion.png").exists()


def test_impute_granja(real):
    from epiflow.plots.imputation import imputation_figures
    from epiflow.tasks.common import corpus_vocab, load_cells, load_model
    from epiflow.tasks.config import ImputationConfig
    from epiflow.tasks.imputation import run

    tmp, corpus, ckpt = real
    cells = load_cells(corpus, dataset="granja")
    res = run(cells, load_model(ckpt, n_ccres=cells.n_ccres), ImputationConfig(max_steps=3, max_len=256,
                                                                                 progress=False),
              vocab=corpus_vocab(corpus), dataset="granja")
    adata, met = res.h5ad["imputed"], res.metrics
    imputation_figures(res, tmp / "imp")
    t = met.set_index(["method", "metric"])["value"]
    assert adata.n_obs > 400 and adata.n_vars == t[("Raw", "n_ccres_kept")] > 100
    assert set(adata.obs["dataset"]) == {"granja"}
    assert np.isfinite(t[("LSI-recon", "NMI")]) and t[("LSI-recon", "pearson_cell_median")] > 0
    assert (tmp / "imp" / "imputation_box.png").exists()
