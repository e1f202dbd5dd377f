"""EpiAgent embeddings for feature extraction: zero-shot and fine-tuned (SPEC §5 row 1).

The paper evaluates unsupervised feature extraction with the pretrained model as it is (zero-shot) and
after fine-tuning it on the evaluated cells with its own pretraining objectives, without labels:
cell-cCRE alignment with K = 1 negative per positive plus signal reconstruction (CCA + SR).
:func:`finetune_embeddings` does both on one set of cells:

1. loads a trainable copy of the checkpoint (the file, or a model object that is deep-copied, so the
   caller's model is never modified);
2. embeds the cells zero-shot (encoder output at ``[CLS]``, top-``max_len`` tokens, as ``epiflow embed``);
3. fine-tunes with :func:`epiflow.train.finetune.finetune` (objectives ``("cca", "sr")``, ``k = 1``;
   token-budget batches, rank-preserving subsampling of long sentences, cosine schedule) for
   ``epochs`` epochs (0: zero-shot only);
4. embeds the same cells again with the fine-tuned model.

Fine-tuning is unsupervised, so it uses every evaluated cell (labelled or not); the labels only enter
the evaluation. :func:`add_model_embeddings` puts the results into the AnnData evaluated by
:func:`epiflow.tasks.features.run` (``obsm['X_epiagent']`` = zero-shot, method
``EpiAgent``; ``obsm['X_epiagent_finetuned']``, method ``EpiAgent-finetuned``) and returns the
fine-tuning rows of the metrics table (``finetune_epochs``, ``finetune_steps``, ``finetune_seconds``,
``finetune_loss_first`` / ``finetune_loss_last`` = summed CCA + SR loss of the first / last epoch).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..errors import ConfigError

log = logging.getLogger(__name__)

ZEROSHOT_METHOD = "EpiAgent"
FINETUNED_METHOD = "EpiAgent-finetuned"
ZEROSHOT_KEY = "X_epiagent"
FINETUNED_KEY = "X_epiagent_finetuned"
OBJECTIVES = ("cca", "sr")


def _need_heads(model) -> None:
    for attr, what in (("signal_decoder", "signal decoder"), ("fc1_for_CCA", "CCA head")):
        if getattr(model, attr, None) is None:
            raise ConfigError(f"the {getattr(model, 'kind', 'given')} checkpoint has no {what}; fine-tuned "
                              "feature extraction trains CCA + SR", field="checkpoint",
                              fix="use a pretrained (base) checkpoint with the pretraining heads, or "
                                  "--epochs 0 (zero-shot only)")


def finetune_embeddings(checkpoint, cells, *, epochs: int = 2, lr: float = 1e-4, k: int = 1,
                        batch_tokens: int = 4096, max_len: int | None = None, weight_decay: float = 0.01,
                        seed: int = 0, num_heads: int | None = None, device=None, backend: str = "sdpa",
                        zero_shot: bool = True, progress: bool = True, sr_objective: str = "bce") -> dict:
    """Zero-shot and CCA (K = ``k``) + SR fine-tuned embeddings of ``cells`` (see the module docstring).

    ``checkpoint``: a checkpoint path (``epiflow pretrain``'s ``checkpoint.pth`` with its side file, or
    the authors' file with ``num_heads``) or an :class:`~epiflow.model.EpiAgent` (copied, not
    modified). ``cells``: anything :meth:`epiflow.corpus.shard.Shard.from_any` reads (a Shard, a corpus
    folder, shard paths, an AnnData); the embeddings follow its cell order.

    Returns a dict: ``zero_shot`` (``[n_cells, dim]`` float32, or None when ``zero_shot`` is False),
    ``finetuned`` (None when ``epochs`` is 0), ``history`` (per-epoch mean losses of
    :func:`~epiflow.train.finetune.finetune`), ``steps``, ``seconds`` (fine-tuning wall time),
    ``epochs``.
    """
    import torch

    from ..corpus.shard import Shard
    from ..train.engine import max_input_len as effective_max_len
    from ..train.finetune import embed_cells, finetune
    from .common import load_model, resolve_device

    epochs = int(epochs)
    if epochs < 0:
        raise ConfigError(f"fine-tuning epochs must be >= 0, got {epochs}", field="epochs",
                          fix="0 = zero-shot only, N > 0 = fine-tune N epochs with CCA + SR")
    if epochs > 0 and not float(lr) > 0:
        raise ConfigError(f"fine-tuning learning rate must be > 0, got {lr}", field="lr")
    if int(k) < 1:
        raise ConfigError(f"CCA negatives per positive must be >= 1, got {k}", field="k")
    if epochs == 0 and not zero_shot:
        raise ConfigError("nothing to compute: zero_shot is False and epochs is 0", field="epochs")
    cs = Shard.from_any(cells)
    if cs.n_cells == 0:
        raise ConfigError("no cells to embed", field="cells")
    dev = resolve_device(device)
    model = load_model(checkpoint, n_ccres=cs.n_ccres, vocab_id=cs.vocab_id, num_heads=num_heads, backend=backend, device=dev)
    if epochs > 0:
        _need_heads(model)
    ml = effective_max_len(model, max_len)
    model.eval()
    out = {"zero_shot": None, "finetuned": None, "history": [], "steps": 0, "seconds": 0.0, "epochs": epochs}
    if zero_shot:
        out["zero_shot"] = embed_cells(model, cs, max_len=ml, device=dev, progress=False)
    if epochs == 0:
        return out
    torch.manual_seed(int(seed))  # dropout
    log.info("fine-tuning on %d cells: CCA (K = %d) + SR, %d epochs, lr %g, %d-token batches", cs.n_cells, k,
             epochs, lr, batch_tokens)
    t0 = time.perf_counter()
    res = finetune(model, cs, OBJECTIVES, epochs=epochs, lr=float(lr), k=int(k), batch_tokens=int(batch_tokens),
                   max_len=ml, weight_decay=float(weight_decay), seed=int(seed), device=str(dev),
                   progress=progress, sr_objective=sr_objective)
    out["seconds"] = time.perf_counter() - t0
    out["history"], out["steps"] = res["history"], int(res["steps"])
    model.eval()
    out["finetuned"] = embed_cells(model, cs, max_len=ml, device=dev, progress=False)
    if not np.isfinite(out["finetuned"]).all():
        raise ConfigError("fine-tuning diverged: the fine-tuned embeddings hold NaN/inf values",
                          field="lr", fix="lower --lr")
    return out


def _epoch_loss(h: dict) -> float:
    return float(sum(v for key, v in h.items() if key in OBJECTIVES))


def add_model_embeddings(adata, cells, checkpoint, *, dataset: str, epochs: int = 2,
                         zero_shot_key: str | None = ZEROSHOT_KEY, **kw) -> tuple[dict, list[dict]]:
    """Embed ``cells`` (the cells of ``adata``, same order) with ``checkpoint`` into ``adata.obsm``.

    The zero-shot embedding is computed (and stored under ``obsm[ZEROSHOT_KEY]``) only when
    ``zero_shot_key`` is None or missing from ``adata.obsm``; the fine-tuned one goes to
    ``obsm[FINETUNED_KEY]`` when ``epochs > 0``. Further keywords go to :func:`finetune_embeddings`.

    Returns ``(methods, rows)``: ``{method: obsm key}`` of the embeddings added, and the metric rows
    (task ``feature_extraction``) describing the fine-tuning of each EpiAgent method.
    """
    from .features import TASK
    from ..metrics.table import metric_rows

    n = getattr(cells, "n_cells", None)
    if n is not None and int(n) != adata.n_obs:
        raise ConfigError(f"{n} cells to embed but {adata.n_obs} cells to evaluate", field="cells")
    need_zero = zero_shot_key is None or zero_shot_key not in adata.obsm
    if int(epochs) == 0 and not need_zero:
        return {}, metric_rows(TASK, dataset, ZEROSHOT_METHOD, {"finetune_epochs": 0})
    res = finetune_embeddings(checkpoint, cells, epochs=epochs, zero_shot=need_zero, **kw)
    methods: dict[str, str] = {}
    rows = metric_rows(TASK, dataset, ZEROSHOT_METHOD, {"finetune_epochs": 0})
    if need_zero:
        adata.obsm[ZEROSHOT_KEY] = res["zero_shot"]
        methods[ZEROSHOT_METHOD] = ZEROSHOT_KEY
    if res["finetuned"] is not None:
        adata.obsm[FINETUNED_KEY] = res["finetuned"]
        methods[FINETUNED_METHOD] = FINETUNED_KEY
        hist = res["history"]
        rows += metric_rows(TASK, dataset, FINETUNED_METHOD, {
            "finetune_epochs": res["epochs"], "finetune_steps": res["steps"], "finetune_seconds": res["seconds"],
            "finetune_loss_first": _epoch_loss(hist[0]) if hist else float("nan"),
            "finetune_loss_last": _epoch_loss(hist[-1]) if hist else float("nan")})
        log.info("fine-tuned %d epochs (%d steps, %.1f s): loss %.4g -> %.4g", res["epochs"], res["steps"],
                 res["seconds"], _epoch_loss(hist[0]) if hist else float("nan"),
                 _epoch_loss(hist[-1]) if hist else float("nan"))
    return methods, rows


__all__ = ["finetune_embeddings", "add_model_embeddings", "ZEROSHOT_METHOD", "FINETUNED_METHOD", "ZEROSHOT_KEY",
           "FINETUNED_KEY"]
