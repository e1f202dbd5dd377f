"""Model configuration: one dataclass, three presets.

``paper`` is the published EpiAgent (SPEC §3): 1,355,445 cCREs, 18 post-norm blocks of width 512,
8 heads, FFN 2048, 8,192 rank embeddings, ~1.45 B parameters. ``small`` is a laptop/CPU-sized model
for experiments and benchmarks, ``tiny`` is the CPU demo model: the golden fixtures' sizes (2 x 64,
4 heads) with 1,024 rank embeddings so that whole demo cell sentences fit (the fixture files
themselves have 128; checkpoint loading infers every size from the state dict).
The vocabulary size always comes from the corpus (``n_ccres``); token ids add 4 specials.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

NUM_SPECIAL = 4
PAPER_N_CCRES = 1_355_445

CLASSIFIERS = (None, "linear", "mlp")
COND_MODES = ("add", "replace")
INITS = ("authors", "bert")


@dataclass
class EpiAgentConfig:
    """Sizes and options of an EpiAgent model.

    Heads present in the model (and therefore in its state dict):

    * ``pretrain_heads``: signal decoder, cell-cCRE alignment (CCA) and replaced-LM (RLM) heads,
      plus (``criterion_buffers``) the three ``criterion_*.pos_weight`` buffers the authors' files carry.
    * ``classifier``: ``"mlp"`` = the authors' 512-256-128-C MLP (focal loss),
      ``"linear"`` = the paper's single linear layer (cross-entropy), ``None`` = no classifier.
    * conditional tokens added at position 0: ``num_batches`` (batch token, authors' EpiAgent-BC),
      ``num_conditions`` (stimulation [PER] tokens), ``num_genes`` (one learnable token per gene passed
      through the perturbation GNN; ``gnn_edges`` is the size of the stored gene graph).
    """

    n_ccres: int
    max_rank: int = 8192
    num_layers: int = 18
    dim: int = 512
    num_heads: int = 8
    ffn: int = 2048
    dropout: float = 0.1            # attention probabilities and both residual branches
    ln_eps: float = 1e-12           # encoder LayerNorms
    head_ln_eps: float = 1e-5       # LayerNorms of the RLM / CCA / classifier heads
    # pretraining heads
    pretrain_heads: bool = True
    rlm_hidden: int = 64
    cca_hidden: int = 128
    criterion_buffers: bool = True
    sr_pos_weight: float = 100.0
    rlm_pos_weight: float = 1.0
    cca_pos_weight: float = 1.0
    # classifier
    classifier: str | None = None
    num_classes: int = 0
    classifier_hidden: tuple[int, int] = (256, 128)
    classifier_dropout: float = 0.25
    # conditional tokens at position 0
    num_batches: int = 0
    num_conditions: int = 0
    num_genes: int = 0
    gnn_edges: int = 0
    cond_mode: str = "add"          # "add" (paper) or "replace" (public code, genetic perturbation)
    init: str = "authors"           # "authors": PyTorch defaults, N(0,1) embeddings; "bert": N(0, 0.02)
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ derived
    @property
    def vocab_size(self) -> int:
        return int(self.n_ccres) + NUM_SPECIAL

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def kind(self) -> str:
        """``base``, ``supervised``, ``batch-conditioned`` (or a '+'-joined combination)."""
        parts = []
        if self.pretrain_heads:
            parts.append("base")
        if self.classifier:
            parts.append("supervised")
        if self.num_batches:
            parts.append("batch-conditioned")
        if self.num_conditions:
            parts.append("stimulation")
        if self.num_genes:
            parts.append("gene-perturbation")
        if parts[:1] == ["base"] and len(parts) > 1:
            parts = parts[1:]
        return "+".join(parts) if parts else "encoder"

    def validate(self) -> "EpiAgentConfig":
        def bad(fieldname, msg, fix=None):
            raise ConfigError(msg, field=fieldname, fix=fix)

        if int(self.n_ccres) < 1:
            bad("n_ccres", f"must be >= 1, got {self.n_ccres}", "take it from the corpus (corpus.n_ccres)")
        for name in ("max_rank", "num_layers", "dim", "num_heads", "ffn"):
            if int(getattr(self, name)) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            bad("num_heads", f"dim {self.dim} is not divisible by num_heads {self.num_heads}",
                "choose num_heads dividing dim (paper: 512 / 8)")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.classifier not in CLASSIFIERS:
            bad("classifier", f"unknown classifier {self.classifier!r}", "use None, 'linear' or 'mlp'")
        if self.classifier and self.num_classes < 1:
            bad("num_classes", "a classifier needs num_classes >= 1")
        if self.cond_mode not in COND_MODES:
            bad("cond_mode", f"unknown mode {self.cond_mode!r}", "use 'add' or 'replace'")
        if self.init not in INITS:
            bad("init", f"unknown init {self.init!r}", "use 'authors' or 'bert'")
        for name in ("num_batches", "num_conditions", "num_genes", "gnn_edges"):
            if int(getattr(self, name)) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        return self

    # ------------------------------------------------------------------ presets / serialisation
    @classmethod
    def preset(cls, name: str, n_ccres: int | None = None, **overrides) -> "EpiAgentConfig":
        """``tiny`` / ``small`` / ``paper``; ``n_ccres`` comes from the corpus (paper default 1,355,445)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}", field="model_config",
                              fix=f"use one of {', '.join(PRESETS)}")
        kw = dict(PRESETS[name])
        if n_ccres is not None:
            kw["n_ccres"] = int(n_ccres)
        elif "n_ccres" not in kw:
            raise ConfigError(f"preset {name!r} needs n_ccres (the corpus vocabulary size)", field="n_ccres")
        cls.check_fields(overrides)
        kw.update(overrides)
        return cls(**kw).validate()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["classifier_hidden"] = list(self.classifier_hidden)
        return d

    @classmethod
    def check_fields(cls, d: dict, path=None) -> None:
        """A :class:`ConfigError` naming ``path`` (a model_config JSON) and the field when ``d`` has a key
        that is no model option, or a value of the wrong JSON type (``"dim": "sixty-four"``,
        ``"dropout": "high"``, ``"pretrain_heads": 1``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model option(s) {sorted(unknown)}", path=path, field="model_config",
                              fix=f"remove them; the model options are {', '.join(sorted(known))}")
        hints = typing.get_type_hints(cls)
        for name, v in d.items():
            tp = hints[name]
            if tp is int:
                ok, want = isinstance(v, numbers.Integral) and not isinstance(v, bool), "an integer"
            elif tp is float:
                ok, want = isinstance(v, numbers.Real) and not isinstance(v, bool), "a number"
            elif tp is bool:
                ok, want = isinstance(v, bool), "true or false"
            elif tp == str | None:
                ok, want = v is None or isinstance(v, str), "a string or null"
            elif tp is str:
                ok, want = isinstance(v, str), "a string"
            elif tp is dict:
                ok, want = isinstance(v, dict), "an object"
            else:  # classifier_hidden: two integers
                ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(
                    isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in v)
                want = "a list of two integers"
            if not ok:
                raise ConfigError(f"{name} is {json.dumps(v, default=str)}, expected {want}", path=path,
                                  field=name, fix=f"write {name} as {want} (default: {cls._default(name)!r})")

    @classmethod
    def _default(cls, name: str) -> Any:
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        if f.default is not dataclasses.MISSING:
            return list(f.default) if isinstance(f.default, tuple) else f.default
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else None

    @classmethod
    def from_dict(cls, d: dict, path=None) -> "EpiAgentConfig":
        """The config from ``d`` (a model_config JSON: ``path`` names it in errors), types checked."""
        cls.check_fields(d, path=path)
        d = dict(d)
        if "classifier_hidden" in d:
            d["classifier_hidden"] = tuple(int(x) for x in d["classifier_hidden"])
        return cls(**d).validate()

    def replace(self, **kw: Any) -> "EpiAgentConfig":
        return dataclasses.replace(self, **kw).validate()


PRESETS: dict[str, dict] = {
    "tiny": dict(max_rank=1024, num_layers=2, dim=64, num_heads=4, ffn=256),
    "small": dict(max_rank=8192, num_layers=4, dim=256, num_heads=4, ffn=1024),
    "paper": dict(n_ccres=PAPER_N_CCRES, max_rank=8192, num_layers=18, dim=512, num_heads=8, ffn=2048),
}
