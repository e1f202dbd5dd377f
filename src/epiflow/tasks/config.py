"""The settings of every downstream task: one dataclass per verb, field names = the YAML keys of
``tasks.<task>`` in the workflow's config (issue #18).

Each field is declared once here (type, default, bounds, help); the verb's flags
(:func:`epiflow.cliargs.add_config_args`), the workflow's command line (``common.smk``:
:func:`epiflow.cliargs.to_argv`) and the config schema's task properties
(:func:`epiflow.cliargs.schema_properties`) are made from it. Files (cells, checkpoint, outputs, TSS,
GO, label maps) are not settings: they are the verbs' I/O flags, the same on every verb
(``--corpus``, ``--checkpoint``, ``--out``, ``--dataset``, ``--df``; :mod:`epiflow.tasks.io_args`).

This module imports nothing heavy: the workflow reads it while planning.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..baselines.lsi import DEFAULT_RECIPE as DEFAULT_LSI_RECIPE
from ..baselines.lsi import LSI_RECIPES
from ..cliargs import setting
from ..metrics.ordering import HEMATOPOIESIS_ORDER
from ..train.config import BACKENDS

DEFAULT_KS = [100, 250, 500, 1000]


@dataclass
class ModelRuntime:
    """Where and how the model runs (every verb that loads a checkpoint)."""

    device: str = setting("auto", "cpu, cuda, cuda:N or auto (CUDA when available)", pattern=r"auto|cpu|cuda(:[0-9]+)?")
    backend: str = setting("auto", "attention backend: auto = on CPU packed while fine-tuning, padded sdpa "
                           "for inference; on CUDA flash-attn if installed, else packed", choices=BACKENDS)
    num_heads: int | None = setting(None, "attention heads (needed only when the checkpoint has no .json "
                                    "side file and its width is not 512)", min=1)
    progress: bool = setting(True, "progress bar while training / embedding")
    seed: int = setting(0, "random seed (split, subsampling, initialisation)", min=0)


@dataclass
class Training:
    """The length and step of a fine-tuning (epiflow.train.engine.FitConfig)."""

    epochs: float = setting(1, "passes over the training examples", exclusive_min=0)
    max_steps: int | None = setting(None, "stop after this many optimiser steps (quick runs)", min=1)
    batch_size: int = setting(16, "examples per optimiser step", min=1)
    lr: float = setting(1e-4, "AdamW learning rate of the pretrained weights", exclusive_min=0)
    max_len: int | None = setting(None, "tokens per cell in training (default: the model's rank limit - 2)",
                                  min=1)


# ----------------------------------------------------------------------------- feature extraction
@dataclass
class FeaturesConfig(ModelRuntime):
    """``epiflow evaluate-features`` (``tasks.feature_extraction``)."""

    label_key: str = setting("cell_type", "obs column with the cell types")
    embedding_key: str = setting("X_epiagent", "obsm key of the embeddings given with --embeddings")
    lsi_components: int = setting(50, "SVD components of LSI", min=2)
    lsi_drop_first: str = setting("auto", "drop the first LSI component: auto = when |Spearman(comp1, depth)| "
                                  "> 0.9", choices=("auto", "yes", "no"))
    lsi_recipe: str = setting(DEFAULT_LSI_RECIPE, "LSI TF-IDF + component scaling (epiflow.baselines.lsi)",
                              choices=LSI_RECIPES)
    n_neighbors: int = setting(15, "kNN graph size", min=2)
    max_iter: int = setting(30, "most Leiden runs of the resolution bisection", min=1)
    epochs: int = setting(0, "epochs of CCA (K = 1) + SR fine-tuning on the evaluated cells (method "
                          "EpiAgent-finetuned; 0: zero-shot only)", min=0, aliases=("--finetune-epochs",))
    lr: float = setting(5e-4, "fine-tuning learning rate", exclusive_min=0, aliases=("--finetune-lr",))
    batch_tokens: int = setting(4096, "tokens per fine-tuning batch", min=1,
                                aliases=("--finetune-batch-tokens",))
    sr_objective: str = setting("bce", "SR loss of the fine-tuning: bce (the paper) or multinomial "
                                "(depth-invariant; use the one the model was pretrained with)",
                                choices=("bce", "multinomial"))
    max_len: int | None = setting(None, "tokens per cell (default: the model's rank limit - 2)", min=1)
    trajectory: bool = setting(False, "also run PAGA + diffusion pseudotime and compare with --order")
    root_type: str = setting("HSC", "cell type of the pseudotime root")
    order: str = setting(HEMATOPOIESIS_ORDER, "known order of the types, tiers separated by '<'")
    umap: bool = setting(True, "UMAPs and figures")
    svg: bool = setting(False, "also write SVG figures")


# ----------------------------------------------------------------------------- annotation, imputation
@dataclass
class FinetuneTask(Training, ModelRuntime):
    """What ``annotate`` and ``impute`` share: a fine-tuned model beside LSI, written on request."""

    lsi_components: int = setting(50, "SVD components of the LSI baseline(s)", min=2)
    trainer: str = setting("task", "fine-tuning: task = this task's objective (supports max_steps), shared "
                           "= token-budget batches with a cosine schedule", choices=("task", "shared"))
    save_model: bool = setting(False, "also write the fine-tuned model (finetuned.pth)")
    figures: bool = setting(True, "write the figures")
    svg: bool = setting(False, "also write SVG figures")


@dataclass
class AnnotationConfig(FinetuneTask):
    """``epiflow annotate`` (``tasks.annotation``)."""

    label_key: str = setting("cell_type", "obs column with the cell types")
    head: str = setting("linear", "classifier: linear + cross-entropy (paper) or the authors' MLP + focal "
                        "loss", choices=("linear", "mlp_focal"))
    epochs: float = setting(20, "fine-tuning epochs", exclusive_min=0)
    lr: float = setting(5e-4, "AdamW learning rate of the encoder", exclusive_min=0)
    head_lr: float | None = setting(None, "learning rate of the classifier (default 10 x lr)", exclusive_min=0)
    batch_size: int = setting(32, "cells per step", min=1)
    focal_gamma: float = setting(2.0, "focal loss gamma (head mlp_focal)", min=0)
    query_fraction: float = setting(1 / 3, "fraction of each cell type in the query", exclusive_min=0, max=0.9)
    baselines: bool = setting(True, "the LSI / frozen-embedding baselines")


@dataclass
class ImputationConfig(FinetuneTask):
    """``epiflow impute`` (``tasks.imputation``)."""

    label_key: str = setting("cell_type", "obs column with the cell types (scored by clustering)")
    epochs: float = setting(15, "fine-tuning epochs", exclusive_min=0)
    lr: float = setting(5e-4, "AdamW learning rate of the encoder", exclusive_min=0)
    head_lr: float | None = setting(None, "learning rate of the signal decoder and CCA head (default 10 x lr)",
                                    exclusive_min=0)
    batch_size: int = setting(16, "cells per step", min=1)
    min_cell_fraction: float = setting(0.03, "evaluate the cCREs open in at least this fraction of cells",
                                       min=0, max=1, aliases=("--min-open-fraction",))
    w_cca: float = setting(1.0, "weight of the CCA loss (as pretrain's --w-cca)", min=0, aliases=("--cca-weight",))
    w_sr: float = setting(1.0, "weight of the MSE reconstruction (as pretrain's --w-sr)", min=0,
                          aliases=("--sr-weight",))
    cca_max_pos: int | None = setting(None, "cap on CCA positives per cell (default: all, as the paper)", min=1)
    n_pcs: int = setting(50, "principal components before Leiden", min=2)


# ----------------------------------------------------------------------------- perturbation
@dataclass
class PerturbationConfig(Training, ModelRuntime):
    """What ``predict-stimulation`` and ``predict-genetic`` share."""

    control: str = setting("control", "label of the unperturbed cells")
    holdout: list[str] | None = setting(None, "held-out group (repeat the flag for several; default: "
                                        "see the verb's help)", repeat=True)
    k: list[int] = setting(default_factory=lambda: list(DEFAULT_KS),
                           help="top-k DA cCREs for direction accuracy (comma list; capped at what is "
                                "available)", min=1)
    n_top: int = setting(1000, "top-n DA cCREs for R2 / Pearson / Wasserstein", min=1)
    da_tie_correct: bool = setting(False, "tie-corrected Wilcoxon z-scores for the DA cCREs (ranks rarely open "
                                   "cCREs higher); off: the paper's (scanpy's default)")
    min_cells: int = setting(3, "fewest cells per group", min=1)
    epochs: float = setting(3, "passes over the training examples", exclusive_min=0)
    new_lr: float = setting(1e-3, "learning rate of the new token / GNN / classifier", exclusive_min=0)
    aux_weight: float = setting(0.01, "weight of the auxiliary classifier", min=0)
    cca_k: int = setting(1, "CCA negatives per positive", min=1)
    save_cells: bool = setting(True, "write predicted_cells.h5ad")
    svg: bool = setting(False, "also write SVG figures")


@dataclass
class StimulationConfig(PerturbationConfig):
    """``epiflow predict-stimulation`` (``tasks.stimulation``)."""

    condition_key: str = setting("condition", "obs column of the condition")
    label_key: str = setting("cell_type", "obs column of the cell types", aliases=("--cell-type-key",))
    umap: bool = setting(True, "UMAPs of each held-out type's unperturbed, perturbed and predicted cells, per "
                         "method (cells.tsv; Fig. 3g)")
    focus_group: str | None = setting(None, "the held-out cell type that the per-cell views show (the paper: "
                                      "mono-1): the UMAPs are made for it alone and the figure panels fig3d / "
                                      "fig3g draw it alone (default: every held-out type)")


@dataclass
class GeneticConfig(PerturbationConfig):
    """``epiflow predict-genetic`` (``tasks.genetic``)."""

    perturbation_key: str = setting("perturbation", "obs column of the perturbation (the control label or "
                                    "gene symbols joined by '+')")
    holdout_fraction: float = setting(0.25, "fraction of the perturbations held out", exclusive_min=0, max=0.9)
    jaccard_threshold: float = setting(0.1, "gene graph: keep edges with Jaccard > this", min=0, max=1)
    gene_neighbors: int = setting(20, "gene graph: neighbours per gene", min=1, aliases=("--top-neighbours",))
    gaf_aspect: str = setting("P", "GAF files: GO aspect to keep (P = biological process)",
                              choices=("P", "F", "C"))


# ----------------------------------------------------------------------------- integration
@dataclass
class IntegrationConfig(Training, ModelRuntime):
    """``epiflow integrate`` (``tasks.integration``): training is counted in steps."""

    batch_key: str = setting("batch", "obs column with the batches (e.g. donor, or dataset for two studies)")
    label_key: str = setting("cell_type", "obs column with the cell types")
    query_label_key: str | None = setting(None, "obs column with the query's known labels (default: "
                                          "label_key)")
    k_query: int = setting(20, "reference neighbours voting per query cell", min=1)
    epochs: float = setting(1e9, "passes over the cells (the length is max_steps)", exclusive_min=0, cli=False)
    max_steps: int = setting(200, "fine-tuning steps", min=1)
    max_len: int | None = setting(None, "tokens per cell in training (default: the model's rank limit - 2, the "
                                  "paper's 8,190; longer sentences are subsampled each step)", min=1)
    max_ot_cells: int = setting(5000, "largest OT problem side", min=2)
    max_cells: int | None = setting(None, "use a random subset of N reference cells", min=1)
    common_ccres: bool = setting(False, "keep only the cCREs accessible in every batch (and restrict the "
                                 "query to them): for batches measured on different peak sets")
    lsi: bool = setting(True, "the LSI baseline")
    umap: bool = setting(True, "UMAP figures")


# ----------------------------------------------------------------------------- in-silico knockout
@dataclass
class KnockoutConfig(ModelRuntime):
    """``epiflow knockout`` (``tasks.knockout``)."""

    state_key: str = setting("state", "obs column with the states")
    state_a: str = setting("normal", "the reference state, score 0")
    state_b: str = setting("cancer", "the other state, score 1")
    genes: list[str] | None = setting(None, "genes whose promoter cCREs are the targets (comma list; needs "
                                      "--tss); GENE:BP gives that gene its own upstream window (the paper: "
                                      "ABCC1,VEGFA,EGLN3:5000)", pattern=r"[^,\s]+")
    target_ccres: list[int] | None = setting(None, "target cCRE indices (vocabulary order; comma list)", min=0,
                                             aliases=("--ccres",))
    promoter_upstream: int = setting(2000, "promoter window upstream of the TSS (bp)", min=0,
                                     aliases=("--upstream",))
    promoter_downstream: int = setting(500, "promoter window downstream of the TSS (bp)", min=0,
                                       aliases=("--downstream",))
    target_unit: str = setting("ccre", "what one knockout removes: ccre = each promoter cCRE on its own "
                               "(SPEC), gene = all promoter cCREs of a gene at once (the paper's per-promoter "
                               "knockout, Fig. 5d-e; needs --genes)", choices=("ccre", "gene"))
    group: bool = setting(False, "also knock out every target cCRE at once (the paper's 'Group' knockout, "
                          "Fig. 5d-e)")
    max_steps: int = setting(0, "fine-tune (SR + CCA) on the cells first for N steps (0: zero-shot)", min=0,
                             aliases=("--finetune-steps",))
    batch_size: int = setting(16, "cells per fine-tuning step", min=1)
    lr: float = setting(1e-4, "fine-tuning learning rate", exclusive_min=0)
    max_len: int | None = setting(None, "tokens per cell in the fine-tuning (default: the model's rank limit - 2, "
                                  "the paper's 8,190)", min=1)
    n_reference: int = setting(1000, "chimeric reference cells", min=2)
    n_query: int = setting(50, "query chimeras at score 0.5", min=1)
    n_random: int = setting(50, "random cCRE knockouts", min=2)
    n_neighbors: int = setting(20, "reference neighbours of each query cell", min=1, aliases=("--k",))
    alternative: str = setting("less", "t-test alternative: less = the knockout lowers the score more than "
                               "random", choices=("less", "greater", "two-sided"))
    figures: bool = setting(True, "write the figures")


# ----------------------------------------------------------------------------- zero-shot annotation
@dataclass
class AnnotatorConfig(Training, ModelRuntime):
    """``epiflow train-annotator`` (``tasks.zeroshot_annotation``)."""

    label_key: str = setting("cell_type", "obs column with the labels")
    classifier: str = setting("mlp", "mlp = the authors' 512-256-128-C head, linear = the paper's single "
                              "layer", choices=("mlp", "linear"))
    loss: str = setting("focal", "focal (the authors') or ce", choices=("focal", "ce"))
    epochs: float = setting(3.0, "passes over the training cells", exclusive_min=0)
    head_lr: float = setting(1e-3, "classifier learning rate", exclusive_min=0)
    freeze_encoder: bool = setting(False, "train the classifier only")
    max_len: int | None = setting(None, "tokens per cell in training (default: the model's rank limit - 2, the "
                                  "paper's 8,190; longer sentences are subsampled each step)", min=1)
    max_cells: int | None = setting(None, "train on a random subset of N cells", min=1)
    val_fraction: float = setting(0.1, "stratified held-out fraction", min=0, max=0.9)


@dataclass
class ZeroshotConfig(ModelRuntime):
    """``epiflow annotate-zeroshot`` (``tasks.zeroshot_annotation``)."""

    label_key: str | None = setting(None, "obs column with known labels to score against")
    min_class_fraction: float = setting(0.005, "mask classes predicted for fewer than this fraction of cells",
                                        min=0, max=1)
    mask: bool = setting(True, "also compute the masked predictions")
    method: str = setting("EpiAgent-zeroshot", "method name of the metric rows (e.g. EpiAgent-B, EpiAgent-NT)")
    max_len: int = setting(8190, "top tokens per cell", min=1)
    umap: bool = setting(True, "UMAP of the annotator's cell embeddings in cells.tsv")


# verb -> its settings
VERB_CONFIGS: dict[str, type] = {
    "evaluate-features": FeaturesConfig,
    "annotate": AnnotationConfig,
    "impute": ImputationConfig,
    "predict-stimulation": StimulationConfig,
    "predict-genetic": GeneticConfig,
    "integrate": IntegrationConfig,
    "knockout": KnockoutConfig,
    "train-annotator": AnnotatorConfig,
    "annotate-zeroshot": ZeroshotConfig,
}
