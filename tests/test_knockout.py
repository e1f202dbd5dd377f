"""In-silico cCRE knockout: promoter targets, chimeras, effect sign on a transparent embedding, CLI."""

import gzip

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from epiflow.cli import main
from epiflow.corpus.shard import shard_from_counts, write_corpus_meta, write_shard
from epiflow.model import EpiAgentConfig, from_config, save_epiagent_checkpoint
from epiflow.tasks.config import KnockoutConfig
from epiflow.tasks.knockout import (chimeric_cells, knockout_effects, knockout_targets, promoter_ccres, read_tss,
                                    set_column)

N = 60


def _states(n_a=80, n_b=80, seed=0):
    """State A opens cCREs 0..29, state B opens 30..59 (p = 0.7; background 0.05)."""
    rng = np.random.default_rng(seed)
    j = np.arange(N)
    pa = np.where(j < 30, 0.7, 0.05)
    pb = np.where(j >= 30, 0.7, 0.05)
    xa = sp.csr_matrix((rng.random((n_a, N)) < pa).astype(np.float32))
    xb = sp.csr_matrix((rng.random((n_b, N)) < pb).astype(np.float32))
    return xa, xb


def test_chimeras_mix_in_proportion_to_the_score():
    rng = np.random.default_rng(0)
    xa = sp.csr_matrix(np.tile((np.arange(N) < 30).astype(np.float32), (400, 1)))
    xb = sp.csr_matrix(np.tile((np.arange(N) >= 30).astype(np.float32), (400, 1)))
    s = rng.random(400)
    c = chimeric_cells(xa, xb, np.arange(400), np.arange(400), s, rng).toarray()
    frac_b = c[:, 30:].sum(1) / 30
    frac_a = c[:, :30].sum(1) / 30
    assert np.corrcoef(frac_b, s)[0, 1] > 0.95
    assert np.corrcoef(frac_a, 1 - s)[0, 1] > 0.95
    assert set(np.unique(c)) <= {0.0, 1.0}
    x = set_column(sp.csr_matrix(c[:3]), 5, True).toarray()
    assert (x[:, 5] == 1).all() and (set_column(sp.csr_matrix(c[:3]), 5, False).toarray()[:, 5] == 0).all()


def test_knockout_of_state_b_ccres_lowers_the_score():
    """With the accessibility itself as embedding, removing a B-specific cCRE moves a 0.5 chimera
    towards A: its effect is negative and significantly below random knockouts; an A-specific one rises."""
    xa, xb = _states()
    res = knockout_effects(lambda x: x.toarray().astype(np.float32), xa, xb,
                           pd.DataFrame({"gene": ["B1", "B2", "A1"], "ccre": [40, 50, 10]}),
                           n_reference=600, n_query=60, n_random=30, k=20, seed=0)
    t = res["table"].set_index("gene")
    assert t.loc["B1", "mean_effect"] < 0 and t.loc["B2", "mean_effect"] < 0
    assert t.loc["A1", "mean_effect"] > 0
    assert t.loc["B1", "p_value"] < 0.05 and t.loc["B2", "p_value"] < 0.05
    assert t.loc["A1", "p_value"] > 0.5
    assert res["score_r"] > 0.8  # the embedding carries the score


def test_promoter_targets_from_tss_bed_and_gtf(tmp_path):
    bed = tmp_path / "tss.bed.gz"
    with gzip.open(bed, "wt") as fh:
        fh.write("chr1\t10000\t10001\tGP\t.\t+\nchr1\t50000\t50001\tGM\t.\t-\n")
    vocab = pd.DataFrame({"chrom": ["chr1"] * 4, "start": [8500, 9800, 50300, 53000],
                          "end": [8600, 10100, 50400, 53100]})
    t = promoter_ccres(read_tss(bed), vocab, ["GP", "GM", "NOPE"], upstream=2000, downstream=500)
    assert sorted(zip(t["gene"], t["ccre"])) == [("GM", 2), ("GP", 0), ("GP", 1)]
    gtf = tmp_path / "a.gtf"
    gtf.write_text('1\tx\tgene\t10001\t12000\t.\t+\t.\tgene_id "g1"; gene_name "GP";\n'
                   '1\tx\tgene\t40000\t50001\t.\t-\t.\tgene_id "g2"; gene_name "GM";\n')
    g = read_tss(gtf)
    assert g["tss"].tolist() == [10000, 50000] and g["chrom"].tolist() == ["chr1", "chr1"]
    t2 = promoter_ccres(g, vocab, None)
    assert sorted(zip(t2["gene"], t2["ccre"])) == sorted(zip(t["gene"], t["ccre"]))


def test_bad_gtf_is_an_error_naming_the_file(tmp_path):
    from epiflow.errors import InputFormatError

    text = "".join(f'1\tx\tgene\t{10001 + i}\t12000\t.\t+\t.\tgene_id "g{i}";\n' for i in range(3000))
    cut = tmp_path / "cut.gtf.gz"
    cut.write_bytes(gzip.compress(text.encode())[:2000])  # truncated download
    with pytest.raises(InputFormatError, match=r"cut.gtf.gz.*truncated or not gzip"):
        read_tss(cut)
    bad = tmp_path / "bad.gtf"
    bad.write_text('1\tx\tgene\tten\t12000\t.\t+\t.\tgene_id "g1";\n')
    with pytest.raises(InputFormatError, match=r"bad.gtf.*not all integers"):
        read_tss(bad)
    with pytest.raises(InputFormatError, match="not found"):
        read_tss(tmp_path / "missing.gtf")


def _ko_corpus(tmp_path):
    xa, xb = _states(40, 40, seed=1)
    counts = sp.vstack([xa, xb]).tocsr()
    root = tmp_path / "corpus"
    (root / "shards").mkdir(parents=True)
    df = np.full(N, 0.4)
    np.save(root / "df.npy", df)
    (root / "vocab.bed").write_text("".join(f"chr1\t{10000 + i * 1000}\t{10500 + i * 1000}\n" for i in range(N)))
    obs = pd.DataFrame({"cell_id": [f"c{i}" for i in range(80)], "dataset": "pair",
                        "state": ["normal"] * 40 + ["cancer"] * 40})
    write_shard(root / "shards/shard_00000.h5", shard_from_counts(counts, df, obs, vocab_id="toy"))
    write_corpus_meta(root, {"n_cells": 80, "n_ccres": N, "vocab_id": "toy", "genome": "hg38",
                             "shards": ["shards/shard_00000.h5"], "shard_cells": [80]})
    return root


@pytest.fixture
def ko_inputs(tmp_path):
    root = _ko_corpus(tmp_path)
    tss = tmp_path / "tss.bed"
    tss.write_text("chr1\t51200\t51201\tGENEB\t.\t+\n")  # promoter window covers cCREs 39..41
    torch.manual_seed(0)
    ckpt = tmp_path / "base.pth"
    save_epiagent_checkpoint(from_config(EpiAgentConfig.preset("tiny", n_ccres=N, dropout=0.0)), ckpt,
                             write_config=True)
    return root, tss, ckpt


def test_knockout_cli_on_tiny_model(tmp_path, ko_inputs):
    root, tss, ckpt = ko_inputs
    out = tmp_path / "ko"
    rc = main(["knockout", "--checkpoint", str(ckpt), "--corpus", str(root), "--genes", "GENEB", "--tss", str(tss),
               "--n-reference", "150", "--n-query", "10", "--n-random", "5", "--max-steps", "3",
               "--device", "cpu", "--out", str(out)])
    assert rc == 0
    # the files of before the verb moved onto its settings (issue #18) and the tables of Fig. 5b-d
    assert {f.name for f in out.iterdir()} == {"metrics.tsv", "knockout.tsv", "random.tsv", "knockout_umap.png",
                                               "knockout_effects.png", "reference_cells.tsv", "shifts.tsv",
                                               "tss_ccres.tsv"}
    tab = pd.read_csv(out / "knockout.tsv", sep="\t")
    assert set(tab["gene"]) == {"GENEB"} and sorted(tab["ccre"]) == [39, 40, 41]
    assert np.isfinite(tab["mean_effect"]).all() and tab["p_value"].between(0, 1).all()
    m = pd.read_csv(out / "metrics.tsv", sep="\t")
    assert list(m.columns) == ["task", "dataset", "method", "metric", "value"]
    assert (m["metric"] == "mean_effect[GENEB:40]").any()
    assert m.set_index("metric")["value"]["finetune_steps"] == 3
    assert (out / "knockout_umap.png").stat().st_size > 0 and (out / "knockout_effects.png").stat().st_size > 0
    assert len(pd.read_csv(out / "random.tsv", sep="\t")) == 5
    # Fig. 5b: the cCREs within 10 kb of the promoter window [49,200, 51,700) of GENEB (cCREs 29..51), the
    # knocked-out ones marked, positions relative to the TSS, the accessible fraction in each state
    near = pd.read_csv(out / "tss_ccres.tsv", sep="\t")
    assert list(near.columns) == ["gene", "chrom", "tss", "strand", "window", "downstream", "ccre", "start", "end",
                                  "rel_start", "rel_end", "target", "state_a", "state_b", "fraction_a",
                                  "fraction_b"]
    assert near["ccre"].tolist() == list(range(29, 52)) and set(near["gene"]) == {"GENEB"}
    assert near.loc[near["target"], "ccre"].tolist() == [39, 40, 41]
    assert near.set_index("ccre").loc[40, ["rel_start", "rel_end"]].tolist() == [-1200, -700]
    assert (near["state_a"] == "normal").all() and (near["state_b"] == "cancer").all()
    assert near[["fraction_a", "fraction_b"]].stack().between(0, 1).all()
    # state B opens cCREs 30..59: far more accessible in the cancer cells there
    b_open = near[near["ccre"] >= 30]
    assert (b_open["fraction_b"] - b_open["fraction_a"]).mean() > 0.4
    # Fig. 5c: the reference cells' UMAP and scores
    ref = pd.read_csv(out / "reference_cells.tsv", sep="\t")
    assert list(ref.columns) == ["cell", "score", "umap1", "umap2"] and len(ref) == 150
    assert ref["score"].between(0, 1).all() and np.isfinite(ref[["umap1", "umap2"]]).all().all()
    # Fig. 5d: every query cell of every target, position and score with the target added / removed; the
    # mean scores are those of knockout.tsv
    sh = pd.read_csv(out / "shifts.tsv", sep="\t")
    assert list(sh.columns) == ["knockout", "gene", "ccre", "n_ccres", "query", "umap1_added", "umap2_added",
                                "umap1_removed", "umap2_removed", "score_added", "score_removed"]
    assert (sh["n_ccres"] == 1).all()
    assert sh["knockout"].unique().tolist() == ["GENEB:39", "GENEB:40", "GENEB:41"] and len(sh) == 3 * 10
    means = sh.groupby("knockout", sort=False)[["score_added", "score_removed"]].mean()
    assert np.allclose(means.to_numpy(), tab[["score_added", "score_removed"]].to_numpy())
    lo, hi = ref[["umap1", "umap2"]].min().to_numpy(), ref[["umap1", "umap2"]].max().to_numpy()
    pos = sh[["umap1_added", "umap2_added"]].to_numpy()
    assert ((pos >= lo) & (pos <= hi)).all()  # a mean of reference positions lies among them
    # the default unit: fig5d / fig5e show one column / bar per promoter cCRE
    import matplotlib.pyplot as plt

    fig = _draw("fig5d", out, ["reference_cells.tsv", "shifts.tsv"])
    assert [a.get_title() for a in fig.axes if a.get_title()] == [f"pair: GENEB:{j} knocked out" for j in (39, 40, 41)]
    plt.close(fig)
    fig = _draw("fig5e", out, ["knockout.tsv"], out / "metrics.tsv")
    assert [t.get_text().split("\n")[0] for t in fig.axes[0].get_xticklabels()] == ["GENEB:39", "GENEB:40", "GENEB:41"]
    plt.close(fig)


def test_tss_neighbourhood_both_strands():
    """Fig. 5b's table: cCREs around each gene's TSS, positions strand-aware (upstream < 0), the targets
    marked; none for cCRE-index targets."""
    from epiflow.tasks.knockout import tss_neighbourhood

    vocab = pd.DataFrame({"chrom": ["1", "chr1", "chr1", "chr1"], "start": [9000, 20000, 50300, 49000],
                          "end": [9100, 20100, 50400, 49100]})
    tss = pd.DataFrame({"chrom": ["chr1", "chr1"], "tss": [10000, 50000], "strand": ["+", "-"],
                        "gene": ["GP", "GM"]})
    cfg = KnockoutConfig(genes=["GP", "GM"])
    targets = knockout_targets(cfg, tss=tss, vocab=vocab)
    near = tss_neighbourhood(cfg, tss, vocab, targets)
    got = {(g, c): (a, b, t) for g, c, a, b, t in near[["gene", "ccre", "rel_start", "rel_end", "target"]].itertuples(
        index=False)}
    # GP (+): the cCRE at 9,000 lies 1,000-900 bp upstream (a target); the one at 20,000 is within 10 kb of the
    # window's end (10,500) but not a target
    assert got[("GP", 0)] == (-1000, -900, True) and got[("GP", 1)] == (10000, 10100, False)
    # GM (-): upstream is to the right; 50,300-50,400 lies 399-299 bp upstream, 49,000-49,100 downstream
    assert got[("GM", 2)] == (-399, -299, True) and got[("GM", 3)] == (901, 1001, False)
    assert tss_neighbourhood(cfg, tss, vocab, targets, flank=1000)["ccre"].tolist() == [0, 2, 3]
    assert tss_neighbourhood(KnockoutConfig(target_ccres=[1]), tss, vocab).empty


def test_knockout_run_equals_the_cli_with_former_flag_names(tmp_path, ko_inputs):
    """run() with the corpus df gives the numbers the CLI writes; the former flags (--input, --out-dir,
    --finetune-steps, --ccres for --target-ccres) and --no-figures still work; the targets are a comma list."""
    from epiflow.report.results import write_task_result
    from epiflow.tasks.common import corpus_df, load_cells, load_model
    from epiflow.tasks.knockout import run

    root, _, ckpt = ko_inputs
    out = tmp_path / "ko"
    rc = main(["knockout", "--checkpoint", str(ckpt), "--input", str(root), "--ccres", "40,10",
               "--n-reference", "120", "--n-query", "8", "--n-random", "4", "--finetune-steps", "2",
               "--no-figures", "--no-progress", "--device", "cpu", "--out-dir", str(out)])
    assert rc == 0
    assert {f.name for f in out.iterdir()} == {"metrics.tsv", "knockout.tsv", "random.tsv", "reference_cells.tsv",
                                               "shifts.tsv", "tss_ccres.tsv"}
    assert pd.read_csv(out / "tss_ccres.tsv", sep="\t").empty  # cCRE indices: no genes around a TSS
    cfg = KnockoutConfig(target_ccres=[40, 10], n_reference=120, n_query=8, n_random=4, max_steps=2, figures=False,
                         progress=False, device="cpu")
    cells = load_cells(root)
    res = run(cells, load_model(ckpt, n_ccres=cells.n_ccres), cfg, knockout_targets(cfg), df=corpus_df(root))
    assert res.tables["knockout"]["ccre"].tolist() == [40, 10] and len(res.data["finetune_loss"]) == 2
    assert set(res.models) == {"model"} and res.data["dataset"] == "pair"
    write_task_result(res, tmp_path / "api")
    for f in ("metrics.tsv", "knockout.tsv", "random.tsv", "tss_ccres.tsv"):
        assert (tmp_path / "api" / f).read_text() == (out / f).read_text(), f


def test_knockout_targets_from_the_settings():
    vocab = pd.DataFrame({"chrom": ["1", "chr1", "chr1"], "start": [9000, 20000, 50300],
                          "end": [9100, 20100, 50400]})
    tss = pd.DataFrame({"chrom": ["chr1", "chr1"], "tss": [10000, 50000], "strand": ["+", "-"],
                        "gene": ["GP", "GM"]})
    t = knockout_targets(KnockoutConfig(genes=["GP", "GM"]), tss=tss, vocab=vocab)
    assert sorted(zip(t["gene"], t["ccre"])) == [("GM", 2), ("GP", 0)]  # chrom names normalised
    # cCRE indices win over genes
    assert knockout_targets(KnockoutConfig(target_ccres=[3, 1], genes=["GP"]))["ccre"].tolist() == [3, 1]
    from epiflow.errors import EpiflowError

    with pytest.raises(EpiflowError, match="give targets"):
        knockout_targets(KnockoutConfig(genes=["GP"]))
    with pytest.raises(EpiflowError, match="vocabulary"):
        knockout_targets(KnockoutConfig(genes=["GP"]), tss=tss)
    with pytest.raises(EpiflowError, match="no cCRE of the vocabulary"):
        knockout_targets(KnockoutConfig(genes=["NOPE"]), tss=tss, vocab=vocab)


def test_knockout_needs_both_states(tiny_checkpoint):
    from epiflow.errors import EpiflowError
    from epiflow.tasks.common import load_model
    from epiflow.tasks.knockout import run

    xa, _ = _states(10, 1)
    sh = shard_from_counts(xa, np.full(N, 0.4), pd.DataFrame({"state": ["normal"] * 10}))
    model = load_model(tiny_checkpoint(N), n_ccres=N)
    with pytest.raises(EpiflowError, match="both states"):
        run(sh, model, KnockoutConfig(device="cpu"), [1])
    sh.obs["state"] = ["normal"] * 5 + ["cancer"] * 5
    with pytest.raises(EpiflowError, match="target cCRE indices"):
        run(sh, model, KnockoutConfig(device="cpu"), [N])


def test_group_knockout_removes_every_target_at_once():
    """The paper's 'Group' knockout: all target cCREs removed together move a 0.5 chimera towards state
    A further than any one of them; its row is named Group, with the number of cCREs."""
    xa, xb = _states()
    targets = pd.DataFrame({"gene": ["B1", "B2", "B3"], "ccre": [40, 50, 35]})
    res = knockout_effects(lambda x: x.toarray().astype(np.float32), xa, xb, targets, n_reference=600,
                           n_query=60, n_random=30, k=20, seed=0, group=True)
    t = res["table"]
    # the three single cCREs against 30 random cCREs, the Group against 30 random triples (size-matched)
    assert len(t) == 4 and res["n_targets"] == 4 and res["query_knn"].shape[0] == 4 + 30 + 30
    assert res["random"]["n_ccres"].value_counts().to_dict() == {1: 30, 3: 30}
    g = t.iloc[-1]
    assert g["gene"] == "Group" and g["ccre"] == -1 and g["n_ccres"] == 3 and (t["n_ccres"].iloc[:3] == 1).all()
    assert g["mean_effect"] < t["mean_effect"].iloc[:3].min() < 0 and g["p_value"] < 0.05
    from epiflow.tasks.knockout import target_name

    assert [target_name(r) for _, r in t.iterrows()] == ["B1:40", "B2:50", "B3:35", "Group"]
    # without the group, the single-cCRE rows are the same numbers (the same draws)
    single = knockout_effects(lambda x: x.toarray().astype(np.float32), xa, xb, targets, n_reference=600,
                              n_query=60, n_random=30, k=20, seed=0)["table"]
    assert np.allclose(single["mean_effect"], t["mean_effect"].iloc[:3])


def test_per_gene_promoter_windows():
    """GENE:BP gives a gene its own upstream window (the paper: EGLN3 at 5,000 bp, the others 2,000)."""
    from epiflow.errors import ConfigError
    from epiflow.tasks.knockout import gene_windows

    assert gene_windows(["ABCC1", "EGLN3:5000"], 2000) == {"ABCC1": 2000, "EGLN3": 5000}
    for bad in ("EGLN3:far", ":100", "X:-5"):
        with pytest.raises(ConfigError, match="GENE or GENE:BP"):
            gene_windows([bad], 2000)
    vocab = pd.DataFrame({"chrom": ["chr1"] * 3, "start": [6500, 46000, 9000], "end": [6600, 46100, 9100]})
    tss = pd.DataFrame({"chrom": ["chr1", "chr1"], "tss": [10000, 50000], "strand": ["+", "+"],
                        "gene": ["NEAR", "FAR"]})
    cfg = KnockoutConfig(genes=["FAR:5000", "NEAR"], promoter_upstream=2000, promoter_downstream=0)
    t = knockout_targets(cfg, tss=tss, vocab=vocab)
    # NEAR (2 kb) reaches only the cCRE at 9,000; FAR (5 kb) the one at 46,000; genes in the given order
    assert list(zip(t["gene"], t["ccre"])) == [("FAR", 1), ("NEAR", 2)]
    t = knockout_targets(KnockoutConfig(genes=["FAR", "NEAR:5000"], promoter_upstream=2000, promoter_downstream=0), tss=tss,
                         vocab=vocab)
    assert sorted(zip(t["gene"], t["ccre"])) == [("NEAR", 0), ("NEAR", 2)]


def test_knockout_cli_group_row(tmp_path, ko_inputs):
    """--group adds the combined knockout through the verb: a Group row in knockout.tsv, a
    mean_effect[Group] metric for the panels, and the figures draw it."""
    root, tss, ckpt = ko_inputs
    out = tmp_path / "ko"
    rc = main(["knockout", "--checkpoint", str(ckpt), "--corpus", str(root), "--genes", "GENEB:1200", "--tss",
               str(tss), "--promoter-downstream", "0", "--group", "--n-reference", "120", "--n-query", "8", "--n-random", "4",
               "--device", "cpu", "--out", str(out)])
    assert rc == 0
    tab = pd.read_csv(out / "knockout.tsv", sep="\t")
    # a 1,200 bp upstream window (no downstream) holds cCREs 40 (50,000-50,500) and 41 (51,000-51,500)
    assert tab["gene"].tolist() == ["GENEB", "GENEB", "Group"] and tab["ccre"].tolist() == [40, 41, -1]
    assert tab["n_ccres"].tolist() == [1, 1, 2] and tab["ccres"].astype(str).tolist() == ["40", "41", "40,41"]
    assert tab["knockout"].tolist() == ["GENEB:40", "GENEB:41", "Group"]
    m = pd.read_csv(out / "metrics.tsv", sep="\t").set_index("metric")["value"]
    assert np.isfinite(m["mean_effect[Group]"]) and m["n_targets"] == 3
    assert (out / "knockout_effects.png").stat().st_size > 0
    # the Group knockout's query shifts (Fig. 5d): its mean change of score is the Group row's effect
    sh = pd.read_csv(out / "shifts.tsv", sep="\t")
    assert sh["knockout"].unique().tolist() == ["GENEB:40", "GENEB:41", "Group"]
    grp = sh[sh["knockout"] == "Group"]
    assert len(grp) == 8 and (grp["ccre"] == -1).all() and (grp["gene"] == "Group").all()
    assert np.isclose((grp["score_removed"] - grp["score_added"]).mean(), tab["mean_effect"].iloc[-1])
    near = pd.read_csv(out / "tss_ccres.tsv", sep="\t")
    assert near.loc[near["target"], "ccre"].tolist() == [40, 41] and (near["window"] == 1200).all()


def test_gene_unit_knocks_out_each_genes_promoter_ccres_together():
    """target_unit gene (the paper's Fig. 5d-e): one set per gene = its promoter cCREs, named by the gene,
    plus the Group of all; each is tested against random knockouts of as many cCREs."""
    from scipy.stats import ttest_ind

    from epiflow.tasks.knockout import knockout_sets

    targets = pd.DataFrame({"gene": ["B", "B", "A", "B", "A"], "ccre": [40, 50, 10, 35, 12],
                            "chrom": "chr1", "start": [4000, 5000, 1000, 3500, 1200],
                            "end": [4100, 5100, 1100, 3600, 1300]})
    sets, info = knockout_sets(targets, "gene", group=True)
    assert [s.tolist() for s in sets] == [[35, 40, 50], [10, 12], [10, 12, 35, 40, 50]]
    assert info["knockout"].tolist() == ["B", "A", "Group"] and info["gene"].tolist() == ["B", "A", "Group"]
    assert info["ccres"].tolist() == ["35,40,50", "10,12", "10,12,35,40,50"]
    assert info["n_ccres"].tolist() == [3, 2, 5] and (info["ccre"] == -1).all()
    assert info[["start", "end"]].iloc[0].tolist() == [3500, 5100]  # the span of the gene's cCREs
    # the default unit keeps one set per cCRE
    sets1, info1 = knockout_sets(targets, "ccre")
    assert [s.tolist() for s in sets1] == [[40], [50], [10], [35], [12]] and info1["knockout"].iloc[0] == "B:40"

    xa, xb = _states()
    res = knockout_effects(lambda x: x.toarray().astype(np.float32), xa, xb, targets, n_reference=600, n_query=60,
                           n_random=30, k=20, seed=0, group=True, unit="gene")
    t = res["table"].set_index("knockout")
    assert list(t.index) == ["B", "A", "Group"] and res["n_targets"] == 3
    # B's promoter (state-B cCREs) removed lowers the score, significantly below random triples; A raises it
    assert t.loc["B", "mean_effect"] < 0 and t.loc["B", "p_value"] < 0.05
    assert t.loc["A", "mean_effect"] > 0 and t.loc["A", "p_value"] > 0.5
    # size-matched control: 30 random single cCREs, and 30 random sets of each target size (2, 3, 5)
    rand = res["random"]
    assert rand["n_ccres"].value_counts().sort_index().to_dict() == {1: 30, 2: 30, 3: 30, 5: 30}
    assert res["query_knn"].shape[0] == 3 + 4 * 30
    for ccres, m in zip(rand["ccres"], rand["n_ccres"]):
        js = [int(j) for j in ccres.split(",")]
        assert len(set(js)) == m  # m distinct cCREs at once
    assert (rand.loc[rand["n_ccres"] == 1, "ccre"] >= 0).all() and (rand.loc[rand["n_ccres"] > 1, "ccre"] == -1).all()
    for i, (name, m) in enumerate([("B", 3), ("A", 2), ("Group", 5)]):
        eff = res["query_scores"][i, 1] - res["query_scores"][i, 0]
        pool = res["random_effects_by_size"][m]
        assert len(pool) == 30 * 60
        assert np.isclose(t.loc[name, "p_value"], ttest_ind(eff, pool, equal_var=False, alternative="less").pvalue)
        assert np.isclose(t.loc[name, "random_mean_effect"], rand.loc[rand["n_ccres"] == m, "mean_effect"].mean())
    # the random single cCREs are the same draws as with the per-cCRE unit
    single = knockout_effects(lambda x: x.toarray().astype(np.float32), xa, xb, targets, n_reference=600,
                              n_query=60, n_random=30, k=20, seed=0)
    assert single["random"]["ccre"].tolist() == rand.loc[rand["n_ccres"] == 1, "ccre"].tolist()
    assert np.allclose(single["random_effects"], res["random_effects"])


def test_gene_unit_targets_are_the_genes_promoter_ccres():
    """With the gene unit, each target's cCRE set is exactly the promoter cCREs of its gene
    (promoter_ccres with the gene's window); cCRE indices have no gene: a clear error."""
    from epiflow.errors import ConfigError, EpiflowError
    from epiflow.tasks.knockout import knockout_sets, run

    vocab = pd.DataFrame({"chrom": ["chr1"] * 6, "start": [6500, 8500, 9800, 46000, 48500, 49900],
                          "end": [6600, 8600, 10100, 46100, 48600, 50100]})
    tss = pd.DataFrame({"chrom": ["chr1", "chr1"], "tss": [10000, 50000], "strand": ["+", "+"],
                        "gene": ["NEAR", "FAR"]})
    cfg = KnockoutConfig(genes=["NEAR", "FAR:5000"], promoter_upstream=2000, promoter_downstream=0, target_unit="gene")
    targets = knockout_targets(cfg, tss=tss, vocab=vocab)
    sets, info = knockout_sets(targets, cfg.target_unit)
    assert info["knockout"].tolist() == ["NEAR", "FAR"]
    for gene, win, js in zip(["NEAR", "FAR"], [2000, 5000], sets):
        own = promoter_ccres(tss, vocab, [gene], upstream=win, downstream=0)
        assert js.tolist() == sorted(own["ccre"]) and len(js) > 1
    assert [s.tolist() for s in sets] == [[1, 2], [3, 4, 5]]
    # cCRE indices with the gene unit
    with pytest.raises(ConfigError, match="target_unit.*no gene") as err:
        knockout_targets(KnockoutConfig(target_ccres=[1, 2], target_unit="gene"))
    assert "--genes" in str(err.value.fix)
    with pytest.raises(ConfigError, match="target_unit"):
        knockout_sets(pd.DataFrame({"ccre": [1, 2]}), "gene")
    with pytest.raises(ConfigError, match="unknown knockout unit"):
        knockout_sets(targets, "exon")
    xa, xb = _states(10, 10)
    sh = shard_from_counts(sp.vstack([xa, xb]).tocsr(), np.full(N, 0.4),
                           pd.DataFrame({"state": ["normal"] * 10 + ["cancer"] * 10}))
    with pytest.raises(EpiflowError, match="target_unit"):
        run(sh, None, KnockoutConfig(device="cpu", target_unit="gene", max_steps=5), [1, 2])


def _draw(panel_name, out_dir, files, metrics=None):
    """The figure of a paper panel drawn from a knockout folder's tables (and the Figure, to read its labels)."""
    from epiflow.plots.figures import DRAW, PANELS, build_panel, read_metrics, read_table, table_name

    panel = PANELS[panel_name]
    paths = [out_dir / f for f in files]
    tables = {"pair": {table_name(p): read_table(p) for p in paths}}  # the corpus's dataset, as in metrics.tsv
    m = read_metrics([] if metrics is None else [metrics])
    fig = DRAW[panel.draw](panel, m, tables)
    png = out_dir / f"{panel_name}.png"
    assert build_panel(panel_name, metrics=[] if metrics is None else [metrics], tables={"pair": paths}, out=png) == [png]
    assert png.stat().st_size > 5000
    return fig


def test_knockout_cli_gene_unit_tables_and_panels(tmp_path, ko_inputs):
    """--target-unit gene through the verb: one knockout per gene (its promoter cCREs together) + Group in
    every table; tss_ccres.tsv still marks each cCRE; fig5d / fig5e draw one column / bar per gene;
    --target-ccres with the gene unit stops with an error naming the setting."""
    import matplotlib.pyplot as plt

    root, _, ckpt = ko_inputs
    tss = tmp_path / "tss2.bed"
    tss.write_text("chr1\t51200\t51201\tGENEB\t.\t+\nchr1\t21200\t21201\tGENEA\t.\t+\n")
    out = tmp_path / "ko"
    rc = main(["knockout", "--checkpoint", str(ckpt), "--corpus", str(root), "--genes", "GENEB:1200,GENEA:1200",
               "--tss", str(tss), "--promoter-downstream", "0", "--target-unit", "gene", "--group", "--n-reference", "120",
               "--n-query", "8", "--n-random", "4", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    tab = pd.read_csv(out / "knockout.tsv", sep="\t")
    # 1,200 bp upstream, no downstream: GENEB holds cCREs 40, 41; GENEA 10, 11
    assert tab["knockout"].tolist() == ["GENEB", "GENEA", "Group"] and tab["gene"].tolist() == tab["knockout"].tolist()
    assert tab["ccres"].tolist() == ["40,41", "10,11", "10,11,40,41"] and tab["n_ccres"].tolist() == [2, 2, 4]
    assert (tab["ccre"] == -1).all() and tab["p_value"].between(0, 1).all()
    assert tab[["start", "end"]].iloc[:2].to_numpy().tolist() == [[50000, 51500], [20000, 21500]]  # their span
    assert "50000\t51500" in (out / "knockout.tsv").read_text()  # positions stay integers beside the Group
    assert np.isfinite(tab["random_mean_effect"]).all()
    assert {"knockout", "gene", "chrom", "start", "end", "ccre", "ccres", "n_ccres", "mean_effect", "sd_effect",
            "score_added", "score_removed", "random_mean_effect", "t", "p_value"} == set(tab.columns)
    rand = pd.read_csv(out / "random.tsv", sep="\t")
    assert list(rand.columns) == ["ccre", "ccres", "n_ccres", "mean_effect"]
    assert rand["n_ccres"].value_counts().sort_index().to_dict() == {1: 4, 2: 4, 4: 4}
    for m in (2, 4):
        assert np.isclose(tab.loc[tab["n_ccres"] == m, "random_mean_effect"].iloc[0],
                          rand.loc[rand["n_ccres"] == m, "mean_effect"].mean())
    m = pd.read_csv(out / "metrics.tsv", sep="\t").set_index("metric")["value"]
    assert {"mean_effect[GENEB]", "mean_effect[GENEA]", "mean_effect[Group]", "p_value[GENEA]"} <= set(m.index)
    assert m["n_targets"] == 3 and m["n_random"] == 4
    sh = pd.read_csv(out / "shifts.tsv", sep="\t")
    assert sh["knockout"].unique().tolist() == ["GENEB", "GENEA", "Group"] and len(sh) == 3 * 8
    assert sh.groupby("knockout", sort=False)["n_ccres"].first().tolist() == [2, 2, 4]
    means = sh.groupby("knockout", sort=False)[["score_added", "score_removed"]].mean()
    assert np.allclose(means.to_numpy(), tab[["score_added", "score_removed"]].to_numpy())
    near = pd.read_csv(out / "tss_ccres.tsv", sep="\t")
    assert sorted(near.loc[near["target"], "ccre"]) == [10, 11, 40, 41]  # still one row per cCRE
    assert (out / "knockout_effects.png").stat().st_size > 0
    # the paper panels draw from these per-gene tables: one fig5d column and one fig5e bar per gene + Group
    fig = _draw("fig5d", out, ["reference_cells.tsv", "shifts.tsv"])
    titles = [a.get_title() for a in fig.axes if a.get_title()]
    assert titles == ["pair: GENEB (2 cCREs) knocked out", "pair: GENEA (2 cCREs) knocked out",
                      "pair: Group (4 cCREs) knocked out"]
    plt.close(fig)
    fig = _draw("fig5e", out, ["knockout.tsv"], out / "metrics.tsv")
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert [t.split("\n")[0] for t in ticks] == ["GENEB (2 cCREs)", "GENEA (2 cCREs)", "Group (4 cCREs)"]
    assert "random knockouts of as many cCREs (mean)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    plt.close(fig)
    fig = _draw("fig5e_random", out, ["random.tsv"], out / "metrics.tsv")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["random knockouts of 1 cCRE", "random knockouts of 2 cCREs", "random knockouts of 4 cCREs",
                      "targets"]
    lines = sorted(ln.get_xdata()[0] for ln in fig.axes[0].get_lines())
    assert np.allclose(lines, sorted(tab["mean_effect"]))  # one line per gene + Group
    plt.close(fig)
    # the gene unit with cCRE indices
    assert main(["knockout", "--checkpoint", str(ckpt), "--corpus", str(root), "--target-ccres", "40,10",
                 "--target-unit", "gene", "--device", "cpu", "--out", str(tmp_path / "bad")]) == 2


def test_fine_tuning_lengths_default_to_the_papers():
    """Every fine-tuning trains on the paper's sentence length by default (the model's rank limit - 2:
    8,190 tokens, longer sentences subsampled each step); a shorter cap is an option."""
    import inspect

    from epiflow.tasks.config import AnnotatorConfig, IntegrationConfig, KnockoutConfig
    from epiflow.tasks.integration import finetune_reconstruction
    from epiflow.train.engine import max_input_len

    assert IntegrationConfig().max_len is None and AnnotatorConfig().max_len is None
    assert KnockoutConfig().max_len is None
    assert inspect.signature(finetune_reconstruction).parameters["max_len"].default is None
    paper = type("M", (), {"config": type("C", (), {"max_rank": 8192})()})()
    assert max_input_len(paper, None) == 8190 and max_input_len(paper, 2048) == 2048


def test_knockout_passes_its_max_len_to_the_fine_tuning(monkeypatch, ko_inputs):
    import epiflow.tasks.knockout as ko
    from epiflow.tasks.common import load_cells, load_model
    from epiflow.tasks.config import KnockoutConfig

    seen = {}

    def fake(model, cells, **kw):
        seen.update(kw)
        raise RuntimeError("stop")

    import epiflow.tasks.integration as integ

    monkeypatch.setattr(integ, "finetune_reconstruction", fake)  # knockout imports it at call time
    root, _, ckpt = ko_inputs
    cells = load_cells(root)
    cfg = KnockoutConfig(target_ccres=[40, 10], max_steps=2, max_len=300, figures=False, progress=False, device="cpu")
    with pytest.raises(RuntimeError, match="stop"):
        ko.run(cells, load_model(ckpt, n_ccres=cells.n_ccres), cfg, ko.knockout_targets(cfg))
    assert seen["max_len"] == 300
