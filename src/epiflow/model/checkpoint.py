"""The authors' checkpoint format, both ways (SPEC §6).

A checkpoint is a plain ``torch.save(model.state_dict())`` file (zip format). The model sizes and
its kind (base / supervised / batch-conditioned / ...) are inferred from the keys and shapes; the
number of attention heads cannot be, so it is an argument (default 8 for width 512, the paper's
value), or read from an optional side file ``<checkpoint>.json`` that :func:`save_epiagent_checkpoint`
writes on request.

Loading is memory-mapped: ``torch.load(mmap=True, weights_only=True)`` maps the file, the model is
built on the ``meta`` device (no allocation) and ``load_state_dict(assign=True)`` makes the mapped
tensors its parameters, so the 1.45 B-parameter file never has a second full copy in RAM.

Saving writes the tensors in the model's registration order (= the authors' key order) and keeps
the pickled ``_metadata`` of a loaded file, so loading and saving an authors' file gives a
byte-identical file when saved under the same file name (zip records are named after the file).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError, VocabularyMismatchError
from .config import NUM_SPECIAL, EpiAgentConfig
from .epiagent import EpiAgent, parameter_group

# the random fills of torch.nn.init: on a meta tensor each goes through a Python meta kernel whose first
# call imports torch._dynamo (1-2 s in every process that loads a checkpoint)
_RANDOM_INITS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                 "xavier_uniform_", "xavier_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def meta_without_init():
    """Build modules on the ``meta`` device without their random initialisation.

    Meta tensors hold no values, so the fill is skipped, not lost: every parameter is then replaced by a
    checkpoint tensor (``load_state_dict(assign=True)``). Not thread-safe (``torch.nn.init`` is patched
    for the duration), like any module-level patch."""
    saved = {name: getattr(torch.nn.init, name) for name in _RANDOM_INITS if hasattr(torch.nn.init, name)}

    def _skip(tensor, *args, **kwargs):
        return tensor

    try:
        for name in saved:
            setattr(torch.nn.init, name, _skip)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)

log = logging.getLogger(__name__)

_LAYER_RE = re.compile(r"^EpiAgent_transformer\.layers\.(\d+)\.")
_MAX_LISTED = 12


def _listing(items, fmt=str) -> str:
    items = list(items)
    text = ", ".join(fmt(x) for x in items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        text += f", ... ({len(items) - _MAX_LISTED} more)"
    return text


def _shape(t) -> str:
    return "[" + ",".join(str(int(s)) for s in t.shape) + "]"


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


def _first_line(exc: BaseException) -> str:
    text = _strip_ansi(str(exc)).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _is_train_state(path) -> bool:
    """Whether a torch zip file is an epiflow training state (its pickle names the format string)."""
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
            return name is not None and b"epiflow-train-state" in zf.read(name)
    except (OSError, zipfile.BadZipFile):
        return False


def sidecar_path(path) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".json")


# --------------------------------------------------------------------------- reading
def read_state_dict(path: str | os.PathLike, *, mmap: bool = True) -> "collections.OrderedDict[str, torch.Tensor]":
    """Load a state dict (memory-mapped by default), turning every failure into :class:`CheckpointError`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError("checkpoint file not found", path=str(path),
                              fix="pass the path of a .pth file (e.g. pretrained_EpiAgent.pth)")
    if path.is_dir():
        raise CheckpointError("is a folder, not a checkpoint file", path=str(path),
                              fix="pass the .pth file inside it (e.g. checkpoint.pth)")
    size = path.stat().st_size
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head[:1] != b"\x80":  # neither a zip archive nor a legacy (pickle) torch file
            raise CheckpointError(
                f"cannot be read as a torch checkpoint ({size} bytes, no zip directory): the file is "
                "truncated, corrupt or not a torch file", path=str(path),
                fix="download or copy the checkpoint again and compare its size/sha256")
        warnings.warn(f"{path}: legacy (non-zip) torch format, loading without mmap", stacklevel=2)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as exc:
        if is_zip and _is_train_state(path):
            raise CheckpointError(
                "this is an epiflow training state (train_state.pt: model, optimiser, scheduler, RNG and "
                "data position for `epiflow pretrain --resume`), not a model checkpoint", path=str(path),
                fix="pass the checkpoint.pth written next to it (or in the run's --out folder)") from None
        first = _strip_ansi(str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"not a plain tensor state dict (torch.load(weights_only=True) refused it: {first[:300]})",
            path=str(path), fix="pass a file written with torch.save(model.state_dict(), path)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(
            f"cannot be read as a torch checkpoint ({size} bytes; the file is truncated, corrupt or not a "
            f"torch file: {_first_line(exc)})",
            path=str(path), fix="download or copy the checkpoint again and compare its size/sha256") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"holds a {type(obj).__name__}, not a state dict", path=str(path),
                              fix="pass a file written with torch.save(model.state_dict(), path)")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        hint = ""
        nested = [k for k in not_tensors if isinstance(obj[k], dict)]
        if nested:
            hint = (f" It looks like a wrapper (e.g. a training state) holding {_listing(nested, repr)}; "
                    "save the model's state_dict itself.")
        raise CheckpointError(
            f"not a state dict of tensors: entries {_listing(not_tensors, repr)} are not tensors.{hint}",
            path=str(path), fix="pass a file written with torch.save(model.state_dict(), path)")
    if not isinstance(obj, collections.OrderedDict):
        obj = collections.OrderedDict(obj)
    return obj


# --------------------------------------------------------------------------- config inference
def _need_key(sd, key, path, ndim=None):
    if key not in sd:
        raise CheckpointError(
            f"not an EpiAgent checkpoint: key '{key}' is missing (the file has {len(sd)} keys: "
            f"{_listing(sd, repr)})", path=path, fix="pass an EpiAgent state dict (authors' key format)")
    t = sd[key]
    if ndim is not None and t.ndim != ndim:
        raise CheckpointError(f"key '{key}' has shape {_shape(t)}, expected {ndim} dimensions", path=path)
    return t


def infer_config(sd: Mapping[str, torch.Tensor], num_heads: int | None = None, *, path: str | os.PathLike | None = None,
                 overrides: dict | None = None) -> EpiAgentConfig:
    """Sizes and kind of the model stored in a state dict."""
    path = None if path is None else str(path)
    emb = _need_key(sd, "cCRE_embedding.weight", path, 2)
    rank = _need_key(sd, "rank_embedding.weight", path, 2)
    vocab, dim = (int(s) for s in emb.shape)
    if vocab <= NUM_SPECIAL:
        raise CheckpointError(f"cCRE_embedding.weight has shape {_shape(emb)}: no cCRE rows", path=path)
    layers = sorted({int(m.group(1)) for k in sd for m in [_LAYER_RE.match(k)] if m})
    if not layers:
        raise CheckpointError("not an EpiAgent checkpoint: no 'EpiAgent_transformer.layers.N.*' keys",
                              path=path, fix="pass an EpiAgent state dict (authors' key format)")
    fc1 = _need_key(sd, "EpiAgent_transformer.layers.0.mlp.fc1.weight", path, 2)
    kw: dict = dict(n_ccres=vocab - NUM_SPECIAL, max_rank=int(rank.shape[0]), num_layers=layers[-1] + 1,
                    dim=dim, ffn=int(fc1.shape[0]))
    has = lambda k: k in sd  # noqa: E731
    kw["pretrain_heads"] = any(k.startswith(("signal_decoder.", "fc1_for_", "fc2_for_", "layer_norm_for_",
                                             "criterion_")) for k in sd)
    if has("fc1_for_RLM.weight"):
        kw["rlm_hidden"] = int(sd["fc1_for_RLM.weight"].shape[0])
    if has("fc1_for_CCA.weight"):
        kw["cca_hidden"] = int(sd["fc1_for_CCA.weight"].shape[0])
    kw["criterion_buffers"] = any(k.startswith("criterion_") for k in sd)
    for name, field in (("SR", "sr_pos_weight"), ("RLM", "rlm_pos_weight"), ("CCA", "cca_pos_weight")):
        t = sd.get(f"criterion_{name}.pos_weight")
        if t is not None and t.numel() == 1:
            kw[field] = float(t.reshape(()).item())
    if has("classifier.fc1.weight"):
        kw["classifier"] = "mlp"
        h1 = int(sd["classifier.fc1.weight"].shape[0])
        h2 = int(sd["classifier.fc2.weight"].shape[0]) if has("classifier.fc2.weight") else 128
        kw["classifier_hidden"] = (h1, h2)
        kw["num_classes"] = int(sd["classifier.fc3.weight"].shape[0]) if has("classifier.fc3.weight") else 1
    elif has("classifier.fc.weight"):
        kw["classifier"] = "linear"
        kw["num_classes"] = int(sd["classifier.fc.weight"].shape[0])
    if has("batch_embedding.weight"):
        kw["num_batches"] = int(sd["batch_embedding.weight"].shape[0])
    if has("condition_embedding.weight"):
        kw["num_conditions"] = int(sd["condition_embedding.weight"].shape[0])
    if has("perturbation_gnn.gene_embedding.weight"):
        kw["num_genes"] = int(sd["perturbation_gnn.gene_embedding.weight"].shape[0])
        if has("perturbation_gnn.edge_index"):
            kw["gnn_edges"] = int(sd["perturbation_gnn.edge_index"].shape[-1])
    overrides = dict(overrides or {})
    side_heads = overrides.pop("num_heads", None)
    if num_heads is None:
        num_heads = side_heads
    elif side_heads is not None and int(side_heads) != int(num_heads):
        raise ConfigError(
            f"num_heads={num_heads} was asked for, but the checkpoint's side file says it was trained with "
            f"num_heads={side_heads} (same weights, different attention: the embeddings would be wrong)",
            path=path, field="num_heads",
            fix=f"drop --num-heads (the side file {path}.json gives it), or pass --num-heads {side_heads}")
    if num_heads is None:
        if dim == 512:
            num_heads = 8
        else:
            raise ConfigError(
                f"the number of attention heads cannot be inferred from a state dict (width {dim})",
                path=path, field="num_heads",
                fix="pass num_heads= (the fixtures use 4; the paper model 8), or keep the "
                    "<checkpoint>.json side file written by save_epiagent_checkpoint(write_config=True)")
    kw["num_heads"] = int(num_heads)
    if dim % kw["num_heads"]:
        raise ConfigError(f"width {dim} is not divisible by num_heads={num_heads}", path=path, field="num_heads")
    for k in ("dropout", "ln_eps", "head_ln_eps", "classifier_dropout", "cond_mode", "init"):
        if k in overrides:
            kw[k] = overrides[k]
    return EpiAgentConfig(**kw).validate()


def check_state_dict(model: EpiAgent, sd: Mapping[str, torch.Tensor], path: str | os.PathLike | None = None) -> None:
    """Raise :class:`CheckpointError` naming every missing / unexpected key and wrong shape."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [(k, expected[k], sd[k]) for k in expected if k in sd and tuple(expected[k].shape) != tuple(sd[k].shape)]
    if not (missing or unexpected or wrong):
        return
    cfg = model.config
    parts = []
    if wrong:
        parts.append("wrong shapes: " + _listing(wrong, lambda x: f"'{x[0]}' is {_shape(x[2])}, expected {_shape(x[1])}"))
    if missing:
        parts.append("missing keys: " + _listing(missing, lambda k: f"'{k}' {_shape(expected[k])}"))
    if unexpected:
        parts.append("unexpected keys: " + _listing(unexpected, lambda k: f"'{k}' {_shape(sd[k])}"))
    raise CheckpointError(
        f"does not match an EpiAgent model of kind {cfg.kind} ({cfg.n_ccres} cCREs, {cfg.num_layers} x "
        f"{cfg.dim}, FFN {cfg.ffn}, {cfg.max_rank} ranks): " + "; ".join(parts),
        path=None if path is None else str(path),
        fix="use the complete, unmodified checkpoint file (the vocabulary of signal_decoder must equal "
            "cCRE_embedding rows - 4)")


def _read_side_file(path) -> dict:
    """The whole ``<checkpoint>.json`` side file ({} when there is none)."""
    sc = sidecar_path(path)
    if not sc.exists():
        return {}
    try:
        d = json.loads(sc.read_text())
        if not isinstance(d, dict):
            raise AttributeError(f"a JSON {type(d).__name__}, not an object")
        return d
    except (json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"invalid JSON side file ({exc})", path=str(sc),
                              fix="delete or repair the side file") from None


def _read_sidecar(path) -> dict:
    return dict(_read_side_file(path).get("config", {}))


def checkpoint_vocab_id(path, n_ccres: int | None = None, side: dict | None = None) -> str | None:
    """The cCRE vocabulary a checkpoint was trained on (``vocab_id``, see
    :func:`epiflow.corpus.shard.vocab_id_from_intervals`), or None when unknown (the authors' weights).

    Read from the ``<checkpoint>.json`` side file (``side``: its content, when already read), else from
    the ``model_config.json`` that ``epiflow pretrain`` writes beside its checkpoint (for checkpoints
    saved before the side file carried it; only when its cCRE count is the checkpoint's)."""
    vid = (_read_side_file(path) if side is None else side).get("vocab_id")
    if vid:
        return str(vid)
    mc = Path(path).with_name("model_config.json")
    if mc.exists():
        try:
            d = json.loads(mc.read_text())
        except json.JSONDecodeError:
            return None
        if isinstance(d, dict) and d.get("vocab_id") and (n_ccres is None or d.get("n_ccres") == n_ccres):
            return str(d["vocab_id"])
    return None


def _check_vocab(cfg: EpiAgentConfig, corpus, n_ccres, path, model_vocab_id=None, vocab_id=None) -> None:
    from ..corpus.shard import check_vocab_id

    if corpus is not None:
        from ..corpus.shard import Corpus, open_corpus

        c = corpus if isinstance(corpus, Corpus) else open_corpus(corpus)
        c.check_model_vocab(cfg.n_ccres, what=f"checkpoint {path}", vocab_id=model_vocab_id)
    check_vocab_id(model_vocab_id, vocab_id, what=f"checkpoint {path}")
    if n_ccres is not None and int(n_ccres) != cfg.n_ccres:
        raise VocabularyMismatchError(
            f"the checkpoint has {cfg.n_ccres} cCREs (cCRE_embedding.weight [{cfg.vocab_size},{cfg.dim}]) "
            f"but the data has {int(n_ccres)}", path=str(path),
            fix="use a checkpoint trained on this cCRE vocabulary, or map the data onto its cCRE set")


# --------------------------------------------------------------------------- public API
def load_epiagent_checkpoint(path: str | os.PathLike, num_heads: int | None = None, backend: str = "sdpa", *,
                             device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                             corpus: Any = None, n_ccres: int | None = None, vocab_id: str | None = None,
                             mmap: bool = True, **overrides: Any) -> EpiAgent:
    """Load an authors'-format checkpoint (``pretrained_EpiAgent.pth``, EpiAgent-B/-NT, batch-conditioned,
    or one written by epiflow) into an :class:`EpiAgent` in eval mode.

    Sizes and kind come from the state dict; ``num_heads`` must be given unless the width is 512
    (default 8) or a ``<path>.json`` side file has it. ``corpus`` (folder or Corpus) / ``n_ccres`` check
    the vocabulary (:class:`VocabularyMismatchError`), and so does ``vocab_id`` (the data's cCRE
    vocabulary, e.g. ``Shard.vocab_id``) against the checkpoint's (:func:`checkpoint_vocab_id`; the
    model keeps it as ``model.vocab_id``). Tensors stay memory-mapped on CPU unless
    ``device`` / ``dtype`` ask for a copy. ``overrides``: dropout, ln_eps, head_ln_eps, cond_mode, ...
    """
    path = Path(path)
    sd = read_state_dict(path, mmap=mmap)
    doc = _read_side_file(path)
    side = dict(doc.get("config", {}))
    side.update(overrides)
    cfg = infer_config(sd, num_heads, path=path, overrides=side)
    model_vocab_id = checkpoint_vocab_id(path, cfg.n_ccres, side=doc)
    _check_vocab(cfg, corpus, n_ccres, path, model_vocab_id, vocab_id)
    with meta_without_init():
        model = EpiAgent(cfg, backend="sdpa")
    model.vocab_id = model_vocab_id
    check_state_dict(model, sd, path)
    # load_state_dict(assign=True) writes flags into sd._metadata: keep a pristine copy for saving
    source_metadata = copy.deepcopy(getattr(sd, "_metadata", None))
    model.load_state_dict(sd, strict=True, assign=True)
    setattr(model, "_source_keys", list(sd.keys()))  # noqa: B010 (plain attributes on an nn.Module)
    setattr(model, "_source_metadata", source_metadata)  # noqa: B010
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.set_backend(backend)
    log.info("loaded %s: %s model, %d cCREs, %d x %d, %d heads, %s attention", path.name, cfg.kind,
             cfg.n_ccres, cfg.num_layers, cfg.dim, cfg.num_heads,
             "auto (CPU: packed to train, sdpa to infer)" if model.backend == "auto" else model.backend)
    return model.eval()


def save_epiagent_checkpoint(model: EpiAgent, path: str | os.PathLike, *, write_config: bool = False) -> Path:
    """``torch.save`` the state dict in the authors' format, atomically (temp folder, then rename).

    CPU tensors in key order; the pickled ``_metadata`` of a loaded file is kept. With
    ``write_config`` also writes ``<path>.json`` (the full config, incl. ``num_heads``, and the model's
    ``vocab_id`` when it has one).
    """
    path = Path(path)
    sd = model.state_dict()
    out = collections.OrderedDict((k, v.detach().to("cpu")) for k, v in sd.items())
    meta = getattr(sd, "_metadata", None)
    src_meta = getattr(model, "_source_metadata", None)
    if src_meta is not None and list(out.keys()) == getattr(model, "_source_keys", None):
        meta = src_meta
    if meta is not None:
        setattr(out, "_metadata", meta)  # noqa: B010 (torch.save pickles it, as state_dict() does)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = tmpdir / path.name  # same file name => same zip record names as a direct torch.save
        torch.save(out, tmp)
        os.replace(tmp, path)
        if write_config:
            side = tmpdir / (path.name + ".json")
            doc = {"format": "epiflow-model-config", "version": 1, "config": model.config.to_dict()}
            if getattr(model, "vocab_id", None):
                doc["vocab_id"] = str(model.vocab_id)
            side.write_text(json.dumps(doc, indent=2))
            os.replace(side, sidecar_path(path))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def inspect_checkpoint(path: str | os.PathLike, num_heads: int | None = None) -> dict:
    """Kind, sizes, parameter counts and dtypes of a checkpoint (memory-mapped, nothing copied)."""
    path = Path(path)
    sd = read_state_dict(path, mmap=True)
    side = _read_sidecar(path)
    heads_known = num_heads is not None or "num_heads" in side or int(sd.get("cCRE_embedding.weight",
                                                                                  torch.empty(0, 0)).shape[-1]) == 512
    cfg = infer_config(sd, num_heads if heads_known else 1, path=path, overrides=side)
    with meta_without_init():
        model = EpiAgent(cfg)
    check_state_dict(model, sd, path)
    counts: dict[str, int] = {}
    for k, v in sd.items():
        group = parameter_group(k)
        counts[group] = counts.get(group, 0) + v.numel()
    dtypes = collections.Counter(str(v.dtype).replace("torch.", "") for v in sd.values())
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "kind": cfg.kind,
        "n_ccres": cfg.n_ccres,
        "vocab_size": cfg.vocab_size,
        "dim": cfg.dim,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads if heads_known else None,
        "ffn": cfg.ffn,
        "max_rank": cfg.max_rank,
        "classifier": cfg.classifier,
        "num_classes": cfg.num_classes,
        "num_batches": cfg.num_batches,
        "num_conditions": cfg.num_conditions,
        "num_genes": cfg.num_genes,
        "pos_weights": {n: float(sd[f"criterion_{n}.pos_weight"].item())
                        for n in ("SR", "RLM", "CCA") if f"criterion_{n}.pos_weight" in sd},
        "n_keys": len(sd),
        "dtypes": dict(dtypes),
        "parameters": {**counts, "total": int(sum(n for g, n in counts.items() if g != "buffers"))},
    }
