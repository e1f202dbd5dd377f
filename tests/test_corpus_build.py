import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from epiflow.cli import main as cli_main
from epiflow.corpus.build import build_corpus
from epiflow.corpus.mapping import write_mapped
from epiflow.corpus.shard import open_corpus, shard_from_counts, vocab_id_from_intervals
from epiflow.errors import ConfigError, VocabularyMismatchError
from epiflow.tokenize import NUM_SPECIAL


def _cands(n=120):
    return pd.DataFrame({"chrom": np.repeat(["chr1", "chr2"], n // 2),
                         "start": np.tile(np.arange(n // 2) * 1000, 2),
                         "end": np.tile(np.arange(n // 2) * 1000 + 500, 2)})


def _mapped(tmp_path, name, cand, n_cells, density, seed, extra_obs=None):
    rng = np.random.default_rng(seed)
    X = sp.random(n_cells, len(cand), density=density, random_state=rng, format="csr",
                  data_rvs=lambda k: rng.integers(1, 5, k)).astype(np.float32)
    bc = [f"b{i}" for i in range(n_cells)]
    obs = pd.DataFrame({"cell_id": [f"{name}:{b}" for b in bc], "barcode": bc, "dataset": name,
                        "tissue": "t", "batch": name, "cell_type": rng.choice(["A", "B"], n_cells)})
    if extra_obs:
        for k, v in extra_obs.items():
            obs[k] = v
    obs.index = obs["cell_id"].to_numpy()
    var = cand.copy()
    var.index = [f"{c}:{s}-{e}" for c, s, e in zip(cand.chrom, cand.start, cand.end)]
    a = ad.AnnData(X=X, obs=obs, var=var)
    rep = {"dataset": name, "ccres_id": vocab_id_from_intervals(cand.chrom, cand.start, cand.end),
           "lifted": False}
    a.uns["epiflow_mapping"] = json.dumps(rep)
    p = tmp_path / f"{name}.h5ad"
    write_mapped(a, p, rep, tmp_path / f"{name}.json")
    return p, X, obs


def _concat_shards(corpus):
    shards = list(corpus.iter_shards())
    tokens = np.concatenate([s.tokens for s in shards])
    lens = np.concatenate([s.lengths for s in shards])
    obs = pd.concat([s.obs for s in shards], ignore_index=True)
    counts = np.concatenate([s.counts for s in shards])
    tfidf = np.concatenate([s.tfidf for s in shards])
    return shards, tokens, lens, obs, counts, tfidf


def test_build_matches_reference(tmp_path):
    cand = _cands()
    p1, X1, o1 = _mapped(tmp_path, "d1", cand, 23, 0.08, 0, extra_obs={"donor": "x"})
    p2, X2, o2 = _mapped(tmp_path, "d2", cand, 17, 0.05, 1, extra_obs={"score": 1.5})
    out = tmp_path / "corpus"
    corpus = build_corpus(cand, [p1, p2], out, genome="hg38", min_cells=3, min_ccres_per_cell=5,
                          shard_size=7, block_size=4)
    # independent reference on the whole matrix in memory
    X = sp.vstack([X1, X2], format="csr")
    obs = pd.concat([o1, o2], ignore_index=True)
    nnz = np.diff(X.indptr)
    k1 = nnz >= 5
    cells_open = np.asarray((X[k1] > 0).sum(axis=0)).ravel()
    keep = np.flatnonzero(cells_open >= 3)
    Xv = X[:, keep]
    k2 = k1 & (np.diff(Xv.indptr) >= 5)
    Xk = Xv[np.flatnonzero(k2)]
    df = np.asarray((Xk > 0).sum(axis=0)).ravel() / Xk.shape[0]
    ref = shard_from_counts(Xk, df, obs.iloc[np.flatnonzero(k2)])

    assert corpus.n_cells == int(k2.sum()) and corpus.n_ccres == len(keep)
    np.testing.assert_array_equal(corpus.df(), df)
    v = corpus.vocab()
    assert v["start"].tolist() == cand["start"].to_numpy()[keep].tolist()
    assert corpus.vocab_id == vocab_id_from_intervals(v.chrom, v.start, v.end)
    shards, tokens, lens, sobs, counts, tfidf = _concat_shards(corpus)
    assert [s.n_cells for s in shards] == [7] * (corpus.n_cells // 7) + ([corpus.n_cells % 7] if corpus.n_cells % 7 else [])
    assert corpus.meta["shard_cells"] == [s.n_cells for s in shards]
    np.testing.assert_array_equal(tokens, ref.tokens)
    np.testing.assert_array_equal(lens, ref.lengths)
    np.testing.assert_array_equal(counts, ref.counts)
    np.testing.assert_array_equal(tfidf, ref.tfidf)
    assert sobs["cell_id"].tolist() == obs["cell_id"].to_numpy()[k2].tolist()
    assert set(["cell_id", "dataset", "tissue", "batch", "cell_type", "donor", "score"]) <= set(sobs.columns)
    assert sobs.loc[sobs.dataset == "d2", "donor"].eq("").all()
    assert sobs.loc[sobs.dataset == "d2", "score"].eq(1.5).all()
    qc = pd.read_csv(out / "qc.tsv", sep="\t")
    assert qc["cells_in"].tolist() == [23, 17]
    assert qc["cells_kept"].sum() == corpus.n_cells
    assert (qc["cells_kept"] + qc["cells_dropped"]).tolist() == [23, 17]
    assert qc["cells_dropped_candidates"].sum() == int((~k1).sum())
    st = pd.read_csv(out / "vocab_stats.tsv", sep="\t")
    assert st["cells_open"].tolist() == cells_open.tolist() and st["kept"].sum() == len(keep)
    # every sentence is a permutation of the cell's accessible cCREs and at least min_ccres long
    assert lens.min() >= 5 and tokens.min() >= NUM_SPECIAL
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folders left


def test_block_size_and_shard_size_do_not_change_sentences(tmp_path):
    cand = _cands()
    ps = [_mapped(tmp_path, f"d{i}", cand, 9, 0.1, i)[0] for i in range(3)]
    a = build_corpus(cand, ps, tmp_path / "a", min_cells=2, min_ccres_per_cell=3, shard_size=4, block_size=1)
    b = build_corpus(cand, ps, tmp_path / "b", min_cells=2, min_ccres_per_cell=3, shard_size=1000)
    _, ta, la, oa, _, _ = _concat_shards(a)
    _, tb, lb, ob, _, _ = _concat_shards(b)
    np.testing.assert_array_equal(ta, tb)
    np.testing.assert_array_equal(la, lb)
    assert len(a.shard_paths) == -(-a.n_cells // 4) and len(b.shard_paths) == 1


def test_external_vocabulary_keeps_order_and_df(tmp_path):
    cand = _cands().iloc[::-1].reset_index(drop=True)  # deliberately not sorted: file order = token order
    p, X, _ = _mapped(tmp_path, "d", cand, 20, 0.1, 3)
    ext_df = np.full(len(cand), 0.25)
    np.save(tmp_path / "df.npy", ext_df)
    c = build_corpus(cand, [p], tmp_path / "c", vocabulary="external", external_df=tmp_path / "df.npy",
                     min_cells=10 ** 6, min_ccres_per_cell=1)
    assert c.n_ccres == len(cand)
    pd.testing.assert_frame_equal(c.vocab(), cand[["chrom", "start", "end"]])
    np.testing.assert_array_equal(c.df(), ext_df)
    s = next(c.iter_shards())
    ref = shard_from_counts(X[np.flatnonzero(np.diff(X.indptr) >= 1)], ext_df, s.obs)
    np.testing.assert_array_equal(s.tokens, ref.tokens)
    with pytest.raises(VocabularyMismatchError, match="df.npy.*has 3 values"):
        np.save(tmp_path / "df.npy", np.ones(3))
        build_corpus(cand, [p], tmp_path / "c2", vocabulary="external", external_df=tmp_path / "df.npy",
                     min_ccres_per_cell=1)
    assert not (tmp_path / "c2").exists()


def test_failures_leave_no_partial_output(tmp_path):
    cand = _cands()
    good, _, _ = _mapped(tmp_path, "g", cand, 10, 0.1, 0)
    other, _, _ = _mapped(tmp_path, "o", _cands(60), 10, 0.1, 1)
    out = tmp_path / "corpus"
    with pytest.raises(VocabularyMismatchError, match=r"o.h5ad.*has 60 cCREs but the candidate set has 120"):
        build_corpus(cand, [good, other], out, min_cells=1, min_ccres_per_cell=1)
    assert not out.exists()
    with pytest.raises(ConfigError, match="vocabulary is empty"):
        build_corpus(cand, [good], out, min_cells=10 ** 6, min_ccres_per_cell=1)
    with pytest.raises(ConfigError, match="corpus is empty"):
        build_corpus(cand, [good], out, min_cells=0, min_ccres_per_cell=10 ** 6)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".corpus")]
    # a failed rebuild keeps the previous corpus
    build_corpus(cand, [good], out, min_cells=1, min_ccres_per_cell=1)
    before = (out / "corpus.json").read_text()
    with pytest.raises(VocabularyMismatchError):
        build_corpus(cand, [good, other], out, min_cells=1, min_ccres_per_cell=1)
    assert (out / "corpus.json").read_text() == before


def test_out_that_is_a_file_is_refused_and_a_corpus_folder_is_replaced(tmp_path, monkeypatch):
    """An existing file as the output (even the corpus' own input) is refused before any work, never
    replaced (it was, leaving the file as a hidden '.NAME.XXXX.old'); an existing corpus folder is
    replaced; no '.old' is left in either case."""
    import epiflow.corpus.build as B
    from epiflow.corpus.build import tokenize_downstream

    cand = _cands()
    good, _, _ = _mapped(tmp_path, "g", cand, 10, 0.1, 0)
    before = good.read_bytes()
    read = []
    monkeypatch.setattr(B, "_read_candidates", lambda c: read.append(c) or cand)  # no work may start
    with pytest.raises(ConfigError, match=r"g.h5ad, field 'out': exists as a file, but the corpus output must be "
                                          r"a folder.*Fix:"):
        build_corpus(cand, [good], good, min_cells=1, min_ccres_per_cell=1)
    with pytest.raises(ConfigError, match=r"g.h5ad, field 'out': exists as a file"):
        tokenize_downstream(cand, [good], good, vocab=cand, df=np.ones(len(cand)), min_ccres_per_cell=1)
    assert read == [] and good.read_bytes() == before
    monkeypatch.undo()
    out = tmp_path / "corpus"
    build_corpus(cand, [good], out, min_cells=1, min_ccres_per_cell=1)
    (out / "stale.txt").write_text("x")
    c = build_corpus(cand, [good], out, min_cells=2, min_ccres_per_cell=1)
    assert c.meta["params"]["min_cells"] == 2 and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_corpus_folder_gets_the_mode_of_a_plain_mkdir(tmp_path, umask):
    """Not mkdtemp's 0700: the corpus folder is built under a temporary name, then renamed."""
    import os

    cand = _cands()
    good, _, _ = _mapped(tmp_path, "g", cand, 10, 0.1, 0)
    old = os.umask(umask)
    try:
        build_corpus(cand, [good], tmp_path / "corpus", min_cells=1, min_ccres_per_cell=1)
    finally:
        os.umask(old)
    for d in (tmp_path / "corpus", tmp_path / "corpus" / "shards"):
        assert d.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "corpus" / "corpus.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_replace_dir_failing_keeps_the_former_folder(tmp_path, monkeypatch):
    import os

    import epiflow.corpus.build as B

    out, new = tmp_path / "corpus", tmp_path / ".corpus.x.tmp"
    out.mkdir()
    (out / "corpus.json").write_text("old")
    new.mkdir()
    real, calls = os.replace, []

    def replace(a, b):
        calls.append(b)
        if len(calls) == 2:  # the new folder onto the output
            raise OSError(28, "No space left on device")
        real(a, b)

    monkeypatch.setattr(B.os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        B._replace_dir(new, out, True)
    monkeypatch.undo()
    assert (out / "corpus.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".corpus.x.tmp", "corpus"]  # no '.old'
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="exists as a file"):
        B._replace_dir(new, f, True)
    assert f.read_text() == "x" and not [p for p in tmp_path.iterdir() if p.name.endswith(".old")]


def test_cell_filter_removing_every_cell_names_min_ccres_per_cell(tmp_path):
    """With min_cells > 0 too, the error blames the filter that emptied the corpus (issue: it said min_cells)."""
    cand = _cands()
    good, _, _ = _mapped(tmp_path, "g", cand, 10, 0.1, 0)
    with pytest.raises(ConfigError) as ei:
        build_corpus(cand, [good], tmp_path / "corpus", min_cells=2, min_ccres_per_cell=10 ** 6)
    msg = str(ei.value)
    assert "field 'min_ccres_per_cell'" in msg and "--min-ccres-per-cell" in msg and "min_cells" not in msg, msg
    assert not (tmp_path / "corpus").exists()


def test_mapped_on_other_candidates_is_rejected(tmp_path):
    cand = _cands()
    p, _, _ = _mapped(tmp_path, "d", cand, 10, 0.1, 0)
    moved = cand.copy()
    moved["end"] += 1
    with pytest.raises(VocabularyMismatchError, match="mapped onto candidate set"):
        build_corpus(moved, [p], tmp_path / "c", min_cells=1, min_ccres_per_cell=1)


def test_model_vocabulary_check(tmp_path):
    cand = _cands()
    p, _, _ = _mapped(tmp_path, "d", cand, 10, 0.2, 0)
    c = build_corpus(cand, [p], tmp_path / "c", min_cells=1, min_ccres_per_cell=1)
    c.check_model_vocab(c.n_ccres, vocab_id=c.vocab_id)
    c = open_corpus(tmp_path / "c")
    with pytest.raises(VocabularyMismatchError, match=f"has {c.n_ccres + 1} cCREs"):
        c.check_model_vocab(c.n_ccres + 1)
    with pytest.raises(VocabularyMismatchError, match="field .vocab_id.*same number of cCREs is not the same"):
        c.check_model_vocab(c.n_ccres, vocab_id="0123456789abcdef")


def test_cli_round_trip(tmp_path):
    """candidate-ccres -> map-dataset (h5ad + fragments) -> build-corpus through the CLI."""
    peaks = _cands(40)
    X = sp.csr_matrix(np.random.default_rng(0).integers(0, 3, (12, 40)).astype(np.int32))
    a = ad.AnnData(X=X, obs=pd.DataFrame({"ct": ["u"] * 12}, index=[f"c{i}" for i in range(12)]),
                   var=pd.DataFrame(index=[f"{c}:{s}-{e}" for c, s, e in zip(peaks.chrom, peaks.start, peaks.end)]))
    a.write_h5ad(tmp_path / "m.h5ad")
    rows = [f"chr1\t{s + 10}\t{s + 60}\tBC{i % 5}\t1" for i, s in enumerate(range(0, 20000, 400))]
    (tmp_path / "f.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "manifest.tsv").write_text(
        "name\tformat\tpath\tgenome\ttissue\tcell_type_key\n"
        "mat\th5ad\tm.h5ad\thg38\tbm\tct\nfr\tfragments\tf.tsv\thg38\tbm\t\n")
    cand = tmp_path / "cand.bed"
    assert cli_main(["candidate-ccres", "--manifest", str(tmp_path / "manifest.tsv"), "--genome", "hg38",
                     "--out", str(cand)]) == 0
    assert json.loads((tmp_path / "cand.bed.json").read_text())["n_candidates"] == 40
    for ds in ("mat", "fr"):
        assert cli_main(["map-dataset", "--manifest", str(tmp_path / "manifest.tsv"), "--dataset", ds,
                         "--ccres", str(cand), "--genome", "hg38", "--out", str(tmp_path / f"mapped/{ds}.h5ad")]) == 0
    assert json.loads((tmp_path / "mapped/fr.json").read_text())["n_cells"] == 5
    assert cli_main(["build-corpus", "--ccres", str(cand), "--mapped", str(tmp_path / "mapped/mat.h5ad"),
                     str(tmp_path / "mapped/fr.h5ad"), "--min-cells-per-ccre", "1", "--min-ccres-per-cell", "2",
                     "--shard-size", "5", "--out", str(tmp_path / "corpus")]) == 0
    c = open_corpus(tmp_path / "corpus")
    expect = sum(int((np.diff(ad.read_h5ad(tmp_path / f"mapped/{d}.h5ad").X.indptr) >= 2).sum())
                 for d in ("mat", "fr"))
    assert c.meta["genome"] == "hg38" and c.n_cells == expect and expect > 12
    assert sorted(set(pd.concat([s.obs for s in c.iter_shards()])["cell_type"])) == ["u", "unknown"]
    # user errors exit with 2 and write nothing
    assert cli_main(["map-dataset", "--manifest", str(tmp_path / "manifest.tsv"), "--dataset", "nope",
                     "--ccres", str(cand), "--genome", "hg38", "--out", str(tmp_path / "x.h5ad")]) == 2
    assert not (tmp_path / "x.h5ad").exists()


def test_shard_is_the_one_cell_container(tmp_path):
    """Shard.from_any reads a corpus folder, a shard file, an AnnData / .h5ad and lists of those;
    concat, subset, binary and sentences agree with the stored cells."""
    from epiflow.corpus.shard import Shard
    from epiflow.errors import InputFormatError
    from epiflow.train.toy import write_toy_corpus

    corpus = write_toy_corpus(tmp_path / "c", n_cells=30, n_ccres=40, n_types=2, seed=1, shard_size=12)
    c = open_corpus(corpus)
    whole = Shard.from_any(corpus)
    assert whole.n_cells == 30 and whole.n_ccres == 40
    parts = [Shard.from_any(p) for p in c.shard_paths]
    assert [p.n_cells for p in parts] == [12, 12, 6]
    again = Shard.from_any(list(c.shard_paths))
    np.testing.assert_array_equal(again.tokens, whole.tokens)
    np.testing.assert_array_equal(Shard.concat(parts).indptr, whole.indptr)
    sub = whole.subset([3, 20])
    ptr, tok = whole.sentences([3, 20])
    np.testing.assert_array_equal(tok, sub.tokens)
    np.testing.assert_array_equal(ptr, sub.indptr)
    b = whole.binary()
    assert (b != (whole.counts_csr() > 0).astype(np.float32)).nnz == 0
    # an AnnData of counts, tokenized with the corpus df: the same sentences
    a = whole.to_anndata()
    a.var["df"] = c.df()
    from_ad = Shard.from_any(a)
    np.testing.assert_array_equal(from_ad.tokens, whole.tokens)
    a.write_h5ad(tmp_path / "cells.h5ad")
    np.testing.assert_array_equal(Shard.from_any(tmp_path / "cells.h5ad").indptr, whole.indptr)
    with pytest.raises(InputFormatError, match="number of cCREs"):
        Shard.concat([whole, Shard.from_any(a[:, :20].copy())])
    with pytest.raises(InputFormatError, match="no cells"):
        Shard.concat([])


def test_a_subset_written_back_keeps_its_own_cell_count(tmp_path):
    """read_shard keeps the file's attributes; writing a subset back must not carry the file's n_cells."""
    import h5py

    from epiflow.corpus.shard import read_shard, write_shard

    cand = _cands()
    good, _, _ = _mapped(tmp_path, "g", cand, 10, 0.1, 0)
    c = build_corpus(cand, [good], tmp_path / "corpus", min_cells=1, min_ccres_per_cell=1)
    sh = read_shard(c.shard_paths[0])
    sub = sh.subset([0, 2])
    write_shard(tmp_path / "sub.h5", sub)
    with h5py.File(tmp_path / "sub.h5") as f:
        assert int(f.attrs["n_cells"]) == 2 and f.attrs["vocab_id"] == sh.vocab_id
    assert read_shard(tmp_path / "sub.h5").n_cells == 2
