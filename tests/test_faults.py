"""Bad input and interrupted runs (issue 17): a clear error (or a warning with numbers) before any work
where possible, nothing half-written, no silent wrong output; pretraining that resumes after a kill,
inside the workflow too."""

from __future__ import annotations

import gzip
import logging
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from epiflow.cli import main
from epiflow.corpus.manifest import load_manifest
from epiflow.corpus.mapping import map_dataset
from epiflow.errors import ConfigError, GenomeBuildError, InputFormatError, VocabularyMismatchError
from epiflow.train.toy import write_toy_corpus

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = [str(BIN / "snakemake")] if (BIN / "snakemake").exists() else [sys.executable, "-m", "snakemake"]


def _manifest(tmp_path, rows, head="name\tformat\tpath\tgenome\ttissue\tlabels\tbarcodes\n"):
    m = tmp_path / "manifest.tsv"
    m.write_text(head + "".join("\t".join(r) + "\n" for r in rows))
    return m


def _fragments(tmp_path):
    cc = tmp_path / "cc.bed"
    cc.write_text("chr1\t100\t200\nchr1\t300\t400\n")
    (tmp_path / "f.tsv").write_text("chr1\t110\t120\tA-1\t1\nchr1\t310\t320\tB-1\t1\nchr1\t150\t350\tC-1\t1\n")
    return cc


# ------------------------------------------------------------------------- silent wrong output

def test_whitelist_matching_no_barcode_is_an_error_and_writes_nothing(tmp_path, capsys):
    cc = _fragments(tmp_path)
    (tmp_path / "wl.txt").write_text("A\nB\n")  # the file's barcodes carry a '-1' suffix
    m = _manifest(tmp_path, [["ds", "fragments", "f.tsv", "hg19", "x", "", "wl.txt"]])
    out = tmp_path / "out" / "ds.h5ad"
    rc = main(["map-dataset", "--manifest", str(m), "--dataset", "ds", "--ccres", str(cc), "--genome", "hg19",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "none of the 2 whitelist barcodes" in err and "'A'" in err and "'A-1'" in err and "Fix:" in err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_whitelist_matching_nothing_stops_early_in_a_long_file(tmp_path, monkeypatch):
    import epiflow.corpus.mapping as M

    rng = np.random.default_rng(3)
    s = np.sort(rng.integers(0, 10 ** 7, 5000))
    pd.DataFrame({"c": "chr1", "s": s, "e": s + 100, "b": "A-1", "n": 1}).to_csv(
        tmp_path / "f.tsv", sep="\t", header=False, index=False)
    (tmp_path / "wl.txt").write_text("A\n")
    (e,) = load_manifest(_manifest(tmp_path, [["ds", "fragments", "f.tsv", "hg19", "x", "", "wl.txt"]]))
    monkeypatch.setattr(M, "WHITELIST_EARLY_LINES", 1000)
    with pytest.raises(InputFormatError,
                       match=r"none of the 1 whitelist barcodes occurs in the first [\d,]+ lines") as exc:
        map_dataset(e, pd.DataFrame({"chrom": ["chr1"], "start": [0], "end": [10 ** 7]}), "hg19", chunksize=500)
    n = int(str(exc.value).split("the first ")[1].split(" lines")[0].replace(",", ""))
    assert 1000 <= n < 5000  # stopped before reading the whole file


def test_whitelist_partial_match_warns_with_numbers(tmp_path, caplog):
    _fragments(tmp_path)
    (tmp_path / "wl.txt").write_text("A-1\nX\nY\nZ\n")
    (e,) = load_manifest(_manifest(tmp_path, [["ds", "fragments", "f.tsv", "hg19", "x", "", "wl.txt"]]))
    cc = pd.DataFrame({"chrom": ["chr1"], "start": [100], "end": [200]})
    with caplog.at_level(logging.WARNING):
        a, rep = map_dataset(e, cc, "hg19", min_frac_in_ccres=0)
    assert rep["whitelist_barcodes_found"] == 1 and rep["whitelist_barcodes"] == 4
    assert "only 1 of 4 whitelist barcodes (25.0 %)" in caplog.text


def test_label_table_matching_no_barcode_is_an_error(tmp_path):
    _fragments(tmp_path)
    (tmp_path / "lab.tsv").write_text("barcode\tcell_type\nA\tT\nB\tB\n")
    (e,) = load_manifest(_manifest(tmp_path, [["ds", "fragments", "f.tsv", "hg19", "x", "lab.tsv", ""]]))
    cc = pd.DataFrame({"chrom": ["chr1"], "start": [100], "end": [400]})
    with pytest.raises(InputFormatError, match=r"lab.tsv.*none of the 2 barcodes of the label table.*'A-1'"):
        map_dataset(e, cc, "hg19")


def test_label_table_partial_match_warns_with_numbers(tmp_path, caplog):
    _fragments(tmp_path)
    (tmp_path / "lab.tsv").write_text("barcode\tcell_type\nA-1\tT\nB-1\tB\n")
    (e,) = load_manifest(_manifest(tmp_path, [["ds", "fragments", "f.tsv", "hg19", "x", "lab.tsv", ""]]))
    cc = pd.DataFrame({"chrom": ["chr1"], "start": [100], "end": [400]})
    with caplog.at_level(logging.WARNING):
        a, rep = map_dataset(e, cc, "hg19")
    assert a.obs["cell_type"].tolist() == ["T", "B", "unknown"]
    assert rep["labelled_cells"] == 2 and "1 of 3 cells (33.3 %) have no row in the label table" in caplog.text


def test_fractional_h5ad_counts_are_rejected(tmp_path):
    import anndata as ad

    X = sp.csr_matrix(np.array([[2, 0], [1, 3]], dtype=np.float32) * 0.5)
    ad.AnnData(X=X, obs=pd.DataFrame(index=["c1", "c2"]),
               var=pd.DataFrame(index=["chr1:100-200", "chr1:300-400"])).write_h5ad(tmp_path / "a.h5ad")
    (e,) = load_manifest(_manifest(tmp_path, [["ds", "h5ad", "a.h5ad", "hg19"]],
                                   head="name\tformat\tpath\tgenome\n"))
    cc = pd.DataFrame({"chrom": ["chr1"], "start": [0], "end": [500]})
    with pytest.raises(InputFormatError, match=r"a.h5ad.*field 'X'.*non-integer counts: 2 of 3 stored values"
                                               r".*0.5 at cell 2, peak 1"):
        map_dataset(e, cc, "hg19")


def _tss_fragments(tmp_path, build: str, n: int = 3000) -> Path:
    """Fragments centred on TSS of ``build`` (from the TSS tables shipped in the package)."""
    from epiflow.genome.build import packaged_tss

    rng = np.random.default_rng(0)
    rows = []
    for c in ("chr1", "chr2", "chr3"):
        t = packaged_tss()[build][c]
        s = np.sort(rng.choice(t, n // 3, replace=False)) + rng.integers(-100, 100, n // 3)
        rows.append(pd.DataFrame({"c": c, "s": s, "e": s + 150, "b": "A", "n": 1}))
    f = tmp_path / f"f_{build}.tsv.gz"
    with gzip.open(f, "wt") as fh:
        pd.concat(rows).to_csv(fh, sep="\t", header=False, index=False)
    return f


def test_build_check_is_on_by_default_with_the_packaged_tss(tmp_path):
    f = _tss_fragments(tmp_path, "hg19")
    (e,) = load_manifest(_manifest(tmp_path, [["ds", "fragments", f.name, "hg38", "x", "", ""]]))
    cc = pd.DataFrame({"chrom": ["chr1"], "start": [0], "end": [10 ** 9]})
    with pytest.raises(GenomeBuildError, match=r"declared hg38 but its intervals look like hg19: .*hg19 1\.000, "
                                               r"hg38 0\.0\d+"):
        map_dataset(e, cc, "hg38")  # no TSS files configured: the packaged tables are used
    a, rep = map_dataset(e, cc, "hg38", tss=None, min_frac_in_ccres=0)  # the check can be turned off
    assert a.n_obs == 1
    (e19,) = load_manifest(_manifest(tmp_path, [["ds", "fragments", f.name, "hg19", "x", "", ""]]))
    a, rep = map_dataset(e19, cc, "hg19")
    assert rep["build_detected"] == "hg19" and rep["build_scores"]["hg19"] > 3 * rep["build_scores"]["hg38"]


def test_packaged_tss_tables_are_small_and_match_the_shared_bed(data_dir):
    from epiflow.genome.build import _tss_positions, packaged_tss

    data = ROOT / "src" / "epiflow" / "genome" / "data"
    assert sum(p.stat().st_size for p in data.glob("*.npz")) < 400_000
    for b in ("hg19", "hg38"):
        ref = _tss_positions(data_dir / f"{b}_tss.bed.gz")
        got = packaged_tss()[b]
        assert set(got) == {c for c in ref if c in got} and len(got) == 24
        for c in got:
            np.testing.assert_array_equal(got[c], ref[c])


def test_counts_mostly_outside_the_vocabulary_stop_the_mapping(tmp_path):
    rng = np.random.default_rng(1)
    s = rng.integers(0, 10 ** 6, 2000)
    fr = pd.DataFrame({"c": "chr1", "s": np.sort(s), "e": np.sort(s) + 100, "b": "A", "n": 1})
    fr.to_csv(tmp_path / "f.tsv", sep="\t", header=False, index=False)
    (e,) = load_manifest(_manifest(tmp_path, [["ds", "fragments", "f.tsv", "hg38", "x", "", ""]]))
    cc = pd.DataFrame({"chrom": ["chr1"], "start": [0], "end": [50_000]})  # ~5 % of the fragments
    with pytest.raises(VocabularyMismatchError, match=r"only \d\.\d % of its fragments fall in the 1 cCREs "
                                                      r"\(\d+ of 2,000 fragments\), below the threshold 10\.0 %"):
        map_dataset(e, cc, "hg38")
    a, rep = map_dataset(e, cc, "hg38", min_frac_in_ccres=0.01)
    assert 0.01 <= rep["frac_fragments_in_ccres"] < 0.1


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_truncated_gzip_reports_the_lines_decoded_before_the_cut(tmp_path, threads):
    """The same report whether the file is inflated in the reading thread (a budget of 1 or 2
    threads) or in a thread of its own (3 or more)."""
    rng = np.random.default_rng(2)
    s = np.sort(rng.integers(0, 10 ** 8, 200_000))
    fr = pd.DataFrame({"c": "chr1", "s": s, "e": s + 100, "b": rng.choice(["A", "B", "C"], len(s)), "n": 1})
    full = tmp_path / "full.tsv.gz"
    with gzip.open(full, "wt") as fh:
        fr.to_csv(fh, sep="\t", header=False, index=False)
    raw = full.read_bytes()
    cut = tmp_path / "cut.tsv.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    decoded = zlib.decompressobj(31).decompress(raw[: len(raw) // 2]).count(b"\n")
    assert decoded > 50_000
    from epiflow.corpus.readers import FragmentReader

    with pytest.raises(InputFormatError, match="ends early or is corrupt") as exc:
        for _ in FragmentReader(cut, threads=threads):
            pass
    n = int(str(exc.value).split("(")[1].split(" complete lines")[0].replace(",", ""))
    assert 0.95 * decoded <= n <= decoded


# ------------------------------------------------------------------------- raw tracebacks

def test_unwritable_output_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "emb.h5ad"
    rc = main(["embed", "--checkpoint", str(tmp_path / "missing.pth"), "--corpus", str(tmp_path), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and str(out) in err and "is a file, not a folder" in err and "Traceback" not in err
    # the up-front check runs before the missing checkpoint is even looked at
    assert "missing.pth" not in err


def test_permission_error_is_printed_without_a_traceback(tmp_path, capsys, monkeypatch):
    import epiflow.model.cli as mcli

    def denied(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x.h5ad"))

    monkeypatch.setattr(mcli, "_embed", denied)
    rc = main(["embed", "--checkpoint", "c", "--corpus", "d", "--out", str(tmp_path / "x.h5ad")])
    err = capsys.readouterr().err
    assert rc == 2 and "x.h5ad: permission denied" in err and "Fix:" in err


# an --out of the wrong kind (a folder where a file is written, a file where a folder is): refused before
# any work (the inputs below do not even exist), not an IsADirectoryError / FileExistsError at the end
_WRONG_KIND_OUT = {
    "map-dataset": (["--manifest", "m.tsv", "--dataset", "d", "--ccres", "c.bed", "--genome", "hg38"], "dir"),
    "candidate-ccres": (["--manifest", "m.tsv", "--genome", "hg38"], "dir"),
    "embed": (["--checkpoint", "c.pth", "--corpus", "corpus"], "dir"),
    "gene-graph": (["--go", "go.tsv"], "dir"),
    "annotate": (["--checkpoint", "c.pth", "--corpus", "corpus"], "file"),
    "pretrain": (["--corpus", "corpus"], "file"),
    "simulate": ([], "file"),
    "simulate --force": (["--force"], "file"),
    "build-corpus": (["--ccres", "c.bed", "--mapped", "m.h5ad"], "file"),
    "tokenize-downstream": (["--ccres", "c.bed", "--mapped", "m.h5ad", "--corpus", "corpus"], "file"),
    "run-baseline": (["--tool", "lsi", "--task", "feature_extraction", "--corpus", "corpus"], "file"),
}


@pytest.mark.parametrize("verb", sorted(_WRONG_KIND_OUT))
def test_out_of_the_wrong_kind_is_refused_before_any_work(tmp_path, capsys, verb):
    extra, existing = _WRONG_KIND_OUT[verb]
    out = tmp_path / "taken"
    if existing == "dir":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    else:
        out.write_text("x")
    rc = main([verb.split()[0], *extra, "--out", str(out)])
    err = capsys.readouterr().err
    want = "must be a file" if existing == "dir" else "must be a folder"
    assert rc == 2 and f"{out}: exists as a {'folder' if existing == 'dir' else 'file'}" in err, err
    assert want in err and "Fix:" in err and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "x" if existing == "dir" else out.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_every_output_flag_declares_file_or_folder():
    """The CLI checks --out (and --report) against the kind its metavar declares (DIR / FILE)."""
    import argparse

    from epiflow.cli import build_parser
    from epiflow.cliargs import out_kind

    parser = build_parser([])
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for verb, p in sub.choices.items():
        for a in p._actions:
            if a.dest in ("out", "out_dir", "report"):
                assert out_kind(p, a.dest) in ("file", "folder"), (verb, a.dest, a.metavar)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable GPU")
def test_device_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    rc = main(["pretrain", "--corpus", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and "field 'device'" in err and "--device cpu" in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------- checkpoints and pretraining

def _pretrain_argv(corpus, out, extra=()):
    return ["pretrain", "--corpus", str(corpus), "--out", str(out), "--epochs", "2", "--rlm-epochs", "1",
            "--max-steps", "8", "--batch-tokens", "768", "--ckpt-every", "2", "--lr", "2e-3", "--seed", "3",
            "--no-progress", "--grad-accum", "2", *extra]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_toy_corpus(tmp_path_factory.mktemp("faults") / "corpus", n_cells=160, n_ccres=300, seed=4,
                            shard_size=60)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "pre"
    assert main(_pretrain_argv(corpus, out)) == 0
    return out


def test_pretrain_failing_before_training_leaves_no_empty_out_folder(corpus, tmp_path, capsys):
    import shutil

    out = tmp_path / "new" / "pre"  # neither folder exists
    assert main(_pretrain_argv(corpus, out, ["--model-config", "nosuch"])) == 2
    assert "field 'model_config'" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(corpus, bad)
    (bad / "corpus.json").write_text("{")
    assert main(_pretrain_argv(bad, out)) == 2
    assert "corpus.json, line 1: invalid JSON" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
    # a folder that existed before the run is kept (empty or not)
    (tmp_path / "given").mkdir()
    assert main(_pretrain_argv(bad, tmp_path / "given")) == 2
    assert (tmp_path / "given").is_dir()


def test_embed_num_heads_disagreeing_with_the_side_file_is_an_error(run):
    import json

    from epiflow.model.checkpoint import load_epiagent_checkpoint

    heads = json.loads((run / "checkpoint.pth.json").read_text())["config"]["num_heads"]
    other = 1 if heads != 1 else 2
    with pytest.raises(ConfigError, match=rf"num_heads={other} was asked for.*num_heads={heads}"):
        load_epiagent_checkpoint(run / "checkpoint.pth", num_heads=other)
    assert load_epiagent_checkpoint(run / "checkpoint.pth", num_heads=heads).config.num_heads == heads


def test_inspect_checkpoint_on_a_training_state(run, capsys):
    assert main(["inspect-checkpoint", str(run / "train_state.pt")]) == 2
    err = capsys.readouterr().err
    assert "epiflow training state" in err and "checkpoint.pth" in err and "\x1b" not in err


def test_pretrain_refuses_to_overwrite_a_state_without_resume(run, corpus, capsys):
    before = (run / "train_state.pt").read_bytes()
    assert main(_pretrain_argv(corpus, run)) == 2
    err = capsys.readouterr().err
    assert "already holds the training state of an earlier run (step 8" in err and "--resume" in err
    assert "fresh --out folder" in err
    assert (run / "train_state.pt").read_bytes() == before


def test_resume_with_other_settings_errors_or_restarts_when_asked(corpus, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(_pretrain_argv(corpus, out, ["--max-steps", "2"])) == 0
    assert main(_pretrain_argv(corpus, out, ["--max-steps", "2", "--resume", "--lr", "1e-3"])) == 2
    assert "lr 0.002 -> 0.001" in capsys.readouterr().err
    (out / ".train_state.pt.abcd1234.tmp.pt").write_bytes(b"")  # left by kills
    (out / ".checkpoint.pth.k2j3h4g5").mkdir()
    assert main(_pretrain_argv(corpus, out, ["--max-steps", "2", "--resume", "--lr", "1e-3",
                                             "--restart-if-changed"])) == 0
    assert (out / "train_state.pt.previous").exists()
    assert not (out / ".train_state.pt.abcd1234.tmp.pt").exists()
    assert not (out / ".checkpoint.pth.k2j3h4g5").exists()
    st = torch.load(out / "train_state.pt", weights_only=False)
    assert st["config"]["lr"] == 1e-3 and st["step"] == 2 and len(st["config_hash"]) == 16


def test_resume_reads_a_state_written_before_max_batch_cells_was_renamed(corpus, tmp_path, capsys):
    """pretrain's max_cells (cells per micro-batch) is now max_batch_cells: a state that stores the former
    name resumes with the same value (given by the former flag, --max-cells), and a different value is an
    error naming the setting."""
    from epiflow.train.config import PretrainConfig
    from epiflow.train.resume import config_hash

    out = tmp_path / "o"
    assert main(_pretrain_argv(corpus, out, ["--max-steps", "2", "--max-batch-cells", "3"])) == 0
    state = out / "train_state.pt"

    def as_before_the_rename():
        st = torch.load(state, weights_only=False)
        st["config"]["max_cells"] = st["config"].pop("max_batch_cells")
        keys = tuple("max_cells" if k == "max_batch_cells" else k for k in PretrainConfig.RESUME_KEYS)
        st["config_hash"] = config_hash(st["config"], keys)
        torch.save(st, state)

    as_before_the_rename()
    assert main(_pretrain_argv(corpus, out, ["--max-steps", "2", "--max-cells", "3", "--resume"])) == 0
    assert not (out / "train_state.pt.previous").exists()
    st = torch.load(state, weights_only=False)
    assert st["step"] == 2 and st["config"]["max_batch_cells"] == 3 and "max_cells" not in st["config"]
    as_before_the_rename()
    assert main(_pretrain_argv(corpus, out, ["--max-steps", "2", "--max-batch-cells", "2", "--resume"])) == 2
    assert "max_batch_cells 3 -> 2" in capsys.readouterr().err


def test_a_state_of_another_corpus_is_refused_or_set_aside(corpus, tmp_path, capsys):
    other = write_toy_corpus(tmp_path / "other", n_cells=120, n_ccres=300, seed=5, shard_size=60)
    out = tmp_path / "o"
    assert main(_pretrain_argv(corpus, out, ["--max-steps", "2"])) == 0
    assert main(_pretrain_argv(other, out, ["--max-steps", "2", "--resume"])) == 2
    assert "corpus n_cells 160 -> 120" in capsys.readouterr().err
    assert main(_pretrain_argv(other, out, ["--max-steps", "2", "--resume", "--restart-if-changed"])) == 0
    assert torch.load(out / "train_state.pt", weights_only=False)["n_cells"] == 120
    assert torch.load(out / "train_state.pt.previous", weights_only=False)["n_cells"] == 160


def _env(threads: int, delay=None):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    if delay:
        env["EPIFLOW_TRAIN_STEP_DELAY"] = str(delay)
    return env


def _state_step(path):
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["step"])
    except Exception:
        return -1


def test_stop_signal_in_process_saves_the_step_and_resume_matches(corpus, tmp_path, monkeypatch):
    """Fast version: SIGTERM arrives during step 3; the state is saved at step 3, TrainingInterrupted
    says so, the handler is removed again, and resuming gives the uninterrupted run's weights."""
    import importlib

    from epiflow.train.pretrain import PretrainConfig, pretrain
    from epiflow.train.resume import TrainingInterrupted

    P = importlib.import_module("epiflow.train.pretrain")
    cfg = PretrainConfig(epochs=2, rlm_epochs=1, max_steps=6, batch_tokens=768, ckpt_every=1000, lr=2e-3,
                         seed=3, progress=False)
    pretrain(corpus, tmp_path / "full", cfg)
    real_log = P.MetricsLogger.log

    def log_and_signal(self, row):
        real_log(self, row)
        if row["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(P.MetricsLogger, "log", log_and_signal)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM after step 3") as exc:
        pretrain(corpus, tmp_path / "cut", cfg)
    assert exc.value.step == 3 and _state_step(tmp_path / "cut" / "train_state.pt") == 3
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is only installed during the run
    assert not (tmp_path / "cut" / "eval.json").exists()
    monkeypatch.setattr(P.MetricsLogger, "log", real_log)
    import dataclasses

    pretrain(corpus, tmp_path / "cut", dataclasses.replace(cfg, resume=True))
    a = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def full_two_threads(corpus, tmp_path_factory):
    """The uninterrupted 2-thread run the signal tests compare against (built once for both signals)."""
    full = tmp_path_factory.mktemp("signal") / "full"
    subprocess.run([sys.executable, "-m", "epiflow", *_pretrain_argv(corpus, full, ["--ckpt-every", "1000"])],
                   check=True, env=_env(2), capture_output=True, timeout=300)
    return full


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_saves_and_resume_is_bit_identical_with_two_threads(corpus, full_two_threads, tmp_path, sig):
    """SLURM's warning (SIGUSR1) or termination (SIGTERM) signal: the run saves a state at the end of
    the step and exits 128+sig; resuming ends bit-identical to an uninterrupted run, with 2 threads
    (the thread count the workflow's demo uses)."""
    cmd = [sys.executable, "-m", "epiflow"]
    full, cut = full_two_threads, tmp_path / "cut"
    proc = subprocess.Popen(cmd + _pretrain_argv(corpus, cut, ["--ckpt-every", "1000"]), env=_env(2, delay=0.5),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        m = cut / "metrics.csv"
        if m.exists() and len(m.read_text().splitlines()) >= 3:  # header + 2 steps
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    step = _state_step(cut / "train_state.pt")
    assert 2 <= step < 8 and f"continue from step {step}" in err
    assert not (cut / "eval.json").exists()
    subprocess.run(cmd + _pretrain_argv(corpus, cut, ["--ckpt-every", "1000", "--resume"]), check=True,
                   env=_env(2), capture_output=True, timeout=300)
    a = torch.load(full / "checkpoint.pth", weights_only=True)
    b = torch.load(cut / "checkpoint.pth", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert pd.read_csv(cut / "metrics.csv")["step"].tolist() == list(range(1, 9))


# ------------------------------------------------------------------------- workflow

def _snakemake(args, workdir, env=None, **kw):
    e = dict(os.environ if env is None else env)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.setdefault("OMP_NUM_THREADS", "1")
    return [*SNAKEMAKE, *args, "-s", str(ROOT / "workflow" / "Snakefile"), "--directory", str(workdir),
            "--profile", str(ROOT / "profiles" / "local"), "--cores", "2"], e


def test_workflow_reads_exponent_strings_as_numbers(tmp_path):
    over = tmp_path / "over.yaml"
    over.write_text("pretrain:\n  lr: 1e-3\n")
    argv, env = _snakemake(["results/test/pretrain/checkpoint.pth", "-n", "-p", "--configfile",
                            str(ROOT / "config" / "test.yaml"), str(over)], tmp_path)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "config key 'pretrain.lr': read the string '1e-3' as the number 0.001" in out
    assert "--lr 0.001 " in out


@pytest.mark.slow
def test_workflow_pretraining_resumes_after_a_kill_in_a_results_dir_with_a_space(tmp_path):
    """SIGKILL the whole snakemake process group after the first pretraining checkpoint, then run the
    same command again (after Snakemake's own `--unlock`, which a SIGKILLed snakemake needs): the job
    continues from the saved step, metrics.csv has every step once. The results folder has a space
    (every shell path quoted)."""
    over = tmp_path / "over.yaml"
    over.write_text('results_dir: "results/with space"\npretrain:\n  max_steps: 4\n  ckpt_every: 1\n')
    target = "results/with space/pretrain/checkpoint.pth"
    argv, env = _snakemake([target, "--configfile", str(ROOT / "config" / "test.yaml"), str(over)], tmp_path)
    res = tmp_path / "results" / "with space"
    state = res / "pretrain_state" / "train_state.pt"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(argv, env=dict(env, EPIFLOW_TRAIN_STEP_DELAY="3"), cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900
    try:
        while time.time() < deadline and _state_step(state) < 1:
            if proc.poll() is not None:
                pytest.fail(f"the workflow ended before the kill: {(tmp_path / 'first.log').read_text()[-3000:]}")
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    killed_at = _state_step(state)
    assert 1 <= killed_at < 4
    assert not (res / "pretrain" / "eval.json").exists()
    subprocess.run(argv + ["--unlock"], env=env, cwd=ROOT, capture_output=True, timeout=300, check=True)
    again = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    text = (res / "logs" / "pretrain.log").read_text()
    resumed = int(text.split("resuming from step ")[1].split()[0])
    assert resumed >= killed_at, text
    assert pd.read_csv(res / "pretrain" / "metrics.csv")["step"].tolist() == [1, 2, 3, 4]
    assert _state_step(state) == 4 and (res / "pretrain" / "eval.json").exists()
    assert "train_state.pt" not in os.listdir(res / "pretrain")  # the state is not a rule output
