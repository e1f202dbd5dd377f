"""Corpus vs downstream datasets (issue 15): the manifest `role` and `split` fields, the corpus
built from corpus datasets only, downstream datasets tokenized onto the corpus vocabulary with the
corpus df, and the summary's seen_in_pretraining column."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from epiflow.corpus.build import build_corpus, candidate_set, tokenize_downstream
from epiflow.corpus.manifest import load_manifest, split_mask
from epiflow.corpus.mapping import map_dataset, write_mapped
from epiflow.corpus.shard import open_corpus
from epiflow.errors import ConfigError
from epiflow.report import summarize

HEADER = "name\tformat\tpath\tgenome\trole\tsplit\n"


# ------------------------------------------------------------------ manifest fields
def test_role_defaults_to_corpus_and_is_validated(tmp_path):
    m = tmp_path / "m.tsv"
    m.write_text(HEADER + "a\th5ad\ta.h5ad\thg38\t\t\nb\th5ad\tb.h5ad\thg38\tdownstream\t\n")
    a, b = load_manifest(m)
    assert (a.role, b.role) == ("corpus", "downstream") and b.is_downstream and not a.is_downstream
    assert "role" not in a.extra
    m.write_text(HEADER + "a\th5ad\ta.h5ad\thg38\tcorpus\t\nb\th5ad\tb.h5ad\thg38\tdownstrem\t\n")
    with pytest.raises(ConfigError) as err:
        load_manifest(m)
    msg = str(err.value)
    assert str(m) in msg and "line 3" in msg and "'role'" in msg and "downstrem" in msg and "downstream" in msg
    # a manifest without the column: every dataset is corpus
    m.write_text("name\tformat\tpath\tgenome\na\th5ad\ta.h5ad\thg38\n")
    assert load_manifest(m)[0].role == "corpus"


@pytest.mark.parametrize("value", ["heldout", "heldout:1.5", "test:0.25", "rest:0.2:x", "heldout:0.25:0:1"])
def test_bad_split_is_an_error_naming_line_and_field(tmp_path, value):
    m = tmp_path / "m.tsv"
    m.write_text(HEADER + f"a\th5ad\ta.h5ad\thg38\tcorpus\t{value}\n")
    with pytest.raises(ConfigError) as err:
        load_manifest(m)
    assert "line 2" in str(err.value) and "'split'" in str(err.value)


def test_two_parts_of_one_file_must_share_fraction_and_seed(tmp_path):
    m = tmp_path / "m.tsv"
    m.write_text(HEADER + "a\th5ad\tx.h5ad\thg38\tcorpus\trest:0.25:0\n"
                          "b\th5ad\tx.h5ad\thg38\tdownstream\theldout:0.25:1\n")
    with pytest.raises(ConfigError, match="could overlap"):
        load_manifest(m)
    m.write_text(HEADER + "a\th5ad\tx.h5ad\thg38\tcorpus\theldout:0.25:0\n"
                          "b\th5ad\tx.h5ad\thg38\tdownstream\theldout:0.25:0\n")
    with pytest.raises(ConfigError, match="same cells"):
        load_manifest(m)
    m.write_text(HEADER + "a\th5ad\tx.h5ad\thg38\tcorpus\trest:0.25:3\n"
                          "b\th5ad\tx.h5ad\thg38\tdownstream\theldout:0.25:3\n")
    a, b = load_manifest(m)
    assert a.split_spec() == ("rest", 0.25, 3) and b.split_spec() == ("heldout", 0.25, 3)


@pytest.mark.parametrize("rows, match", [
    # the whole file in the corpus and again as downstream: the downstream cells would be pretrained on
    (["a\th5ad\tx.h5ad\thg38\tcorpus\t", "b\th5ad\tx.h5ad\thg38\tdownstream\t"], "seen in pretraining"),
    # the whole file in the corpus, a held-out part of it as downstream
    (["a\th5ad\tx.h5ad\thg38\tcorpus\t", "b\th5ad\tx.h5ad\thg38\tdownstream\theldout:0.25:0"],
     "seen in pretraining"),
    # a part in the corpus, the whole file as downstream (the corpus cells evaluated as unseen)
    (["a\th5ad\tx.h5ad\thg38\tcorpus\trest:0.25:0", "b\th5ad\tx.h5ad\thg38\tdownstream\t"],
     "seen in pretraining"),
    # the same file under another spelling of its path
    (["a\th5ad\tx.h5ad\thg38\tcorpus\t", "b\th5ad\tsub/../x.h5ad\thg38\tdownstream\t"],
     "seen in pretraining"),
    # the whole file twice in the corpus
    (["a\th5ad\tx.h5ad\thg38\tcorpus\t", "b\th5ad\tx.h5ad\thg38\t\trest:0.3:0"], "same cells twice"),
])
def test_one_file_in_both_roles_is_refused(tmp_path, rows, match):
    """Evaluation on cells the model never saw: a manifest that lists one file for pretraining and for
    evaluation without complementary parts is an error naming both entries, the line and the fix."""
    m = tmp_path / "m.tsv"
    m.write_text(HEADER + "\n".join(rows) + "\n")
    with pytest.raises(ConfigError, match=match) as err:
        load_manifest(m)
    msg = str(err.value)
    assert str(m) in msg and "line 3" in msg and "'a'" in msg and "'b'" in msg
    assert "heldout:F:S" in msg


def test_one_file_is_recognised_by_url_and_checksum(tmp_path):
    sha = "ab" * 32
    m = tmp_path / "m.tsv"
    m.write_text("name\tformat\tpath\turl\tsha256\tgenome\trole\n"
                 f"a\th5ad\t\thttps://x.org/d.h5ad\t\thg38\tcorpus\n"
                 f"b\th5ad\tlocal/d.h5ad\thttps://x.org/d.h5ad\t{sha}\thg38\tdownstream\n")
    with pytest.raises(ConfigError, match="seen in pretraining"):
        load_manifest(m)
    m.write_text("name\tformat\tpath\tsha256\tgenome\trole\n"
                 f"a\th5ad\tone.h5ad\t{sha}\thg38\tcorpus\n"
                 f"b\th5ad\tcopy.h5ad\t{sha.upper()}\thg38\tdownstream\n")
    with pytest.raises(ConfigError, match="seen in pretraining"):
        load_manifest(m)


def test_shared_files_that_keep_the_roles_apart_are_accepted(tmp_path):
    m = tmp_path / "m.tsv"
    # two downstream entries of one whole file (e.g. two label columns), and complementary parts
    m.write_text(HEADER + "a\th5ad\tx.h5ad\thg38\tdownstream\t\n"
                          "b\th5ad\tx.h5ad\thg38\tdownstream\t\n"
                          "c\th5ad\ty.h5ad\thg38\tcorpus\trest:0.2:1\n"
                          "d\th5ad\ty.h5ad\thg38\tdownstream\theldout:0.2:1\n")
    assert [e.name for e in load_manifest(m)] == ["a", "b", "c", "d"]


def test_split_mask_is_stratified_complementary_and_reproducible():
    labels = np.repeat(["A", "B", "C", "D"], [400, 120, 41, 3])
    rng = np.random.default_rng(5)
    labels = labels[rng.permutation(len(labels))]
    held = split_mask(labels, "heldout", 0.25, seed=0)
    rest = split_mask(labels, "rest", 0.25, seed=0)
    assert not (held & rest).any() and (held | rest).all()
    for lab, n in {"A": 400, "B": 120, "C": 41, "D": 3}.items():
        assert held[labels == lab].sum() == round(0.25 * n)
    assert np.array_equal(held, split_mask(labels, "heldout", 0.25, seed=0))
    assert not np.array_equal(held, split_mask(labels, "heldout", 0.25, seed=1))


# ------------------------------------------------------------------ corpus and downstream folders
@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    """The test simulation with pbmc_fragments declared downstream and atlas_b1 split in two."""
    from epiflow.simulate import simulate_corpus

    root = tmp_path_factory.mktemp("roles")
    sim = simulate_corpus(root / "sim", "test", seed=0, downstream=["pbmc_fragments"])
    man = pd.read_csv(sim["manifest"], sep="\t", dtype=str, keep_default_na=False)
    assert dict(zip(man["name"], man["role"]))["pbmc_fragments"] == "downstream"
    assert set(man.loc[man["name"] != "pbmc_fragments", "role"]) == {"corpus"}
    atlas = man[man["name"] == "atlas_b1"].iloc[0].to_dict()
    rows = [man[man["name"].isin(["atlas_b2", "pbmc_fragments"])],
            pd.DataFrame([{**atlas, "name": "b1_rest", "split": "rest:0.3:0"},
                          {**atlas, "name": "b1_held", "split": "heldout:0.3:0", "role": "downstream"}])]
    man = pd.concat(rows, ignore_index=True).fillna("")
    (root / "sim" / "m.tsv").write_text(man.to_csv(sep="\t", index=False))
    entries = load_manifest(root / "sim" / "m.tsv")
    cand, info = candidate_set(entries, "hg38", sources=[sim["ccre_sources"]])
    assert sorted(info["downstream_not_used"]) == ["b1_held", "pbmc_fragments"]
    assert not any("pbmc_fragments" in s["source"] for s in info["sources"])
    paths = {}
    for e in entries:
        a, rep = map_dataset(e, cand, "hg38")
        paths[e.name] = root / f"{e.name}.h5ad"
        write_mapped(a, paths[e.name], rep)
    return root, cand, paths


def test_downstream_peaks_are_no_candidates(mapped, tmp_path):
    root, cand, _ = mapped
    entries = load_manifest(root / "sim" / "m.tsv")
    for e in entries:  # the same manifest with every dataset in the corpus has more candidates
        e.role = "corpus"
    more, _ = candidate_set(entries, "hg38", sources=[root / "sim" / "ccre_sources.bed"])
    assert len(more) != len(cand)


def test_split_parts_are_disjoint_and_cover_the_file(mapped):
    import anndata as ad

    _, _, paths = mapped
    rest, held = ad.read_h5ad(paths["b1_rest"]), ad.read_h5ad(paths["b1_held"])
    assert not set(rest.obs["barcode"]) & set(held.obs["barcode"])
    n_file = json.loads(held.uns["epiflow_mapping"])["split"]["n_cells_file"]
    assert rest.n_obs + held.n_obs == n_file and abs(held.n_obs - 0.3 * n_file) <= 8


def test_corpus_refuses_downstream_and_downstream_uses_corpus_vocab_and_df(mapped, tmp_path):
    root, cand, paths = mapped
    with pytest.raises(ConfigError, match="downstream"):
        build_corpus(cand, [paths["atlas_b2"], paths["pbmc_fragments"]], tmp_path / "bad", min_cells=5,
                     min_ccres_per_cell=20)
    corpus = build_corpus(cand, [paths["atlas_b2"], paths["b1_rest"]], tmp_path / "corpus", genome="hg38",
                          min_cells=5, min_ccres_per_cell=20)
    ds = tokenize_downstream(cand, [paths["pbmc_fragments"]], tmp_path / "pbmc", corpus=tmp_path / "corpus",
                             min_ccres_per_cell=20)
    assert ds.meta["role"] == "downstream" and corpus.meta["role"] == "corpus"
    assert ds.vocab_id == corpus.vocab_id and ds.n_ccres == corpus.n_ccres
    assert np.array_equal(np.load(ds.root / "df.npy"), np.load(corpus.root / "df.npy"))
    assert (ds.root / "vocab.bed").read_text() == (corpus.root / "vocab.bed").read_text()
    assert ds.meta["datasets"] == ["pbmc_fragments"] and ds.n_cells > 0
    # no downstream cell is in the corpus shards
    corpus_ids = set(np.concatenate([s.obs["cell_id"].astype(str) for s in corpus.iter_shards()]))
    ds_ids = set(np.concatenate([s.obs["cell_id"].astype(str) for s in ds.iter_shards()]))
    assert corpus_ids and ds_ids and not corpus_ids & ds_ids
    # the same cells tokenized as downstream and inside the corpus give the same sentences (same df)
    again = tokenize_downstream(cand, [paths["atlas_b2"]], tmp_path / "again", corpus=tmp_path / "corpus",
                                min_ccres_per_cell=20)
    sh = next(again.iter_shards())
    inside = [s for s in corpus.iter_shards()][0]
    rows = np.flatnonzero(inside.obs["dataset"].astype(str).to_numpy() == "atlas_b2")
    sub = inside.subset(rows)
    assert sh.n_cells == sub.n_cells
    assert np.array_equal(sh.indptr, sub.indptr) and np.array_equal(sh.tokens, sub.tokens)
    assert np.allclose(sh.tfidf, sub.tfidf)


def test_tokenize_downstream_cli_with_external_vocabulary(mapped, tmp_path):
    """Without a corpus: the vocabulary is the candidate set (an external vocabulary) with its df."""
    from epiflow.cli import main

    root, cand, paths = mapped
    bed = tmp_path / "cand.bed"
    cand[["chrom", "start", "end"]].to_csv(bed, sep="\t", header=False, index=False)
    df = np.linspace(0.01, 0.5, len(cand))
    np.save(tmp_path / "df.npy", df)
    out = tmp_path / "ds"
    assert main(["tokenize-downstream", "--ccres", str(bed), "--mapped", str(paths["pbmc_fragments"]),
                 "--vocab", str(bed), "--df", str(tmp_path / "df.npy"), "--min-ccres-per-cell", "20",
                 "--out", str(out)]) == 0
    c = open_corpus(out)
    assert c.n_ccres == len(cand) and np.array_equal(np.load(out / "df.npy"), df)
    assert main(["tokenize-downstream", "--ccres", str(bed), "--mapped", str(paths["pbmc_fragments"]),
                 "--out", str(tmp_path / "none")]) == 2  # neither --corpus nor --vocab/--df


# ------------------------------------------------------------------ summary
def test_summary_says_whether_the_model_saw_the_cells(tmp_path):
    for name, role, datasets in [("corpus", "corpus", ["atlas_b1", "atlas_b2"]),
                                 ("pbmc", "downstream", ["pbmc"])]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "corpus.json").write_text(json.dumps({"n_cells": 10, "datasets": datasets,
                                                                 "role": role}))
    m = tmp_path / "m.tsv"
    pd.DataFrame([("fe", "atlas_b1", "EpiAgent", "NMI", 0.5), ("fe", "pbmc", "EpiAgent", "NMI", 0.4),
                  ("fe", "all", "EpiAgent", "NMI", 0.4), ("integration", "atlas_b1,pbmc", "X", "NMI", 0.1),
                  ("fe", "other", "EpiAgent", "NMI", 0.3)],
                 columns=["task", "dataset", "method", "metric", "value"]).to_csv(m, sep="\t", index=False)
    t = summarize([m], corpus=tmp_path / "corpus", downstream=[tmp_path / "pbmc"], out=tmp_path / "s.tsv")
    seen = dict(zip(t.loc[t["task"] != "corpus", "dataset"], t.loc[t["task"] != "corpus", "seen_in_pretraining"]))
    assert seen == {"atlas_b1": "true", "pbmc": "false", "all": "true", "atlas_b1,pbmc": "partly",
                    "other": "unknown"}
    corpus_rows = t[t["task"] == "corpus"]
    assert set(corpus_rows["dataset"]) == {"all", "pbmc"}
    assert dict(zip(corpus_rows["dataset"], corpus_rows["seen_in_pretraining"])) == {"all": "true", "pbmc": "false"}
    back = pd.read_csv(tmp_path / "s.tsv", sep="\t")
    assert "seen_in_pretraining" in back.columns
    ext = summarize([m], corpus=tmp_path / "corpus", downstream=[tmp_path / "pbmc"], external_checkpoint=True)
    assert set(ext["seen_in_pretraining"]) == {"unknown"}
    only = summarize([m], corpus=tmp_path / "corpus", downstream=[tmp_path / "pbmc"], corpus_rows=False)
    assert "corpus" not in set(only["task"]) and len(only) == 5
