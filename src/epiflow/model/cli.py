"""CLI verbs of the model stage: ``epiflow embed`` and ``epiflow inspect-checkpoint``."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "embed", help="cell embeddings (obsm['X_epiagent']) from an EpiAgent checkpoint",
        description="Embed the cells of a corpus, a shard or an h5ad of raw counts over the checkpoint's cCREs "
                    "(--corpus; --input is its former name) and write an AnnData with obs and obsm['X_epiagent'].")
    from ..cliargs import add_config_args, add_io_args
    from ..tasks.config import BACKENDS, ModelRuntime

    add_io_args(p, out="file", dataset=False,
                cells_help="cells: a corpus folder (epiflow build-corpus), a shard .h5, or an .h5ad of raw counts "
                           "over the checkpoint's cCREs (with --df or var['df'])",
                checkpoint_help="authors'-format .pth (e.g. pretrained_EpiAgent.pth) or epiflow pretrain's "
                                "checkpoint.pth")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="attention backend: sdpa, packed, flash or auto (flash > packed on CUDA, sdpa on CPU)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads (needed unless the width is 512 or a <checkpoint>.json exists)")
    p.add_argument("--batch-tokens", type=int, default=65_536, help="padded tokens per batch")
    add_config_args(p, ModelRuntime, exclude=("backend", "num_heads", "seed"))  # --device, --progress, as every verb
    p.add_argument("--batch-key", default=None,
                   help="obs column of integer batch ids (batch-conditioned checkpoints; default: none)")
    p.add_argument("--embedding-key", "--key", dest="embedding_key", default="X_epiagent",
                   help="obsm key of the embedding (as evaluate-features' --embedding-key; --key: its former name)")
    p.add_argument("--readout", choices=["cls", "mean"], default="cls",
                   help="cell embedding: encoder output at [CLS] (default, the paper) or the mean of the cCRE-token "
                        "outputs (an option, docs/results_notes.md #15)")
    p.set_defaults(func=_embed)

    q = subparsers.add_parser("inspect-checkpoint", help="kind, sizes and parameter counts of a checkpoint")
    q.add_argument("checkpoint")
    q.add_argument("--num-heads", type=int, default=None)
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=_inspect)


def _embed(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    import numpy as np

    from ..cliargs import config_from_args
    from ..errors import InputFormatError
    from ..io import atomic_path
    from ..tasks.config import ModelRuntime
    from ..train.engine import resolve_device
    from .checkpoint import load_epiagent_checkpoint
    from .inference import embed

    log = logging.getLogger("epiflow.model")
    runtime = config_from_args(ModelRuntime, args)
    device = resolve_device(runtime.device)
    from .attention import resolve_backend

    backend = resolve_backend(args.backend, device)
    src = Path(args.corpus)
    if not src.exists():
        raise InputFormatError("input does not exist", path=str(src),
                               fix="pass a corpus folder, a shard .h5 or an .h5ad of raw counts")
    h5ad = src.suffix == ".h5ad"
    model = load_epiagent_checkpoint(args.checkpoint, num_heads=args.num_heads, backend=backend,
                                     corpus=src if src.is_dir() else None)
    kw = dict(key=args.embedding_key, batch_key=args.batch_key, batch_tokens=args.batch_tokens, device=device,
              progress=runtime.progress, readout=args.readout)
    if not h5ad:  # a corpus folder or a shard
        if args.df:
            log.warning("--df is ignored for a corpus or a shard (their TF-IDF ranks are stored)")
        result = embed(src, model, **kw)
    else:
        import anndata as ad

        try:
            adata = ad.read_h5ad(src)
        except (OSError, KeyError, ValueError) as exc:
            raise InputFormatError(f"cannot read h5ad ({exc})", path=str(src)) from None
        df = None
        if args.df:
            try:
                df = np.load(args.df, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise InputFormatError(f"cannot read df ({exc})", path=args.df,
                                       fix="pass the df.npy of the corpus") from None
        if adata.n_vars != model.n_ccres:
            from ..errors import VocabularyMismatchError

            raise VocabularyMismatchError(
                f"the h5ad has {adata.n_vars} cCREs (n_vars) but the checkpoint {args.checkpoint} has "
                f"{model.n_ccres}", path=str(src),
                fix="map the data onto the checkpoint's cCRE vocabulary (same cCREs, same order)")
        adata = embed(adata, model, df=df, **kw)
        result = ad.AnnData(obs=adata.obs.copy())
        result.obsm[args.embedding_key] = adata.obsm[args.embedding_key]
    result.uns["epiflow_embed"] = {"checkpoint": str(args.checkpoint), "backend": model.backend,
                                   "kind": model.kind, "dim": int(model.config.dim)}
    with atomic_path(args.out, suffix=".h5ad") as tmp:
        result.write_h5ad(tmp)
    log.info("wrote %s (%d cells x %d)", args.out, result.n_obs, result.obsm[args.embedding_key].shape[1])
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json

    from .checkpoint import inspect_checkpoint

    info = inspect_checkpoint(args.checkpoint, num_heads=args.num_heads)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b:,}" if isinstance(b, int) else f"{a}={b}" for a, b in v.items())
        elif isinstance(v, int) and not isinstance(v, bool):
            v = f"{v:,}"
        elif v is None:
            v = "unknown (pass --num-heads)" if k == "num_heads" else "-"
        print(f"{k:<{width}}  {v}")
    return 0
