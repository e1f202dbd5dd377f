"""Integration + query mapping and promoter knockout targets on real data (../shared/data).

Granja 2019 (two donors, hg19 peaks) and Buenrostro 2018 BM0828 are mapped by the corpus stage onto one
hg19 cCRE set; a tiny randomly initialised model is fine-tuned for a few steps on a subsample of the
Granja cells with the donor as batch, and a subsample of Buenrostro 2018 is mapped onto it through the
shared coarse label map. The numbers of a random model are not a benchmark (docs/results_notes.md #8
has the pretrained ones); the test checks that every metric is computed on real inputs and lies in
its range, and that the LSI baseline on these cells clusters far above chance. ~1-2 min on 2 cores.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
COARSE = ROOT / "resources" / "label_maps" / "hematopoiesis_shared_coarse.tsv"


@pytest.fixture(scope="module")
def real(tmp_path_factory, data_dir):
    from conftest import build_bone_marrow_corpus
    from epiflow.corpus.shard import open_corpus
    from epiflow.model import EpiAgentConfig, from_config, save_epiagent_checkpoint

    tmp = tmp_path_factory.mktemp("real_integration")
    corpus = build_bone_marrow_corpus(tmp, Path(data_dir), shard_size=2000)
    n_ccres = open_corpus(corpus).n_ccres
    torch.manual_seed(0)
    cfg = EpiAgentConfig.preset("tiny", n_ccres=n_ccres, max_rank=256)
    ckpt = save_epiagent_checkpoint(from_config(cfg), tmp / "checkpoint.pth", write_config=True)
    return tmp, tmp / "corpus", ckpt


def test_granja_donors_integrated_and_buenrostro_mapped(real):
    from epiflow.report.results import write_task_result
    from epiflow.tasks.common import load_cells, load_model
    from epiflow.tasks.config import IntegrationConfig
    from epiflow.tasks.integration import run
    from epiflow.tasks.zeroshot import read_label_map

    tmp, corpus, ckpt = real
    torch.set_num_threads(2)
    ref = load_cells(corpus, dataset="granja", max_cells=240, seed=0)
    query = load_cells(corpus, dataset="bm0828", max_cells=120, seed=1)
    assert set(ref.obs["batch"]) == {"BMMC_D5T1", "BMMC_D6T1"}  # the two donors
    out = tmp / "integ"
    cfg = IntegrationConfig(batch_key="batch", label_key="cell_type", max_steps=4, batch_size=8, lr=1e-3,
                            max_len=254, seed=0, device="cpu", umap=False, progress=False)
    res = run(ref, load_model(ckpt, n_ccres=ref.n_ccres), cfg, query=query, label_map=read_label_map(COARSE))
    write_task_result(res, out, models=True)
    m = pd.read_csv(out / "metrics.tsv", sep="\t")
    integ = m[m["task"] == "integration"].set_index(["method", "metric"])["value"]
    methods = ["EpiAgent-BC", "EpiAgent-BC-nobatch", "EpiAgent-zeroshot", "LSI"]
    for meth in methods:
        assert integ[(meth, "n_cells")] == 240 and integ[(meth, "n_batches")] == 2
        assert integ[(meth, "n_cell_types")] == 6  # HSC, CMP.LMPP, GMP, CLP, B, CD8.N
        for metric in ("NMI", "ARI", "ASW_cell_type", "iLISI", "kBET", "kBET_global",
                       "graph_connectivity", "batch_ASW"):
            v = integ[(meth, metric)]
            lo = -0.5 if metric in ("ARI",) else 0.0
            assert np.isfinite(v) and lo <= v <= 1.0, (meth, metric, v)
    # real structure: LSI of these very sparse cells (~60 cCREs each) still finds the six types above
    # chance (NMI of random 6-way labels on 240 cells ~0.03; measured 0.23)
    assert integ[("LSI", "NMI")] > 0.1, integ[("LSI", "NMI")]
    # OT matching paired every cell with a cell of the other donor (the GMM may keep all matches of a
    # random model, whose embeddings are nearly equidistant), and the batch token was trained
    assert 0 < integ[("EpiAgent-BC", "matches_kept")] <= integ[("EpiAgent-BC", "matches_total")] == 240
    mt = pd.read_csv(out / "matches.tsv", sep="\t")
    assert (mt["batch"] != mt["partner_batch"]).all() and sorted(mt["cell"]) == list(range(240))
    bat = ref.obs["batch"].to_numpy()
    assert (bat[mt["cell"]] != bat[mt["partner"]]).all()
    assert integ[("EpiAgent-BC", "steps")] == 4 and np.isfinite(integ[("EpiAgent-BC", "final_loss")])

    q = m[m["task"] == "query_mapping"].set_index(["method", "metric"])["value"]
    for meth in ("EpiAgent-BC", "EpiAgent-BC-nobatch", "EpiAgent-zeroshot"):
        assert q[(meth, "n_query_cells")] == 120
        # every Buenrostro type has a coarse label (MEP too, although Granja has no MEP)
        assert q[(meth, "n_query_labelled")] == 120
        for metric in ("accuracy", "macro_F1", "balanced_accuracy"):
            assert 0.0 <= q[(meth, metric)] <= 1.0
    qp = pd.read_csv(out / "query_predictions.tsv", sep="\t")
    assert len(qp) == 120 and qp["cell"].str.startswith("bm0828:BM0828_").all()
    assert set(qp["label"]) <= {"HSC", "CMP.LMPP", "GMP", "CLP", "MEP"}
    assert set(qp["pred_EpiAgent-BC"]) <= {"HSC", "CMP.LMPP", "GMP", "CLP", "B", "CD8.N"}
    assert res.data["batches"] == ["BMMC_D5T1", "BMMC_D6T1"]


def test_promoter_knockout_targets_on_the_real_vocabulary(real, data_dir):
    """The TSS file of the corpus build (hg19) finds promoter cCREs of haematopoietic genes in the real
    vocabulary, each within the promoter window of one of the gene's TSS."""
    from epiflow.genome.bed import read_bed
    from epiflow.tasks.knockout import promoter_ccres, read_tss

    _, corpus, _ = real
    vocab = read_bed(corpus / "vocab.bed")
    genes = ["CEBPA", "CEBPE", "LYZ", "CSF3R", "HLF", "CRHBP"]
    t19 = promoter_ccres(read_tss(Path(data_dir) / "hg19_tss.bed.gz"), vocab, genes)
    # the real-data config's knockout genes; the vocabulary of this two-dataset corpus lacks some of them
    assert set(t19["gene"]) >= {"CSF3R", "CEBPE", "HLF", "CRHBP"}, t19
    assert (t19["ccre"] >= 0).all() and (t19["ccre"] < len(vocab)).all()
    # hg19 coordinates: each hit lies within 2 kb upstream / 500 bp downstream of one of the gene's TSS
    tss = read_tss(Path(data_dir) / "hg19_tss.bed.gz")
    for _, r in t19.iterrows():
        g = tss[(tss["gene"] == r["gene"]) & (tss["chrom"] == r["chrom"])]
        assert ((g["tss"] - 2000 < r["end"]) & (g["tss"] + 2001 > r["start"])).any(), r
