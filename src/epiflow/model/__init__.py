"""EpiAgent in pure PyTorch: config presets, attention backends, the authors' checkpoint format,
losses and inference (``embed``). See SPEC §3 and §6.

>>> from epiflow.model import load_epiagent_checkpoint
>>> model = load_epiagent_checkpoint("epiagent_tiny.pth", num_heads=4, backend="sdpa")
>>> out = model(input_ids); out.cell_embedding          # [B, D]
>>> clf = derive(model, classes=12, classifier="linear")  # a fine-tuning model from a base
"""

from . import losses
from .attention import BACKENDS, Packing, flash_attn_available, resolve_backend
from .checkpoint import (
    check_state_dict,
    infer_config,
    inspect_checkpoint,
    load_epiagent_checkpoint,
    read_state_dict,
    save_epiagent_checkpoint,
)
from .config import PRESETS, EpiAgentConfig
from .derive import derive, token_scale
from .epiagent import (
    EpiAgent,
    EpiAgentOutput,
    PackedOutput,
    approx_flops_per_token,
    expand_rows,
    from_config,
    token_mask,
)
from .gnn import PerturbationGNN
from .losses import (
    cca_loss,
    classification_loss,
    focal_loss,
    rlm_loss,
    sr_loss,
    sr_loss_sparse,
)


def __getattr__(name):  # lazy: inference pulls in anndata / tqdm
    if name in ("embed", "embed_sentences", "inference_context"):
        import importlib

        return getattr(importlib.import_module(__name__ + ".inference"), name)
    raise AttributeError(name)


__all__ = [
    "EpiAgent", "EpiAgentConfig", "EpiAgentOutput", "PackedOutput", "PRESETS", "BACKENDS", "Packing",
    "from_config", "derive", "token_scale", "load_epiagent_checkpoint", "save_epiagent_checkpoint", "read_state_dict",
    "infer_config", "check_state_dict", "inspect_checkpoint", "resolve_backend", "flash_attn_available",
    "expand_rows", "token_mask", "approx_flops_per_token", "PerturbationGNN", "losses",
    "sr_loss", "sr_loss_sparse", "cca_loss", "rlm_loss", "focal_loss", "classification_loss",
    "embed", "embed_sentences", "inference_context",
]
