"""The authors' checkpoint format: bit-exact round trip, memory-mapped loading, clear errors."""

from __future__ import annotations

import collections
import gc
import json
import os

import pytest
import torch

from epiflow.cli import main as cli_main
from epiflow.corpus.shard import write_corpus_meta
from epiflow.errors import CheckpointError, ConfigError, VocabularyMismatchError
from epiflow.model import (
    EpiAgent,
    EpiAgentConfig,
    inspect_checkpoint,
    load_epiagent_checkpoint,
    read_state_dict,
)

NAMES = ["epiagent_tiny", "epiagent_tiny_supervised", "epiagent_tiny_bc"]


def _sd(fixtures_dir, name="epiagent_tiny"):
    return torch.load(fixtures_dir / f"{name}.pth", weights_only=True)


def _save(path, obj):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("name", NAMES)
def test_save_back_bit_exact(fixtures_dir, tmp_path, name):
    src = fixtures_dir / f"{name}.pth"
    model = load_epiagent_checkpoint(src, num_heads=4)
    # same file name: the zip records are named after the file, so the bytes are identical
    out = model.save_epiagent_checkpoint(tmp_path / f"{name}.pth")
    assert out.read_bytes() == src.read_bytes()
    # any file name: same keys in the same order, same dtypes, same values
    other = model.save_epiagent_checkpoint(tmp_path / "renamed.pth")
    a = torch.load(src, weights_only=True)
    b = torch.load(other, weights_only=True)
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k
    if "criterion_SR.pos_weight" in b:
        assert b["criterion_SR.pos_weight"].dtype == torch.int64
    assert not list(tmp_path.glob(".*"))  # no temp leftovers


def test_fresh_model_saves_authors_key_order(tmp_path, fixtures_dir):
    cfg = EpiAgentConfig.preset("tiny", n_ccres=300, max_rank=128)  # the fixtures: 128 ranks
    model = EpiAgent.from_config(cfg)
    path = model.save_epiagent_checkpoint(tmp_path / "fresh.pth", write_config=True)
    ref = torch.load(fixtures_dir / "epiagent_tiny.pth", weights_only=True)
    new = torch.load(path, weights_only=True)
    assert list(new) == list(ref)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in new.items()} == \
           {k: (v.dtype, tuple(v.shape)) for k, v in ref.items()}
    side = json.loads((tmp_path / "fresh.pth.json").read_text())
    assert side["config"]["num_heads"] == 4
    back = load_epiagent_checkpoint(path)  # heads from the side file
    assert back.config == cfg.replace(sr_pos_weight=100.0)


def test_kinds_inferred(fixtures_dir):
    kinds = {n: load_epiagent_checkpoint(fixtures_dir / f"{n}.pth", num_heads=4).kind for n in NAMES}
    assert kinds == {"epiagent_tiny": "base", "epiagent_tiny_supervised": "supervised",
                     "epiagent_tiny_bc": "batch-conditioned"}
    info = inspect_checkpoint(fixtures_dir / "epiagent_tiny.pth", num_heads=4)
    assert info["n_ccres"] == 300 and info["num_layers"] == 2 and info["dim"] == 64
    assert info["pos_weights"] == {"SR": 100.0, "RLM": 1.0, "CCA": 1.0}
    assert info["dtypes"] == {"float32": 42, "int64": 1}
    sd = _sd(fixtures_dir)
    assert info["parameters"]["total"] == sum(v.numel() for k, v in sd.items() if not k.startswith("criterion"))


def test_inspect_counts_the_groups_the_model_counts(fixtures_dir, tmp_path):
    """inspect_checkpoint (state dict) and EpiAgent.parameter_counts (parameters) share one grouping;
    the state dict adds only the buffers (loss weights, the gene graph)."""
    from epiflow.model import from_config

    for name in NAMES:
        info = inspect_checkpoint(fixtures_dir / f"{name}.pth", num_heads=4)
        model = load_epiagent_checkpoint(fixtures_dir / f"{name}.pth", num_heads=4)
        groups = {k: v for k, v in info["parameters"].items() if k not in ("buffers", "total")}
        assert groups == {k: v for k, v in model.parameter_counts().items() if k != "total"}, name
    model = from_config(EpiAgentConfig.preset("tiny", n_ccres=50, num_genes=6, gnn_edges=4, num_batches=2))
    model.save_epiagent_checkpoint(tmp_path / "gnn.pth", write_config=True)
    info = inspect_checkpoint(tmp_path / "gnn.pth")
    assert info["parameters"]["conditional"] == model.parameter_counts()["conditional"] > 0
    assert info["parameters"]["buffers"] == sum(b.numel() for b in model.buffers())


def test_memory_mapped_load_does_not_copy(tmp_path):
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("RSS measurement needs /proc (Linux)")
    cfg = EpiAgentConfig.preset("tiny", n_ccres=120_000)
    with torch.device("meta"):
        shapes = EpiAgent(cfg).state_dict()
    sd = collections.OrderedDict((k, torch.full(v.shape, 0.5, dtype=v.dtype)) for k, v in shapes.items())
    path = _save(tmp_path / "big.pth", sd)
    del sd
    gc.collect()
    size = path.stat().st_size
    assert size > 50e6

    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    load_epiagent_checkpoint(path, num_heads=4)  # warm-up (imports, allocator)
    gc.collect()
    before = rss()
    model = load_epiagent_checkpoint(path, num_heads=4)
    grown = rss() - before
    assert grown < 0.1 * size, f"RSS grew by {grown / 1e6:.1f} MB for a {size / 1e6:.1f} MB file"
    w = model.cCRE_embedding.weight
    assert w.shape == (120_004, 64) and float(w[-1, -1].detach()) == 0.5


# --------------------------------------------------------------------------- errors
def test_truncated_file(fixtures_dir, tmp_path):
    data = (fixtures_dir / "epiagent_tiny.pth").read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_epiagent_checkpoint(bad, num_heads=4)
    assert str(bad) in str(e.value)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated"):
        load_epiagent_checkpoint(empty, num_heads=4)


def test_foreign_files(fixtures_dir, tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello, not a checkpoint\n")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_state_dict(text)
    with pytest.raises(CheckpointError, match="holds a list"):
        read_state_dict(_save(tmp_path / "list.pth", [1, 2, 3]))
    wrapped = _save(tmp_path / "wrapped.pth", {"model": _sd(fixtures_dir), "step": 3})
    with pytest.raises(CheckpointError, match=r"'model'.*wrapper"):
        read_state_dict(wrapped)
    other = _save(tmp_path / "resnet.pth", {"conv1.weight": torch.zeros(2, 3), "fc.bias": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="'cCRE_embedding.weight' is missing") as e:
        load_epiagent_checkpoint(other, num_heads=4)
    assert "conv1.weight" in str(e.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_epiagent_checkpoint(tmp_path / "nope.pth", num_heads=4)


class _Foreign:  # an arbitrary pickled object
    pass


def test_foreign_pickle_refused(tmp_path):
    path = _save(tmp_path / "obj.pth", {"x": _Foreign()})
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(path)


def test_missing_unexpected_and_wrong_shapes(fixtures_dir, tmp_path):
    sd = _sd(fixtures_dir)
    del sd["fc2_for_CCA.bias"], sd["EpiAgent_transformer.layers.1.norm2.weight"]
    sd["mystery.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as e:
        load_epiagent_checkpoint(_save(tmp_path / "m.pth", sd), num_heads=4)
    msg = str(e.value)
    assert "missing keys: 'EpiAgent_transformer.layers.1.norm2.weight' [64], 'fc2_for_CCA.bias' [1]" in msg
    assert "unexpected keys: 'mystery.weight' [3,3]" in msg

    sd = _sd(fixtures_dir)
    sd["signal_decoder.weight"] = sd["signal_decoder.weight"][:299]
    sd["signal_decoder.bias"] = sd["signal_decoder.bias"][:299]
    sd["EpiAgent_transformer.layers.0.mixer.Wqkv.weight"] = torch.zeros(190, 64)
    with pytest.raises(CheckpointError) as e:
        load_epiagent_checkpoint(_save(tmp_path / "s.pth", sd), num_heads=4)
    msg = str(e.value)
    assert "'signal_decoder.weight' is [299,64], expected [300,64]" in msg
    assert "'EpiAgent_transformer.layers.0.mixer.Wqkv.weight' is [190,64], expected [192,64]" in msg


def test_vocabulary_mismatch(fixtures_dir, tmp_path):
    path = fixtures_dir / "epiagent_tiny.pth"
    with pytest.raises(VocabularyMismatchError, match="300 cCREs"):
        load_epiagent_checkpoint(path, num_heads=4, n_ccres=299)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_corpus_meta(corpus, {"n_cells": 0, "n_ccres": 512, "shards": [], "shard_cells": []})
    with pytest.raises(VocabularyMismatchError, match="512") as e:
        load_epiagent_checkpoint(path, num_heads=4, corpus=corpus)
    assert "corpus.json" in str(e.value)
    write_corpus_meta(corpus, {"n_cells": 0, "n_ccres": 300, "shards": [], "shard_cells": []})
    assert load_epiagent_checkpoint(path, num_heads=4, corpus=corpus).n_ccres == 300


def test_num_heads_required_for_non_paper_width(fixtures_dir):
    with pytest.raises(ConfigError, match="num_heads"):
        load_epiagent_checkpoint(fixtures_dir / "epiagent_tiny.pth")
    with pytest.raises(ConfigError, match="divisible"):
        load_epiagent_checkpoint(fixtures_dir / "epiagent_tiny.pth", num_heads=3)


def test_inspect_checkpoint_cli(fixtures_dir, capsys, tmp_path):
    assert cli_main(["inspect-checkpoint", str(fixtures_dir / "epiagent_tiny_supervised.pth"),
                     "--num-heads", "4", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "supervised" and info["num_classes"] == 5
    assert cli_main(["inspect-checkpoint", str(fixtures_dir / "epiagent_tiny_bc.pth")]) == 0
    out = capsys.readouterr().out
    assert "batch-conditioned" in out and "unknown (pass --num-heads)" in out
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 10)
    assert cli_main(["inspect-checkpoint", str(bad)]) == 2
    assert "truncated" in capsys.readouterr().err


def test_loading_skips_random_init_and_never_imports_dynamo(tmp_path):
    """The model is built on meta without its random fill (a meta-tensor fill imports torch._dynamo,
    1-2 s in every verb that loads a checkpoint); the loaded weights are the file's, and torch.nn.init
    is restored afterwards."""
    import subprocess
    import sys

    cfg = EpiAgentConfig.preset("tiny", n_ccres=50, max_rank=64)
    model = EpiAgent.from_config(cfg)
    path = model.save_epiagent_checkpoint(tmp_path / "m.pth", write_config=True)
    code = ("import sys; from epiflow.model import load_epiagent_checkpoint as load; "
            f"m = load({str(path)!r}); print(int(m.cCRE_embedding.weight.abs().sum() > 0), "
            "int('torch._dynamo' in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "0"], proc.stdout
    normal = torch.nn.init.normal_
    back = load_epiagent_checkpoint(path)
    assert torch.nn.init.normal_ is normal
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
