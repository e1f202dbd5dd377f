"""The EpiAgent paper's result panels (Figs. 2-6), drawn from the workflow's results tables.

Panel names follow the paper's letters (``../shared/docs/PAPER_FACTS.md``, "Figure panels"):

* ``fig<N><letter>`` draws the content of the paper's panel N<letter> (e.g. ``fig2c``: the EpiAgent
  UMAP beside the second-best method's);
* ``fig<N><letter>_<view>`` is a further view of the same paper panel's data (``fig2c_baselines``,
  ``fig2i_confusion``, ``fig4e_batch``);
* :data:`NOT_DRAWN` lists, in the same scheme, each paper panel (or part of one) that no table of ours
  can draw, with the reason and the drawn panels closest to it (``epiflow figure --list`` prints both;
  the workflow writes them to ``figures/panels.tsv``, in the report).

Every panel of :data:`PANELS` is one PNG (``results/figures/<panel>.png`` in the workflow, built by
``epiflow figure <panel>``). A panel only reshapes and plots tables that the task verbs wrote:

* the long metrics tables (``metrics.tsv`` of each task and ``baselines/metrics.tsv``: ``task dataset
  method metric value``),
* per-dataset task tables (``cells.tsv``, ``trajectory.tsv`` and ``paga.tsv`` of feature extraction,
  ``predictions.tsv`` of annotation, ``per_cell.tsv`` / ``per_ccre.tsv`` of imputation,
  ``mean_accessibility.tsv.gz`` of the perturbation tasks, ``cells.tsv`` (UMAPs of the reference and
  the joint UMAP of reference and query) and ``query_predictions.tsv`` of integration,
  ``knockout.tsv`` / ``random.tsv`` / ``tss_ccres.tsv`` / ``reference_cells.tsv`` / ``shifts.tsv`` of
  the knockout, ``predictions.tsv`` and ``cells.tsv`` (the UMAP of the annotator's embeddings) of
  zero-shot annotation).

No number is computed here beyond counting / row-normalising a contingency table, placing a cell
type at the mean UMAP position of its cells (fig2e), the mean position of a knockout's query cells or
of the low / high scored reference cells (fig5c, fig5d: arrows) and picking the best method by a metric the task
wrote; a panel whose tables lack what it plots raises
:class:`~epiflow.errors.EpiflowError` naming the panel and the missing task, metric or column (never an
empty or made-up figure). The zero-shot panels of the first annotator (``annotator`` option 0: Fig.
6b-d, EpiAgent-B) and of the second (1: Fig. 6e-g, EpiAgent-NT) draw the tables they are given; the
workflow passes each only its annotator's result folders. ``docs/paper.md`` maps each panel to the
paper's and says what differs.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import EpiflowError, InputFormatError
from ..metrics.table import METRIC_COLUMNS
from ..metrics.table import read_metrics as _read_one
from .embedding import _figure, category_palette, embedding_panel, save_figure

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Panel:
    """One figure panel: where its data come from and what it shows."""

    name: str  # e.g. fig2b
    benchmark: str  # report category, e.g. "Feature extraction"
    task_key: str  # config key under `tasks` whose rule writes the inputs
    metrics_task: str  # the `task` column of the metrics rows it plots ("" = none)
    tables: tuple[str, ...]  # per-dataset tables it needs besides metrics.tsv
    title: str  # what the panel shows (caption)
    paper: str  # the paper's panel it is an analogue of
    draw: str  # name of the drawing function below
    options: Mapping = field(default_factory=dict)
    baselines: bool = False  # add the baselines' metrics of `metrics_task`
    needs_metrics: bool = True


def _p(name, benchmark, task_key, metrics_task, tables, title, paper, draw, baselines=False,
       needs_metrics=True, **options) -> Panel:
    return Panel(name, benchmark, task_key, metrics_task, tuple(tables), title, paper, draw, dict(options),
                 baselines, needs_metrics)


FE, AN, IM = "Feature extraction", "Annotation", "Imputation"
ST, GE = "Stimulated perturbation", "Genetic perturbation"
IN, KO, ZS = "Integration and query mapping", "In-silico cCRE knockout", "Zero-shot annotation"

def _annotator_panels(annotator: int, letters: str, paper_name: str) -> list[Panel]:
    """The four Fig. 6 panels of one zero-shot annotator (0: the first, 6b-d; 1: the second, 6e-g):
    UMAP, Sankey (+ confusion) and the four scores."""
    which = ("first", "second")[annotator]
    u, s, m = (f"fig6{x}" for x in letters)
    return [
        _p(u, ZS, "zeroshot_annotation", "", ["cells.tsv"],
           f"UMAP of the {which} zero-shot annotator's cell embeddings (the CLS embedding its classifier reads) "
           "of its new dataset(s), coloured by the known label (mapped to the annotator's classes) and by the "
           "prediction", f"Fig. 6{letters[0]}: UMAP ({paper_name} embeddings), ground truth vs {paper_name} labels",
           "umap_truth_pred", needs_metrics=False, true="label_mapped", pred="prediction", annotator=annotator),
        _p(s, ZS, "zeroshot_annotation", "", ["predictions.tsv"],
           f"Sankey diagram of the {which} zero-shot annotator's new dataset(s): known label (mapped to the "
           f"annotator's classes) -> prediction", f"Fig. 6{letters[1]}: Sankey, ground truth -> {paper_name}",
           "sankey", needs_metrics=False, true="label_mapped", pred="prediction", annotator=annotator),
        _p(f"{s}_confusion", ZS, "zeroshot_annotation", "", ["predictions.tsv"],
           f"Zero-shot annotation confusion of the {which} annotator (rows: the dataset's own labels mapped to "
           "the annotator's classes, row-normalised)",
           f"Fig. 6{letters[1]}: ground truth vs {paper_name} (confusion)", "confusion", needs_metrics=False,
           true="label_mapped", pred="prediction", annotator=annotator),
        _p(m, ZS, "zeroshot_annotation", "zeroshot_annotation", [],
           f"Zero-shot annotation by the {which} annotator: accuracy, micro F1, balanced accuracy and macro F1",
           f"Fig. 6{letters[2]}: the four scores of {paper_name}", "bars",
           metrics=["accuracy", "micro_F1", "balanced_accuracy", "macro_F1"], annotator=annotator),
    ]


PANELS: dict[str, Panel] = {p.name: p for p in [
    # ---- Fig. 2: typical downstream tasks --------------------------------------------------------
    _p("fig2b", FE, "feature_extraction", "feature_extraction", [],
       "Leiden NMI and ARI of each embedding (EpiAgent, LSI and the baseline tools) per dataset",
       "Fig. 2b: feature extraction, NMI and ARI of every method on each dataset", "bars", baselines=True,
       metrics=["NMI", "ARI"]),
    _p("fig2b_clusters", FE, "feature_extraction", "", ["cells.tsv"],
       "Fraction of each cell type's cells in each Leiden cluster of the EpiAgent embeddings (rows: cell "
       "types, row-normalised; the clustering behind the NMI / ARI of fig2b)",
       "Fig. 2b: the clustering behind NMI / ARI", "cluster_table", needs_metrics=False, method="EpiAgent"),
    _p("fig2c", FE, "feature_extraction", "feature_extraction", ["cells.tsv"],
       "UMAP of the EpiAgent embedding of higher NMI next to that of the best other embedding of cells.tsv "
       "(NMI in metrics.tsv), coloured by cell type",
       "Fig. 2c: UMAP of EpiAgent next to the second-best method", "umap_best", metric="NMI"),
    _p("fig2c_epiagent", FE, "feature_extraction", "", ["cells.tsv"],
       "UMAP of the EpiAgent cell embeddings of each dataset, coloured by cell type",
       "Fig. 2c: UMAPs of EpiAgent embeddings", "umap", needs_metrics=False, prefix="EpiAgent",
       colour="cell_type"),
    _p("fig2c_baselines", FE, "feature_extraction", "", ["cells.tsv"],
       "UMAPs of the other embeddings of cells.tsv (LSI) of the same cells, coloured by cell type",
       "Fig. 2c: UMAPs of the other methods", "umap", needs_metrics=False, exclude_prefix="EpiAgent",
       colour="cell_type"),
    _p("fig2d", FE, "feature_extraction", "", ["trajectory.tsv", "cells.tsv"],
       "UMAP of the EpiAgent embeddings of the trajectory datasets (tasks.feature_extraction.trajectory."
       "datasets), coloured by cell type", "Fig. 2d: UMAP of EpiAgent embeddings, trajectory donor",
       "umap", needs_metrics=False, prefix="EpiAgent", colour="cell_type", only_with="trajectory.tsv"),
    _p("fig2e", FE, "feature_extraction", "", ["paga.tsv", "cells.tsv"],
       "PAGA graph of the cell types of the trajectory datasets, per EpiAgent embedding: one node per type "
       "at the mean UMAP position of its cells (size = cells), edge width = PAGA connectivity (edges under "
       "0.05 hidden; sibling types are not marked)", "Fig. 2e: PAGA trajectory graph", "paga",
       needs_metrics=False, prefix="EpiAgent", min_connectivity=0.05),
    _p("fig2f", FE, "feature_extraction", "", ["trajectory.tsv", "cells.tsv"],
       "Diffusion pseudotime (PAGA, rooted in the first type of the known order) of each cell on the UMAP "
       "of each EpiAgent embedding, trajectory datasets", "Fig. 2f: pseudotime on the UMAP",
       "pseudotime_umap", needs_metrics=False, prefix="EpiAgent"),
    _p("fig2g", FE, "feature_extraction", "trajectory", ["trajectory.tsv"],
       "Mean diffusion pseudotime (PAGA, rooted in the first type of the known order) per cell type and "
       "embedding, types in their known differentiation order; Spearman rho in the legend",
       "Fig. 2g: mean pseudotime per cell type", "trajectory"),
    _p("fig2h", AN, "annotation", "annotation", [],
       "Accuracy and macro F1 of supervised annotation on the query third of each dataset, per method",
       "Fig. 2h: supervised annotation, accuracy and macro F1 of every method", "bars", baselines=True,
       metrics=["accuracy", "macro_F1"]),
    _p("fig2h_scores", AN, "annotation", "annotation", [],
       "Every classification score of every annotation method (query cells)",
       "Fig. 2h: annotation scores", "metric_heatmap", baselines=True,
       metrics=["accuracy", "balanced_accuracy", "macro_F1", "micro_F1", "weighted_F1"]),
    _p("fig2i", AN, "annotation", "annotation", ["predictions.tsv"],
       "Sankey diagrams of the query cells: true type -> fine-tuned EpiAgent's prediction, and true type -> "
       "the prediction of the other method of predictions.tsv with the highest accuracy",
       "Fig. 2i: Sankey of ground truth, EpiAgent and the second-best method", "sankey", true="true",
       pred="pred_EpiAgent", split="query", second_best="accuracy"),
    _p("fig2i_confusion", AN, "annotation", "", ["predictions.tsv"],
       "Confusion matrix of the fine-tuned EpiAgent classifier on the query cells (rows: true type, "
       "row-normalised)", "Fig. 2i: prediction vs ground truth (confusion)", "confusion",
       needs_metrics=False, true="true", pred="pred_EpiAgent", split="query"),
    _p("fig2j", IM, "imputation", "imputation", [],
       "Clustering (PCA + bisected Leiden) NMI / ARI of the raw TF-IDF signal, the LSI reconstruction and "
       "the EpiAgent imputation (and the baseline imputation tools when configured)",
       "Fig. 2j: imputation, NMI / ARI of clustering the imputed matrix", "bars", baselines=True,
       metrics=["NMI", "ARI"]),
    _p("fig2k", IM, "imputation", "", ["per_cell.tsv"],
       "Per-cell Pearson r between each method's signal and the mean raw signal of the cell's type",
       "Fig. 2k: Pearson r with the mean raw signal of the cell's type", "per_unit_stat",
       needs_metrics=False, stat="pearson"),
    _p("fig2k_scatter", IM, "imputation", "", ["per_cell.tsv"],
       "Per-cell Pearson r of the raw signal (x) against that of the EpiAgent imputation (y), by cell type",
       "Fig. 2k: Pearson r per cell, raw vs imputed", "per_cell_scatter", needs_metrics=False,
       x="Raw", y="EpiAgent"),
    _p("fig2l", IM, "imputation", "", ["per_cell.tsv", "per_ccre.tsv"],
       "MSE against the cell types' mean signal, per cell and per cCRE, per method",
       "Fig. 2l: imputation MSE (per cell / per cCRE)", "per_unit_stat", needs_metrics=False, stat="mse"),
    _p("fig2m", IM, "imputation", "", ["per_cell.tsv", "per_ccre.tsv"],
       "Pearson r against the cell types' mean signal, per cell and per cCRE, per method",
       "Fig. 2m: imputation Pearson r (per cell / per cCRE)", "per_unit_stat", needs_metrics=False,
       stat="pearson"),
    # ---- Fig. 3: perturbations ---------------------------------------------------------------------
    _p("fig3c", ST, "stimulation", "stimulated_perturbation", [],
       "R^2 of the mean accessibility of the held-out cell type's stimulated cells, all cCREs and the "
       "top-1,000 DA cCREs, per method (EpiAgent variants and the task verb's reference predictors; "
       "averaged over held-out types by the task verb)",
       "Fig. 3c: stimulation, R^2 of mean accessibility (all / top-1,000 DA cCREs)", "bars", baselines=True,
       metrics=["R2_all", "R2_top1000"]),
    _p("fig3c_types", ST, "stimulation", "stimulated_perturbation", [],
       "R^2 over the top DA cCREs of each held-out cell type, per method",
       "Fig. 3c: R^2 per held-out cell type", "group_heatmap", baselines=True, metric="R2_top1000"),
    _p("fig3d", ST, "stimulation", "", ["mean_accessibility.tsv.gz"],
       "Predicted against observed mean accessibility of the stimulated cells per held-out cell type "
       "(EpiAgent; top DA cCREs in red; the workflow draws tasks.stimulation.focus_group alone when set, the "
       "paper's mono-1)", "Fig. 3d: predicted vs real mean accessibility", "mean_scatter",
       needs_metrics=False, method="EpiAgent", per_group=True),
    _p("fig3g", ST, "stimulation", "", ["cells.tsv"],
       "UMAP of the held-out cell type's unperturbed (blue), real stimulated (red) and predicted (green) "
       "cells, one UMAP per method of predict-stimulation and per perturbation baseline tool (scGen, scPRAM: "
       "their cells.tsv, made alike), over the top DA cCREs (predicted probabilities drawn once as 0/1 cells; "
       "PCA fitted on the real cells); the workflow draws tasks.stimulation.focus_group alone when set (the "
       "paper's mono-1)",
       "Fig. 3g: UMAP of unperturbed, perturbed and predicted cells per method", "stimulation_umap",
       needs_metrics=False, per_group=True, baseline_tables=True),
    _p("fig3e", ST, "stimulation", "stimulated_perturbation", [],
       "Direction accuracy of the top-k up / down DA cCREs against k, per method",
       "Fig. 3e: stimulation, direction accuracy vs number of top DA cCREs", "direction_lines",
       baselines=True),
    _p("fig3f", ST, "stimulation", "stimulated_perturbation", [],
       "Wasserstein distance (OT, Euclidean) between predicted and real stimulated cells over the top DA "
       "cCREs (lower is better)", "Fig. 3f: Wasserstein distance, top-1,000 DA cCREs", "bars",
       baselines=True, metrics=["wasserstein_top1000"]),
    _p("fig3h", GE, "genetic", "genetic_perturbation", [],
       "Pearson r of the mean accessibility (and of its change from the controls) over the top DA cCREs "
       "of the held-out (unseen) gene perturbations, per method",
       "Fig. 3h: unseen genetic perturbations, Pearson r", "bars", baselines=True,
       metric_patterns=[r"pearson_top\d+", r"pearson_delta_top\d+"]),
    _p("fig3i", GE, "genetic", "genetic_perturbation", [],
       "Direction accuracy of the top-k DA cCREs of the unseen gene perturbations against k, per method",
       "Fig. 3i: unseen genetic perturbations, direction accuracy", "direction_lines", baselines=True),
    # ---- Fig. 4: integration and query mapping -----------------------------------------------------
    _p("fig4c", IN, "integration", "", ["cells.tsv"],
       "UMAP of each embedding of the integrated reference (EpiAgent with and without its batch token, "
       "zero-shot EpiAgent, LSI), coloured by batch", "Fig. 4c: UMAP of the reference coloured by batch",
       "umap", needs_metrics=False, colour="batch"),
    _p("fig4d", IN, "integration", "", ["cells.tsv"],
       "The same UMAPs coloured by cell type", "Fig. 4d: UMAP of the reference coloured by cell type",
       "umap", needs_metrics=False, colour="cell_type"),
    _p("fig4e", IN, "integration", "integration", [],
       "Integration benchmark: NMI, ARI, kBET acceptance and iLISI per embedding",
       "Fig. 4e: integration, NMI, ARI, kBET, iLISI of every method", "bars", baselines=True,
       metrics=["NMI", "ARI", "kBET", "iLISI"]),
    _p("fig4e_bio", IN, "integration", "integration", [],
       "Biological conservation after batch integration: NMI, ARI and cell-type ASW per embedding",
       "Fig. 4e: integration, biological conservation", "bars", baselines=True,
       metrics=["NMI", "ARI", "ASW_cell_type"]),
    _p("fig4e_batch", IN, "integration", "integration", [],
       "Batch mixing after integration: iLISI, kBET acceptance, batch ASW and graph connectivity",
       "Fig. 4e: integration, batch mixing", "bars", baselines=True,
       metrics=["iLISI", "kBET", "batch_ASW", "graph_connectivity"]),
    _p("fig4e_tradeoff", IN, "integration", "integration", [],
       "Biological conservation (NMI) against batch mixing (iLISI), one point per embedding",
       "Fig. 4e: conservation vs mixing", "tradeoff", baselines=True, x="iLISI", y="NMI"),
    _p("fig4f", IN, "integration", "", ["cells.tsv", "query_predictions.tsv"],
       "Reference and query cells on one UMAP of the batch-corrected EpiAgent embeddings (reference cells "
       "with their batch token, query cells without), reference coloured by batch, the query in its own "
       "colour (black)", "Fig. 4f: reference and query cells together (query in its own colour)",
       "joint_umap", needs_metrics=False, colour="batch"),
    _p("fig4g", IN, "integration", "", ["cells.tsv", "query_predictions.tsv"],
       "The query cells on the same joint UMAP coloured by the label transferred from their 20 nearest "
       "reference cells (batch-corrected EpiAgent; reference cells grey), beside their known labels when "
       "the query has them", "Fig. 4g: query cells with transferred labels", "joint_umap",
       needs_metrics=False, colour="prediction"),
    _p("fig4g_scores", IN, "integration", "query_mapping", [],
       "Query mapping: accuracy and macro F1 of labels transferred from the 20 nearest reference cells",
       "Fig. 4g: query cells with transferred labels (scores)", "bars", metrics=["accuracy", "macro_F1"]),
    _p("fig4g_confusion", IN, "integration", "", ["query_predictions.tsv"],
       "Query mapping confusion (batch-corrected EpiAgent; rows: true type, row-normalised)",
       "Fig. 4g: query cells with transferred labels (confusion)", "confusion", needs_metrics=False,
       true="label", pred="pred_EpiAgent-BC"),
    # ---- Fig. 5: in-silico cCRE knockout -------------------------------------------------------------
    _p("fig5b", KO, "knockout", "", ["tss_ccres.tsv"],
       "Fraction of accessible cells of each state (blue: state A; red: state B; the paper: normal, cancer) at every "
       "cCRE within 10 kb of each target gene's promoter window (shaded), by position relative to the TSS; "
       "the knocked-out promoter cCREs starred", "Fig. 5b: accessibility of the cCREs upstream of the TSS "
       "of the target genes, the chosen promoter cCREs marked", "knockout_tss", needs_metrics=False),
    _p("fig5c", KO, "knockout", "", ["reference_cells.tsv"],
       "UMAP of the chimeric reference cells coloured by their cancerization score (the fraction of "
       "cCREs drawn from the state-B cell); arrow: mean position of the cells scored < 0.25 -> > 0.75",
       "Fig. 5c: reference of chimeric cells coloured by cancerization score", "knockout_reference",
       needs_metrics=False),
    _p("fig5d", KO, "knockout", "", ["reference_cells.tsv", "shifts.tsv"],
       "Shift of the query cells (score 0.5) on the reference UMAP when each target (a gene's promoter "
       "cCREs together with target_unit gene, as in the paper, else each promoter cCRE; and all together: "
       "Group) is knocked out: a query cell's position = the mean UMAP position of its 20 nearest "
       "reference cells, with the target accessible (open) -> removed (filled); green arrow: the mean shift",
       "Fig. 5d: shifts of query cells after each promoter knockout and the Group knockout",
       "knockout_shifts", needs_metrics=False),
    _p("fig5e", KO, "knockout", "knockout", ["knockout.tsv"],
       "Change of the mean cancerization score of the 20 nearest reference cells when each target (a "
       "gene's promoter cCREs together with target_unit gene, as in the paper, else each promoter cCRE; "
       "and all together: Group) is knocked out: mean +- SD over the query cells, the mean of the random "
       "knockouts (a mark per target: random sets of as many cCREs, when a target has several; else one "
       "dashed line: random single cCREs) and the one-sided t-test p against them",
       "Fig. 5e: change of cancerization score per knockout vs random knockouts", "knockout_bars"),
    _p("fig5e_pvalue", KO, "knockout", "knockout", [],
       "-log10 p of the one-sided t-test of each target knockout against the random knockouts of as many "
       "cCREs",
       "Fig. 5e: one-sided t-test of each knockout", "knockout_pvalues"),
    _p("fig5e_random", KO, "knockout", "knockout", ["random.tsv"],
       "Distribution of random-knockout effects (per number of cCREs removed) with the targets' effects "
       "marked",
       "Fig. 5e: targets against random knockouts", "knockout_random"),
    # ---- Fig. 6: zero-shot annotators (first annotator: 6b-d, second: 6e-g) -----------------------
    *_annotator_panels(0, "bcd", "EpiAgent-B"),
    *_annotator_panels(1, "efg", "EpiAgent-NT"),
]}


@dataclass(frozen=True)
class NotDrawn:
    """A paper panel (or part of one) that no table of ours can draw, and why."""

    name: str  # the name the panel would have (same scheme as PANELS)
    paper: str  # the paper's panel and what it shows
    reason: str  # why it is not drawn
    instead: tuple[str, ...] = ()  # drawn panels showing related content


NOT_DRAWN: dict[str, NotDrawn] = {n.name: n for n in [
    NotDrawn("fig2f_clockdml", "Fig. 2e-f: the ClockDML information the paper's pseudotime also uses",
             "no ClockDML (methylation clock) data or method in epiflow (PAPER_FACTS: not reproducible without "
             "it); fig2e-g use PAGA + diffusion pseudotime only", ("fig2e", "fig2f", "fig2g")),
    NotDrawn("fig4h", "Fig. 4h: marker-gene expression of the query's predicted types",
             "needs the query's RNA expression (a multiome dataset's gene counts); epiflow reads only "
             "chromatin accessibility", ()),
]}

# The paper's result panels (PAPER_FACTS "Figure panels"; the 'a' panels and Fig. 1 are schematics).
PAPER_PANELS: dict[str, str] = {"fig2": "bcdefghijklm", "fig3": "cdefghi", "fig4": "cdefgh", "fig5": "bcde",
                                "fig6": "bcdefg"}
PANEL_NAME = re.compile(r"^(fig[2-6])([a-m])(?:_([a-z0-9]+))?$")


def paper_letter(name: str) -> str:
    """``fig2c_baselines`` -> ``fig2c``: the paper panel a panel name belongs to."""
    m = PANEL_NAME.match(name)
    if not m:
        raise EpiflowError(f"panel name '{name}' is not fig<N><letter>[_<view>]", field="panel")
    return m.group(1) + m.group(2)


# ----------------------------------------------------------------------------- reading
def read_metrics(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Concatenate long metrics tables (``task dataset method metric value``)."""
    parts = [_read_one(p) for p in paths]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=METRIC_COLUMNS)


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t", low_memory=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputFormatError(f"cannot read table ({exc})", path=path,
                               fix="pass the table written by the task verb") from None


def table_name(path: str | os.PathLike) -> str:
    """The name a panel asks for: the file name (``cells.tsv``, ``mean_accessibility.tsv.gz``)."""
    return Path(path).name


# ----------------------------------------------------------------------------- helpers
def _method_order(methods) -> list[str]:
    ms = list(dict.fromkeys(str(m) for m in methods))
    return sorted(ms, key=lambda m: (not m.startswith("EpiAgent"), m))


def _palette(methods) -> dict[str, str]:
    order = _method_order(methods)
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["tab10" if len(order) <= 10 else "tab20"]
    return {m: to_hex(cmap(i % cmap.N)) for i, m in enumerate(order)}


def _require(cond: bool, panel: Panel, what: str, fix: str) -> None:
    if not cond:
        raise EpiflowError(f"figure {panel.name}: {what}", field=panel.name, fix=fix)


def _task_rows(panel: Panel, metrics: pd.DataFrame) -> pd.DataFrame:
    rows = metrics[metrics["task"] == panel.metrics_task]
    _require(len(rows) > 0, panel, f"no '{panel.metrics_task}' rows in the metrics tables",
             f"run the task of config tasks.{panel.task_key} first and pass its metrics.tsv")
    return rows


def _select_metrics(panel: Panel, rows: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(rows["metric"].astype(str)))
    if "metrics" in panel.options:
        names = [m for m in panel.options["metrics"] if m in present]
    else:
        pats = [re.compile(p + "$") for p in panel.options.get("metric_patterns", [])]
        names = [m for pat in pats for m in present if pat.match(m)]
    wanted = panel.options.get("metrics") or panel.options.get("metric_patterns")
    _require(bool(names), panel, f"none of the metrics {wanted} among the '{panel.metrics_task}' rows",
             "pass the metrics.tsv of the task this panel plots")
    return names


def _bar_axes(ax, data: pd.DataFrame, methods: list[str], palette, metric: str) -> None:
    """Grouped bars: x = dataset, one bar per method."""
    datasets = list(dict.fromkeys(data["dataset"]))
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        vals = [data[(data["dataset"] == d) & (data["method"] == m)]["value"].mean() for d in datasets]
        x = np.arange(len(datasets)) + (j - (len(methods) - 1) / 2) * width
        ax.bar(x, np.nan_to_num(vals, nan=0.0), width=width, color=palette[m], label=m)
        for xi, v in zip(x, vals):
            if np.isfinite(v):
                ax.annotate(f"{v:.2f}", (xi, v), ha="center", va="bottom", fontsize=6, rotation=90,
                            xytext=(0, 1), textcoords="offset points")
    ax.set_xticks(np.arange(len(datasets)))
    ax.set_xticklabels(datasets, rotation=30, ha="right", fontsize=8)
    ax.set_title(metric, fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)


def _heatmap(fig, ax, mat: np.ndarray, rows, cols, *, cmap="viridis", fmt="{:.2f}", vmin=None, vmax=None,
             label=""):
    im = ax.imshow(mat, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=8)
    if mat.size <= 400:
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                if np.isfinite(mat[i, j]):
                    r, g, b, _ = im.cmap(im.norm(mat[i, j]))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                    ax.text(j, i, fmt.format(mat[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
    fig.colorbar(im, ax=ax, shrink=0.8, label=label)


# ----------------------------------------------------------------------------- drawing functions
def draw_bars(panel: Panel, metrics: pd.DataFrame, tables) -> object:
    rows = _task_rows(panel, metrics)
    names = _select_metrics(panel, rows)
    rows = rows[rows["metric"].isin(names)]
    methods = _method_order(rows["method"])
    pal = _palette(methods)
    n_ds = rows["dataset"].nunique()
    fig = _figure(max(3.2, 0.9 + 0.35 * n_ds * len(methods)) * len(names) + 1.8, 3.8)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, metric in zip(axes, names):
        _bar_axes(ax, rows[rows["metric"] == metric], methods, pal, metric)
    handles = [axes[0].bar([0], [0], color=pal[m], label=m) for m in methods]
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False, title="method")
    return fig


def draw_metric_heatmap(panel: Panel, metrics: pd.DataFrame, tables) -> object:
    rows = _task_rows(panel, metrics)
    names = _select_metrics(panel, rows)
    rows = rows[rows["metric"].isin(names)]
    datasets = list(dict.fromkeys(rows["dataset"]))
    fig = _figure(1.6 + 0.8 * len(names), 0.9 + 2.6 * len(datasets))
    axes = fig.subplots(len(datasets), 1, squeeze=False)[:, 0]
    for ax, ds in zip(axes, datasets):
        part = rows[rows["dataset"] == ds]
        wide = part.pivot_table(index="method", columns="metric", values="value", aggfunc="mean")
        wide = wide.reindex(index=_method_order(wide.index), columns=[m for m in names if m in wide.columns])
        _heatmap(fig, ax, wide.to_numpy(float), list(wide.index), list(wide.columns), vmin=0, vmax=1)
        ax.set_title(ds, fontsize=10)
    return fig


def draw_direction_lines(panel: Panel, metrics: pd.DataFrame, tables) -> object:
    rows = _task_rows(panel, metrics)
    pat = re.compile(r"dir_acc@(\d+)$")
    sel = rows[rows["metric"].astype(str).str.match(pat)].copy()
    _require(len(sel) > 0, panel, "no dir_acc@k rows", "pass the metrics.tsv of the perturbation task")
    sel["k"] = sel["metric"].str.extract(pat, expand=False).astype(int)
    methods = _method_order(sel["method"])
    pal = _palette(methods)
    datasets = list(dict.fromkeys(sel["dataset"]))
    fig = _figure(4.2 * len(datasets) + 1.8, 3.6)
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, ds in zip(axes, datasets):
        for m in methods:
            part = sel[(sel["dataset"] == ds) & (sel["method"] == m)].groupby("k")["value"].mean()
            if len(part):
                ax.plot(part.index, part.to_numpy(), marker="o", color=pal[m], label=m)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        ax.set_xlabel("top-k DA cCREs", fontsize=9)
        ax.set_ylabel("direction accuracy", fontsize=9)
        ax.set_title(ds, fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    return fig


def draw_group_heatmap(panel: Panel, metrics: pd.DataFrame, tables) -> object:
    rows = _task_rows(panel, metrics)
    metric = panel.options["metric"]
    pat = re.compile(re.escape(metric) + r"\[(.+)\]$")
    sel = rows[rows["metric"].astype(str).str.match(pat)].copy()
    _require(len(sel) > 0, panel, f"no per-group '{metric}[<group>]' rows",
             "pass the metrics.tsv of the perturbation task")
    sel["group"] = sel["metric"].str.extract(pat, expand=False)
    datasets = list(dict.fromkeys(sel["dataset"]))
    fig = _figure(2.0 + 0.7 * sel["group"].nunique(), 0.9 + 2.4 * len(datasets))
    axes = fig.subplots(len(datasets), 1, squeeze=False)[:, 0]
    for ax, ds in zip(axes, datasets):
        wide = sel[sel["dataset"] == ds].pivot_table(index="method", columns="group", values="value",
                                                      aggfunc="mean")
        wide = wide.reindex(index=_method_order(wide.index))
        _heatmap(fig, ax, wide.to_numpy(float), list(wide.index), list(wide.columns), label=metric)
        ax.set_title(f"{ds}: {metric} per held-out group", fontsize=10)
    return fig


def draw_tradeoff(panel: Panel, metrics: pd.DataFrame, tables) -> object:
    rows = _task_rows(panel, metrics)
    x, y = panel.options["x"], panel.options["y"]
    wide = rows[rows["metric"].isin([x, y])].pivot_table(index=["dataset", "method"], columns="metric",
                                                         values="value", aggfunc="mean")
    _require(x in wide.columns and y in wide.columns, panel, f"needs both '{x}' and '{y}' rows",
             "pass the integration metrics.tsv")
    methods = _method_order(wide.index.get_level_values("method"))
    pal = _palette(methods)
    datasets = list(dict.fromkeys(wide.index.get_level_values("dataset")))
    fig = _figure(4.0 * len(datasets) + 1.8, 3.8)
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, ds in zip(axes, datasets):
        part = wide.loc[ds]
        for m in methods:
            if m in part.index:
                ax.scatter(part.loc[m, x], part.loc[m, y], s=60, color=pal[m], label=m, edgecolors="black",
                           linewidths=0.5)
        ax.set_xlabel(f"{x} (batch mixing)", fontsize=9)
        ax.set_ylabel(f"{y} (biological conservation)", fontsize=9)
        ax.set_title(ds, fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    return fig


def _tables_named(panel: Panel, tables, name: str) -> dict[str, pd.DataFrame]:
    got = {ds: t[name] for ds, t in tables.items() if name in t}
    _require(bool(got), panel, f"no '{name}' table given",
             f"pass --table DATASET=<results>/tasks/{panel.task_key}/DATASET/{name}")
    return got


def _need_columns(panel: Panel, df: pd.DataFrame, cols, name: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    _require(not missing, panel, f"table {name} lacks column(s) {', '.join(missing)}",
             f"pass the {name} written by the task verb")


def _umap_methods(df: pd.DataFrame) -> list[str]:
    """Methods with both UMAP columns in a cells.tsv (``umap1_<method>``, ``umap2_<method>``)."""
    return [c[len("umap1_"):] for c in df.columns
            if c.startswith("umap1_") and f"umap2_{c[len('umap1_'):]}" in df.columns]


def _pick(panel: Panel, found: Sequence[str]) -> list[str]:
    """The methods of ``found`` that the panel's ``prefix`` / ``exclude_prefix`` options keep."""
    pre, ex = panel.options.get("prefix"), panel.options.get("exclude_prefix")
    return [m for m in found if (pre is None or m.startswith(pre)) and (ex is None or not m.startswith(ex))]


def _cells_tables(panel: Panel, tables) -> dict[str, pd.DataFrame]:
    """The cells.tsv tables of the datasets the panel draws (``only_with``: those that also have that
    table, e.g. the trajectory datasets)."""
    cells = _tables_named(panel, tables, "cells.tsv")
    only = panel.options.get("only_with")
    if only:
        have = _tables_named(panel, tables, only)
        cells = {ds: df for ds, df in cells.items() if ds in have}
        _require(bool(cells), panel, f"no dataset has both cells.tsv and {only}",
                 f"pass cells.tsv and {only} of the same dataset")
    return cells


def _grid_axes(grid, col_width: float, extra_width: float, row_height: float = 4.0):
    """A figure with one row per dataset and one axes per item (``grid`` = [(dataset, table, items)],
    items e.g. methods, genes or knockouts; unused axes hidden) and its cells ``(ax, dataset, table,
    item, column, last_in_row)``."""
    n_cols = max(len(m) for _, _, m in grid)
    fig = _figure(col_width * n_cols + extra_width, row_height * len(grid))
    axes = fig.subplots(len(grid), n_cols, squeeze=False)
    cells = []
    for r, (ds, df, items) in enumerate(grid):
        for c in range(n_cols):
            if c >= len(items):
                axes[r, c].set_axis_off()
            else:
                cells.append((axes[r, c], ds, df, items[c], c, c == len(items) - 1))
    return fig, cells


def _umap_grid(panel: Panel, grid, colour: str) -> object:
    """One row per dataset, one UMAP per method: ``grid`` = [(dataset, cells table, methods)]."""
    labels_all = np.concatenate([df[colour].astype(str).to_numpy() for _, df, _ in grid])
    pal = category_palette(labels_all)
    fig, spots = _grid_axes(grid, 4.2, 1.8)
    for ax, ds, df, m, _, last in spots:
        embedding_panel(ax, df[[f"umap1_{m}", f"umap2_{m}"]].to_numpy(float), df[colour].astype(str),
                        palette=pal, title=f"{m} on {ds}", legend=last, legend_title=colour.replace("_", " "))
    return fig


def draw_umap(panel: Panel, metrics, tables) -> object:
    colour = panel.options.get("colour", "cell_type")
    grid = []
    for ds, df in _cells_tables(panel, tables).items():
        if "role" in df.columns:  # integration's cells.tsv: the query rows belong to the joint UMAP only
            df = df[df["role"].astype(str) == "reference"]
        found = _umap_methods(df)
        methods = _pick(panel, found)
        _require(bool(methods), panel, f"cells.tsv of {ds} has no umap1_<method> column of the methods this "
                 f"panel shows (has: {found})", "run evaluate-features with UMAPs")
        _need_columns(panel, df, [colour], "cells.tsv")
        grid.append((ds, df, methods))
    return _umap_grid(panel, grid, colour)


_QUERY_COLOUR, _BACKGROUND = "#000000", "#d9d9d9"


def draw_joint_umap(panel: Panel, metrics, tables) -> object:
    """The joint UMAP of reference and query (integration's cells.tsv, ``joint_umap1`` / ``joint_umap2``):
    ``colour`` batch: every cell, reference by batch, the query black (fig4f); ``colour`` prediction: the
    query coloured by its transferred label over the grey reference, beside its known labels if any (fig4g)."""
    colour = panel.options["colour"]
    grid = []
    for ds, df in _tables_named(panel, tables, "cells.tsv").items():
        _need_columns(panel, df, ["role", "batch", "joint_umap1", "joint_umap2"], "cells.tsv")
        q = df["role"].astype(str) == "query"
        _require(bool(q.any()) and df.loc[q, "joint_umap1"].notna().all(), panel,
                 f"cells.tsv of {ds} has no query cells on the joint UMAP",
                 "run integrate with --query and UMAPs on")
        views = [colour]
        if colour == "prediction":
            _need_columns(panel, df, ["prediction", "cell_type"], "cells.tsv")
            if df.loc[q, "cell_type"].notna().any():
                views.append("cell_type")
        grid.append((ds, df, q.to_numpy(), views))
    n_cols = max(len(v) for *_, v in grid)
    fig = _figure(5.4 * n_cols + 0.6, 4.4 * len(grid))
    axes = fig.subplots(len(grid), n_cols, squeeze=False)
    for r, (ds, df, q, views) in enumerate(grid):
        xy = df[["joint_umap1", "joint_umap2"]].to_numpy(float)
        for c in range(n_cols):
            ax = axes[r, c]
            if c >= len(views):
                ax.set_axis_off()
                continue
            if views[c] == "batch":
                lab = np.where(q, "query", df["batch"].astype(str).to_numpy())
                pal = category_palette(lab[~q])
                pal["query"] = _QUERY_COLOUR
                embedding_panel(ax, xy, lab, palette=pal, legend_title="reference batch / query",
                                title=f"{ds}: reference ({int((~q).sum())} cells) and query ({int(q.sum())})")
                continue
            col = views[c]
            lab = df.loc[q, col].astype(str).where(df.loc[q, col].notna(), "unlabelled").to_numpy()
            ref_types = df.loc[~q, "cell_type"].astype(str)
            pal = category_palette(np.concatenate([ref_types.to_numpy(), df.loc[q, "prediction"].astype(str)]))
            pal["unlabelled"] = "#7f7f7f"
            size = float(np.clip(3000.0 / max(len(df), 1), 1.0, 25.0))
            ax.scatter(xy[~q, 0], xy[~q, 1], c=_BACKGROUND, s=size, linewidths=0, rasterized=True)
            embedding_panel(ax, xy[q], lab, palette=pal, point_size=size,
                            legend_title="transferred label" if col == "prediction" else "known label",
                            title=f"{ds}: query cells, " + ("transferred label" if col == "prediction" else
                                                            "known label") + " (reference grey)")
    return fig


def draw_umap_truth_pred(panel: Panel, metrics, tables) -> object:
    """The UMAP of cells.tsv (``umap1`` / ``umap2``) coloured by the known label and by the prediction
    (zero-shot annotation, fig6b / fig6e), one row per dataset; cells without a mapped label grey."""
    t, p = panel.options["true"], panel.options["pred"]
    frames = _tables_named(panel, tables, "cells.tsv")
    for ds, df in frames.items():
        _need_columns(panel, df, ["umap1", "umap2", t, p], "cells.tsv")
        _require(bool(df[t].notna().any()), panel, f"no cell of {ds} has a known label ({t})",
                 "annotate with --label-key (and a --label-map onto the annotator's classes)")
    labels = np.concatenate([np.concatenate([df[t].dropna().astype(str), df[p].dropna().astype(str)])
                             for df in frames.values()])
    pal = category_palette(labels)
    pal["unlabelled"] = _BACKGROUND
    fig = _figure(2 * 5.4 + 0.6, 4.4 * len(frames))
    axes = fig.subplots(len(frames), 2, squeeze=False)
    for r, (ds, df) in enumerate(frames.items()):
        xy = df[["umap1", "umap2"]].to_numpy(float)
        for ax, col, what in ((axes[r, 0], t, "ground truth"), (axes[r, 1], p, "prediction")):
            lab = df[col].astype(str).where(df[col].notna(), "unlabelled").to_numpy()
            embedding_panel(ax, xy, lab, palette=pal, legend_title=what,
                            title=f"{ds}: {what}" + (f" ({col})" if col != what else ""))
    return fig


def _best(rows: pd.DataFrame, dataset: str, metric: str, candidates: Sequence[str], key=str) -> str | None:
    """The candidate with the highest ``metric`` among the metrics rows of ``dataset`` (``key`` maps a
    metrics method name to a candidate's name); None when none of them has the metric."""
    part = rows[(rows["dataset"] == dataset) & (rows["metric"] == metric)]
    vals = {key(m): float(v) for m, v in zip(part["method"], part["value"]) if key(m) in candidates}
    vals = {m: v for m, v in vals.items() if np.isfinite(v)}
    return max(vals, key=lambda m: vals[m]) if vals else None


def draw_umap_best(panel: Panel, metrics: pd.DataFrame, tables) -> object:
    """EpiAgent's UMAP beside the best other embedding's (by ``metric``), one row per dataset."""
    from ..tasks.features import _slug

    rows = _task_rows(panel, metrics)
    metric = panel.options["metric"]
    grid = []
    for ds, df in _cells_tables(panel, tables).items():
        _need_columns(panel, df, ["cell_type"], "cells.tsv")
        found = _umap_methods(df)
        ours = [m for m in found if m.startswith("EpiAgent")]
        others = [m for m in found if not m.startswith("EpiAgent")]
        _require(bool(ours) and bool(others), panel, f"cells.tsv of {ds} needs the UMAP of an EpiAgent "
                 f"embedding and of another embedding (has: {found})", "run evaluate-features with UMAPs")
        pair = [_best(rows, ds, metric, ours, key=_slug), _best(rows, ds, metric, others, key=_slug)]
        _require(None not in pair, panel, f"no '{metric}' rows of {ds} for the embeddings of its cells.tsv "
                 f"({found})", "pass the metrics.tsv of the same feature-extraction folder")
        grid.append((ds, df, pair))
    return _umap_grid(panel, grid, "cell_type")


def draw_pseudotime_umap(panel: Panel, metrics, tables) -> object:
    """The UMAP of each EpiAgent embedding coloured by its diffusion pseudotime (trajectory datasets)."""
    cells = _tables_named(panel, tables, "cells.tsv")
    have = _tables_named(panel, tables, "trajectory.tsv")
    grid = []
    for ds, df in cells.items():
        if ds not in have:
            continue
        found = [m for m in _umap_methods(df) if f"pseudotime_{m}" in df.columns]
        methods = _pick(panel, found)
        _require(bool(methods), panel, f"cells.tsv of {ds} has no umap1_ / umap2_ / pseudotime_<method> "
                 "columns of an EpiAgent embedding", "run evaluate-features with the trajectory and UMAPs")
        grid.append((ds, df, methods))
    _require(bool(grid), panel, "no dataset has both cells.tsv and trajectory.tsv",
             "pass cells.tsv and trajectory.tsv of the trajectory datasets")
    fig, spots = _grid_axes(grid, 4.6, 0.6)
    for ax, ds, df, m, _, _ in spots:
        xy = df[[f"umap1_{m}", f"umap2_{m}"]].to_numpy(float)
        pt = df[f"pseudotime_{m}"].to_numpy(float)
        ok = np.isfinite(pt)
        size = float(np.clip(3000.0 / max(len(pt), 1), 1.0, 25.0))
        ax.scatter(xy[~ok, 0], xy[~ok, 1], c="#d0d0d0", s=size, linewidths=0, rasterized=True)
        sca = ax.scatter(xy[ok, 0], xy[ok, 1], c=pt[ok], cmap="viridis", s=size, linewidths=0,
                         rasterized=True)
        fig.colorbar(sca, ax=ax, shrink=0.8, label="diffusion pseudotime")
        ax.set_title(f"{m} on {ds}" + (f" ({int((~ok).sum())} cells unreached, grey)" if (~ok).any() else ""),
                     fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP1", fontsize=9)
        ax.set_ylabel("UMAP2", fontsize=9)
    return fig


def draw_paga(panel: Panel, metrics, tables) -> object:
    """The PAGA graph of paga.tsv drawn at the cell types' mean UMAP positions (cells.tsv)."""
    cells = _tables_named(panel, tables, "cells.tsv")
    pagas = _tables_named(panel, tables, "paga.tsv")
    grid = []
    for ds, paga in pagas.items():
        _need_columns(panel, paga, ["method", "type_a", "type_b", "connectivity"], "paga.tsv")
        _require(ds in cells, panel, f"no cells.tsv of {ds} beside its paga.tsv",
                 "pass cells.tsv and paga.tsv of the same dataset")
        df = cells[ds]
        _need_columns(panel, df, ["cell_type"], "cells.tsv")
        methods = [m for m in _pick(panel, list(dict.fromkeys(paga["method"].astype(str))))
                   if m in _umap_methods(df)]
        _require(bool(methods), panel, f"no EpiAgent embedding of {ds} has both PAGA rows and UMAP columns",
                 "run evaluate-features with the trajectory and UMAPs")
        grid += [(ds, m, df, paga[paga["method"].astype(str) == m]) for m in methods]
    pal = category_palette(np.concatenate([df["cell_type"].astype(str).to_numpy() for _, _, df, _ in grid]))
    lo = panel.options.get("min_connectivity", 0.0)
    n_cols = min(len(grid), 3)
    n_rows = int(np.ceil(len(grid) / n_cols))
    fig = _figure(4.8 * n_cols, 4.4 * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, (ds, m, df, paga) in zip(axes, grid):
        lab = df["cell_type"].astype(str)
        xy = df[[f"umap1_{m}", f"umap2_{m}"]].astype(float)
        cen = xy.groupby(lab.to_numpy()).mean()
        size = lab.value_counts()
        for _, r in paga.iterrows():
            a, b, w = str(r["type_a"]), str(r["type_b"]), float(r["connectivity"])
            if w >= lo and a in cen.index and b in cen.index:
                ax.plot(cen.loc[[a, b]].iloc[:, 0], cen.loc[[a, b]].iloc[:, 1], c="black", lw=0.5 + 6 * w,
                        alpha=0.6, zorder=1)
        s = 80 + 600 * size.reindex(cen.index).to_numpy(float) / max(float(size.max()), 1.0)
        ax.scatter(cen.iloc[:, 0], cen.iloc[:, 1], s=s, c=[pal[t] for t in cen.index], edgecolors="black",
                   linewidths=0.6, zorder=2)
        for (t, (x, y)), si in zip(cen.iterrows(), s):
            ax.annotate(str(t), (x, y), fontsize=8, ha="center", va="bottom", xytext=(0, 2 + 0.5 * np.sqrt(si)),
                        textcoords="offset points", zorder=3)
        ax.margins(0.15)
        ax.set_title(f"{m} on {ds}: PAGA graph (edge width = connectivity)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP1", fontsize=9)
        ax.set_ylabel("UMAP2", fontsize=9)
    for ax in axes[len(grid):]:
        ax.set_axis_off()
    return fig


def draw_sankey(panel: Panel, metrics: pd.DataFrame, tables) -> object:
    """True label -> prediction flows per dataset (and, with ``second_best``, beside the flows of the
    other prediction column whose method scores best on that metric)."""
    from .annotation import sankey_axes

    name = panel.tables[0]
    frames = _tables_named(panel, tables, name)
    t, p = panel.options["true"], panel.options["pred"]
    second = panel.options.get("second_best")
    rows = _task_rows(panel, metrics) if second else None
    grid = []
    for ds, df in frames.items():
        _need_columns(panel, df, [t, p], name)
        if panel.options.get("split") and "split" in df.columns:
            df = df[df["split"] == panel.options["split"]]
        cols = [p]
        if second:
            others = [c[len("pred_"):] for c in df.columns if c.startswith("pred_") and c != p]
            best = _best(rows, ds, second, others) if others else None
            _require(best is not None, panel, f"{name} of {ds} has no other pred_<method> column with a "
                     f"'{second}' row in the metrics", "pass the annotation predictions.tsv and metrics.tsv")
            cols.append(f"pred_{best}")
        for col in cols:
            part = df[df[t].notna() & df[col].notna()]
            _require(len(part) > 0, panel, f"no labelled cells in {name} of {ds}", "check the label column")
            grid.append((ds, col, part))
    n_cols = 2 if second else min(len(grid), 2)
    n_rows = int(np.ceil(len(grid) / n_cols))
    k = max(max(part[t].nunique(), part[col].nunique()) for _, col, part in grid)
    fig = _figure(6.4 * n_cols, max(4.0, 0.35 * k + 2) * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, (ds, col, part) in zip(axes, grid):
        method = col[len("pred_"):] if col.startswith("pred_") else col
        sankey_axes(ax, part[t].astype(str).to_numpy(), part[col].astype(str).to_numpy(),
                    title=f"{ds}: {t} -> {method} ({len(part)} cells)", left_title=t, right_title=method)
    for ax in axes[len(grid):]:
        ax.set_axis_off()
    return fig


def draw_cluster_table(panel: Panel, metrics, tables) -> object:
    cells = _tables_named(panel, tables, "cells.tsv")
    m = panel.options["method"]
    fig = _figure(0.5 + 5.2 * len(cells), 4.4)
    axes = fig.subplots(1, len(cells), squeeze=False)[0]
    for ax, (ds, df) in zip(axes, cells.items()):
        _need_columns(panel, df, ["cell_type", f"leiden_{m}"], "cells.tsv")
        tab = pd.crosstab(df["cell_type"].astype(str), df[f"leiden_{m}"].astype(str))
        tab = tab[sorted(tab.columns, key=lambda c: (len(c), c))]
        frac = tab.div(tab.sum(axis=1), axis=0)
        _heatmap(fig, ax, frac.to_numpy(float), list(frac.index), list(frac.columns), cmap="Blues",
                 vmin=0, vmax=1, label="fraction of the type's cells")
        ax.set_xlabel(f"Leiden cluster ({m})", fontsize=9)
        ax.set_title(ds, fontsize=10)
    return fig


def draw_confusion(panel: Panel, metrics, tables) -> object:
    name = panel.tables[0]
    preds = _tables_named(panel, tables, name)
    t, p = panel.options["true"], panel.options["pred"]
    fig = _figure(0.5 + 5.4 * len(preds), 4.8)
    axes = fig.subplots(1, len(preds), squeeze=False)[0]
    for ax, (ds, df) in zip(axes, preds.items()):
        _need_columns(panel, df, [t, p], name)
        if panel.options.get("split") and "split" in df.columns:
            df = df[df["split"] == panel.options["split"]]
        df = df[df[t].notna() & df[p].notna()]
        _require(len(df) > 0, panel, f"no labelled cells in {name} of {ds}", "check the label column")
        classes = sorted(set(df[t].astype(str)) | set(df[p].astype(str)))
        tab = pd.crosstab(df[t].astype(str), df[p].astype(str)).reindex(index=sorted(set(df[t].astype(str))),
                                                                         columns=classes, fill_value=0)
        frac = tab.div(tab.sum(axis=1).replace(0, np.nan), axis=0)
        _heatmap(fig, ax, frac.to_numpy(float), list(frac.index), list(frac.columns), cmap="Blues", vmin=0,
                 vmax=1, label="fraction of the true type")
        ax.set_xlabel(f"predicted ({p})", fontsize=9)
        ax.set_ylabel(f"true ({t})", fontsize=9)
        ax.set_title(f"{ds} ({len(df)} cells)", fontsize=10)
    return fig


def draw_trajectory(panel: Panel, metrics: pd.DataFrame, tables) -> object:
    trajs = _tables_named(panel, tables, "trajectory.tsv")
    fig = _figure(0.5 + 5.0 * len(trajs), 3.8)
    axes = fig.subplots(1, len(trajs), squeeze=False)[0]
    rho = metrics[(metrics["task"] == "trajectory") & (metrics["metric"] == "spearman_types")]
    for ax, (ds, df) in zip(axes, trajs.items()):
        _need_columns(panel, df, ["method", "cell_type", "mean_pseudotime"], "trajectory.tsv")
        methods = _method_order(df["method"])
        pal = _palette(methods)
        order = list(dict.fromkeys(df.sort_values(["tier", "mean_pseudotime"] if "tier" in df else
                                                  ["mean_pseudotime"])["cell_type"]))
        for m in methods:
            part = df[df["method"] == m].set_index("cell_type").reindex(order)
            r = rho[(rho["dataset"] == ds) & (rho["method"] == m)]["value"]
            lab = f"{m} (rho {float(r.iloc[0]):.2f})" if len(r) else m
            ax.plot(range(len(order)), part["mean_pseudotime"].to_numpy(float), marker="o", color=pal[m],
                    label=lab)
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(order, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("mean pseudotime", fontsize=9)
        ax.set_title(ds, fontsize=10)
        ax.legend(fontsize=7, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
    return fig


def _method_columns(df: pd.DataFrame, prefix: str) -> list[str]:
    return _method_order([c[len(prefix):] for c in df.columns if c.startswith(prefix)])


_UNITS = {"per_cell.tsv": "cell", "per_ccre.tsv": "cCRE"}


def draw_per_unit_stat(panel: Panel, metrics, tables) -> object:
    """Box plots of one imputation statistic (``stat``: pearson or mse) per method: one row per dataset,
    one column per table of the panel (per cell, per cCRE)."""
    stat = panel.options["stat"]
    label = {"pearson": "Pearson r", "mse": "MSE"}[stat]
    frames = {name: _tables_named(panel, tables, name) for name in panel.tables}
    datasets = list(dict.fromkeys(ds for f in frames.values() for ds in f))
    fig = _figure(0.5 + 3.8 * len(frames), 3.6 * len(datasets))
    axes = fig.subplots(len(datasets), len(frames), squeeze=False)
    for r, ds in enumerate(datasets):
        for c, (name, per_ds) in enumerate(frames.items()):
            ax = axes[r, c]
            if ds not in per_ds:
                ax.set_axis_off()
                continue
            df = per_ds[ds]
            methods = _method_columns(df, f"{stat}_")
            _require(bool(methods), panel, f"{name} of {ds} has no {stat}_<method> columns",
                     f"pass the {name} written by 'epiflow impute'")
            pal = _palette(methods)
            data = [df[f"{stat}_{m}"].dropna().to_numpy(float) for m in methods]
            bp = ax.boxplot(data, patch_artist=True, showfliers=False, widths=0.6)
            for patch, m in zip(bp["boxes"], methods):
                patch.set_facecolor(pal[m])
            ax.set_xticks(range(1, len(methods) + 1))
            ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=8)
            unit = _UNITS.get(name, name)
            ax.set_ylabel(f"{label} per {unit}", fontsize=9)
            if stat == "mse":
                ax.set_yscale("log")
            ax.set_title(f"{ds}: {label} per {unit}", fontsize=10)
            ax.spines[["top", "right"]].set_visible(False)
    return fig


def draw_per_cell_scatter(panel: Panel, metrics, tables) -> object:
    frames = _tables_named(panel, tables, "per_cell.tsv")
    xm, ym = panel.options["x"], panel.options["y"]
    fig = _figure(0.8 + 5.2 * len(frames), 4.4)
    axes = fig.subplots(1, len(frames), squeeze=False)[0]
    for ax, (ds, df) in zip(axes, frames.items()):
        _need_columns(panel, df, [f"pearson_{xm}", f"pearson_{ym}"], "per_cell.tsv")
        lab = df["cell_type"].astype(str) if "cell_type" in df else pd.Series(["cell"] * len(df))
        embedding_panel(ax, df[[f"pearson_{xm}", f"pearson_{ym}"]].to_numpy(float), lab,
                        title=f"{ds}: per-cell Pearson r", xlabel=f"{xm} Pearson r", ylabel=f"{ym} Pearson r")
        ax.set_xticks([0, 0.5, 1])
        ax.set_yticks([0, 0.5, 1])
        lo = np.nanmin(df[[f"pearson_{xm}", f"pearson_{ym}"]].to_numpy(float))
        ax.plot([min(lo, 0), 1], [min(lo, 0), 1], color="grey", lw=0.6, ls="--")
    return fig


def draw_mean_scatter(panel: Panel, metrics, tables) -> object:
    name = panel.tables[0]
    frames = _tables_named(panel, tables, name)
    m = panel.options["method"]
    panels = []
    for ds, df in frames.items():
        _need_columns(panel, df, ["group", "real_perturbed", f"pred_{m}"], name)
        for g in dict.fromkeys(df["group"].astype(str)):
            panels.append((ds, g, df[df["group"].astype(str) == g]))
    n = len(panels)
    n_cols = min(n, 4)
    n_rows = int(np.ceil(n / n_cols))
    fig = _figure(3.4 * n_cols + 0.4, 3.3 * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, (ds, g, part) in zip(axes, panels):
        top = part["top_da"].astype(str).str.lower().eq("true").to_numpy() if "top_da" in part else \
            np.zeros(len(part), bool)
        xr, yp = part["real_perturbed"].to_numpy(float), part[f"pred_{m}"].to_numpy(float)
        ax.scatter(xr[~top], yp[~top], s=3, c="#9a9a9a", linewidths=0, rasterized=True, label="other cCREs")
        ax.scatter(xr[top], yp[top], s=5, c="#d62728", linewidths=0, rasterized=True, label="top DA")
        hi = float(np.nanmax(np.concatenate([xr, yp]))) if len(xr) else 1.0
        ax.plot([0, hi], [0, hi], color="black", lw=0.6, ls="--")
        ax.set_xlabel("observed mean", fontsize=8)
        ax.set_ylabel(f"predicted mean ({m})", fontsize=8)
        ax.set_title(f"{ds}: {g}", fontsize=9)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in axes[n:]:
        ax.set_axis_off()
    axes[0].legend(fontsize=7, frameon=False, markerscale=3)
    return fig


_KIND_COLOURS = {"unperturbed": "#1f77b4", "perturbed": "#d62728", "predicted": "#2ca02c"}


def draw_stimulation_umap(panel: Panel, metrics, tables) -> object:
    """Fig. 3g: one row per dataset and held-out type, one UMAP per method (cells.tsv of
    predict-stimulation and of the perturbation baselines, stacked: ``group, method, kind, umap1,
    umap2``), cells coloured by kind."""
    grid = []
    for ds, df in _tables_named(panel, tables, "cells.tsv").items():
        _need_columns(panel, df, ["group", "method", "kind", "umap1", "umap2"], "cells.tsv")
        for g in dict.fromkeys(df["group"].astype(str)):
            part = df[df["group"].astype(str) == g]
            grid.append((f"{ds}, held out: {g}", part, list(dict.fromkeys(part["method"].astype(str)))))
    _require(bool(grid), panel, "cells.tsv has no cells", "run predict-stimulation with UMAPs on (--umap)")
    fig, spots = _grid_axes(grid, 4.2, 1.8)
    for ax, label, df, m, _, last in spots:
        part = df[df["method"].astype(str) == m]
        embedding_panel(ax, part[["umap1", "umap2"]].to_numpy(float), part["kind"].astype(str),
                        palette=_KIND_COLOURS, title=f"{m}\n{label}", legend=last, legend_title="cells")
    return fig


def _bracket_rows(panel: Panel, metrics: pd.DataFrame, metric: str) -> pd.DataFrame:
    rows = _task_rows(panel, metrics)
    pat = re.compile(re.escape(metric) + r"\[(.+)\]$")
    sel = rows[rows["metric"].astype(str).str.match(pat)].copy()
    _require(len(sel) > 0, panel, f"no '{metric}[<target>]' rows", "pass the knockout metrics.tsv")
    sel["target"] = sel["metric"].str.extract(pat, expand=False)
    return sel


def draw_knockout_bars(panel: Panel, metrics: pd.DataFrame, tables) -> object:
    """Mean change of score per target (knockout.tsv: mean +- SD over the query cells, p of the task's
    one-sided t-test under each target's name: a cCRE, a gene's promoter cCREs with their number, the
    Group) beside the mean of the random knockouts: each target's size-matched random mean (knockout.tsv
    ``random_mean_effect``) when a target has several cCREs, else the random single cCREs (metrics.tsv)."""
    from .knockout import size_matched_marks, target_labels

    frames = _tables_named(panel, tables, "knockout.tsv")
    rows = _task_rows(panel, metrics)
    fig = _figure(1.5 + max(4.0, 0.5 * max(len(df) for df in frames.values())) * len(frames), 4.0)
    axes = fig.subplots(1, len(frames), squeeze=False)[0]
    for ax, (ds, df) in zip(axes, frames.items()):
        _need_columns(panel, df, ["ccre", "mean_effect", "sd_effect", "p_value"], "knockout.tsv")
        names = target_labels(df)
        p = df["p_value"].to_numpy(float)
        mean = df["mean_effect"].to_numpy(float)
        x = np.arange(len(df))
        ax.bar(x, mean, yerr=df["sd_effect"].to_numpy(float), capsize=2,
               color=np.where(p < 0.05, "#c0392b", "#7f8c8d"))
        rnd = rows[(rows["dataset"] == ds) & (rows["metric"] == "random_mean_effect")]["value"]
        if not size_matched_marks(ax, df) and len(rnd):
            ax.axhline(float(rnd.iloc[0]), color="grey", ls="--", lw=1, label="random knockouts (mean)")
            ax.legend(fontsize=7, frameon=False)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xticks(x)
        ax.set_xticklabels([f"{n}\np={pv:.2g}" for n, pv in zip(names, p)], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("change of mean cancerization score\n(mean +- SD over query cells)", fontsize=9)
        ax.set_title(f"{ds} (red: p < 0.05, one-sided t-test vs random)", fontsize=9)
        ax.spines[["top", "right"]].set_visible(False)
    return fig


def draw_knockout_pvalues(panel: Panel, metrics: pd.DataFrame, tables) -> object:
    sel = _bracket_rows(panel, metrics, "p_value")
    datasets = list(dict.fromkeys(sel["dataset"]))
    fig = _figure(1.5 + max(4.0, 0.35 * sel["target"].nunique()) * len(datasets), 3.8)
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, ds in zip(axes, datasets):
        part = sel[sel["dataset"] == ds]
        p = np.clip(part["value"].to_numpy(float), 1e-300, 1.0)
        ax.bar(range(len(part)), -np.log10(p), color=np.where(p < 0.05, "#d62728", "#7f7f7f"))
        ax.axhline(-np.log10(0.05), color="grey", ls="--", lw=1, label="p = 0.05")
        ax.set_xticks(range(len(part)))
        ax.set_xticklabels(part["target"], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("-log10 p (one-sided t-test)", fontsize=9)
        ax.set_title(ds, fontsize=10)
        ax.legend(fontsize=7, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
    return fig


def draw_knockout_random(panel: Panel, metrics: pd.DataFrame, tables) -> object:
    from .knockout import n_ccres_of

    rand = _tables_named(panel, tables, "random.tsv")
    sel = _bracket_rows(panel, metrics, "mean_effect")
    fig = _figure(0.5 + 4.6 * len(rand), 3.6)
    axes = fig.subplots(1, len(rand), squeeze=False)[0]
    for ax, (ds, df) in zip(axes, rand.items()):
        _need_columns(panel, df, ["mean_effect"], "random.tsv")
        size = n_ccres_of(df)
        eff = df["mean_effect"].to_numpy(float)
        bins = np.histogram_bin_edges(eff, bins=20)
        for j, m in enumerate(np.unique(size)):
            ax.hist(eff[size == m], bins=bins, alpha=0.6 if len(np.unique(size)) > 1 else 1.0,
                    color=["#c7c7c7", "#9ecae1", "#fdae6b", "#a1d99b", "#bcbddc"][j % 5],
                    label=f"random knockouts of {m} cCRE{'s' if m > 1 else ''}")
        for i, (_, r) in enumerate(sel[sel["dataset"] == ds].iterrows()):
            ax.axvline(r["value"], color="#d62728", lw=1, label="targets" if i == 0 else None)
        ax.set_xlabel("change of mean cancerization score", fontsize=9)
        ax.set_ylabel("knockouts", fontsize=9)
        ax.set_title(ds, fontsize=10)
        ax.legend(fontsize=7, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
    return fig


def _knockout_frames(panel: Panel, tables, name: str, cols) -> dict[str, pd.DataFrame]:
    frames = _tables_named(panel, tables, name)
    for ds, df in frames.items():
        _need_columns(panel, df, cols, name)
        _require(len(df) > 0, panel, f"{name} of {ds} has no rows",
                 "run the knockout with --genes and --tss (targets given as cCRE indices, --target-ccres, have no "
                 "gene to show)"
                 if name == "tss_ccres.tsv" else f"pass the {name} written by the knockout")
    return frames


def draw_knockout_tss(panel: Panel, metrics, tables) -> object:
    """Fig. 5b: one axes per dataset and target gene (tss_ccres.tsv)."""
    from .knockout import tss_accessibility_axes

    frames = _knockout_frames(panel, tables, "tss_ccres.tsv",
                              ["gene", "rel_start", "rel_end", "window", "downstream", "target", "state_a",
                               "state_b", "fraction_a", "fraction_b"])
    grid = [(ds, df, list(dict.fromkeys(df["gene"].astype(str)))) for ds, df in frames.items()]
    fig, spots = _grid_axes(grid, 4.2, 1.0, row_height=3.4)
    for ax, ds, df, g, c, _ in spots:
        part = df[df["gene"].astype(str) == g]
        tss_accessibility_axes(ax, part)
        ax.set_title(f"{ds}: {g} (promoter {int(part['window'].iloc[0])} bp upstream)", fontsize=9)
        if c == 0:
            ax.legend(fontsize=7, frameon=False)
    return fig


def draw_knockout_reference(panel: Panel, metrics, tables) -> object:
    """Fig. 5c: the reference UMAP of each dataset coloured by score (reference_cells.tsv)."""
    from .knockout import reference_axes

    frames = _knockout_frames(panel, tables, "reference_cells.tsv", ["umap1", "umap2", "score"])
    fig = _figure(0.8 + 5.2 * len(frames), 4.6)
    axes = fig.subplots(1, len(frames), squeeze=False)[0]
    for ax, (ds, df) in zip(axes, frames.items()):
        reference_axes(ax, df, colorbar=fig, arrow=True)
        ax.set_title(f"{ds}: {len(df)} chimeric reference cells", fontsize=9)
    return fig


def draw_knockout_shifts(panel: Panel, metrics, tables) -> object:
    """Fig. 5d: per dataset (row) and knockout (column: a cCRE, a gene's promoter cCREs together with
    their number, the Group), the query cells' shifts on the reference UMAP (reference_cells.tsv,
    shifts.tsv)."""
    from ..tasks.knockout import target_label
    from .knockout import n_ccres_of, query_shift_axes, reference_axes

    refs = _knockout_frames(panel, tables, "reference_cells.tsv", ["umap1", "umap2", "score"])
    shifts = _knockout_frames(panel, tables, "shifts.tsv",
                              ["knockout", "umap1_added", "umap2_added", "umap1_removed", "umap2_removed"])
    both = [ds for ds in shifts if ds in refs]
    _require(bool(both), panel, "no dataset has both reference_cells.tsv and shifts.tsv",
             "pass both tables of the same knockout folder")
    grid = [(ds, shifts[ds], list(dict.fromkeys(shifts[ds]["knockout"].astype(str)))) for ds in both]
    n_cols = max(len(k) for _, _, k in grid)
    fig, spots = _grid_axes(grid, 3.8, 0.8, row_height=3.8)
    for ax, ds, sh, ko, c, _ in spots:
        part = sh[sh["knockout"].astype(str) == ko]
        reference_axes(ax, refs[ds], size=4, alpha=0.35, colorbar=fig if c == n_cols - 1 else None)
        query_shift_axes(ax, part)
        ax.set_title(f"{ds}: {target_label(ko, n_ccres_of(part)[0])} knocked out",
                     fontsize=9)
        if c == 0:
            ax.legend(fontsize=6, frameon=False, loc="best")
    return fig


DRAW: dict[str, Callable] = {
    "bars": draw_bars, "metric_heatmap": draw_metric_heatmap, "direction_lines": draw_direction_lines,
    "group_heatmap": draw_group_heatmap, "tradeoff": draw_tradeoff, "umap": draw_umap,
    "umap_best": draw_umap_best, "pseudotime_umap": draw_pseudotime_umap, "sankey": draw_sankey,
    "paga": draw_paga, "joint_umap": draw_joint_umap, "umap_truth_pred": draw_umap_truth_pred,
    "cluster_table": draw_cluster_table, "confusion": draw_confusion, "trajectory": draw_trajectory,
    "per_unit_stat": draw_per_unit_stat, "per_cell_scatter": draw_per_cell_scatter,
    "mean_scatter": draw_mean_scatter, "stimulation_umap": draw_stimulation_umap, "knockout_bars": draw_knockout_bars,
    "knockout_pvalues": draw_knockout_pvalues, "knockout_random": draw_knockout_random,
    "knockout_tss": draw_knockout_tss, "knockout_reference": draw_knockout_reference,
    "knockout_shifts": draw_knockout_shifts,
}


# ----------------------------------------------------------------------------- entry point
def get_panel(name: str) -> Panel:
    if name in NOT_DRAWN:
        nd = NOT_DRAWN[name]
        raise EpiflowError(f"panel '{name}' ({nd.paper}) is not drawn: {nd.reason}", field="panel",
                           fix=("see " + ", ".join(nd.instead) + " instead") if nd.instead else
                           "'epiflow figure --list' lists the panels that are drawn")
    if name not in PANELS:
        raise EpiflowError(f"unknown figure panel '{name}'", field="panel",
                           fix=f"choose one of {', '.join(PANELS)} ('epiflow figure --list')")
    return PANELS[name]


def build_panel(name: str, *, metrics: Sequence[str | os.PathLike] = (),
                tables: Mapping[str, Sequence[str | os.PathLike]] | None = None,
                out: str | os.PathLike, svg: bool = False, groups: Sequence[str] = ()) -> list[Path]:
    """Draw panel ``name`` from metrics tables and per-dataset tables, write ``out`` (PNG) atomically.

    ``tables``: ``{dataset: [paths]}``; each path is known by its file name (``cells.tsv`` ...).
    ``groups``: a panel with per-group views (option ``per_group``: fig3d, fig3g) draws only these
    groups (held-out cell types) of its tables. Several paths of one table name for one dataset are
    read as one table (their rows stacked; the columns must agree): fig3g takes the baseline tools'
    ``cells.tsv`` beside predict-stimulation's (the panel option ``baseline_tables``).
    """
    panel = get_panel(name)
    groups = [str(g) for g in groups]
    if groups and not panel.options.get("per_group"):
        raise EpiflowError(f"figure {name} has no per-group views: --group does not apply", field="--group",
                           fix="drop --group (it applies to " + ", ".join(
                               p for p, q in PANELS.items() if q.options.get("per_group")) + ")")
    metrics_df = read_metrics(list(metrics))
    if panel.needs_metrics:
        _require(len(metrics_df) > 0, panel, "no metrics table given",
                 f"pass --metrics <results>/tasks/.../metrics.tsv of config tasks.{panel.task_key}")
    loaded: dict[str, dict[str, pd.DataFrame]] = {}
    for ds, paths in (tables or {}).items():
        for p in paths:
            df, have = read_table(p), loaded.setdefault(ds, {})
            name = table_name(p)
            if name in have:  # the same table of several methods (fig3g: EpiAgent's and the baselines')
                _require(list(have[name].columns) == list(df.columns), panel,
                         f"the {name} tables of {ds} have different columns ({list(have[name].columns)} and "
                         f"{list(df.columns)} in {p})", "pass tables written by the same kind of verb")
                df = pd.concat([have[name], df], ignore_index=True)
            have[name] = df
    if groups:
        loaded = {ds: {t: _only_groups(panel, ds, t, df, groups) for t, df in named.items()}
                  for ds, named in loaded.items()}
    for needed in panel.tables:
        _tables_named(panel, loaded, needed)
    fig = DRAW[panel.draw](panel, metrics_df, loaded)
    fig.suptitle(f"{panel.name}: {panel.title}", fontsize=9, wrap=True)
    written = save_figure(fig, out, svg=svg)
    log.info("wrote %s", ", ".join(map(str, written)))
    return written


def _only_groups(panel: Panel, ds: str, table: str, df: pd.DataFrame, groups: Sequence[str]) -> pd.DataFrame:
    """The rows of a per-group table (column ``group``) that belong to ``groups``."""
    if "group" not in df.columns:
        return df
    have = list(dict.fromkeys(df["group"].astype(str)))
    missing = [g for g in groups if g not in have]
    _require(not missing, panel, f"{table} of {ds} has no group {', '.join(missing)} (has: {', '.join(have)})",
             "name a held-out group of the task (tasks.stimulation.focus_group)")
    return df[df["group"].astype(str).isin(groups)]


def _paper_order(name: str) -> tuple:
    m = PANEL_NAME.match(name)
    return (m.group(1), m.group(2), m.group(3) or "") if m else (name, "", "")


def panel_table(skipped: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Every paper panel in the paper's order: the registry's panels (panel, benchmark, config task,
    inputs, what it shows, paper panel, status ``drawn``) and those of :data:`NOT_DRAWN` (status
    ``not drawn: <reason>``, the drawn panels with related content in ``inputs``). ``skipped``: panel ->
    why the current configuration cannot build it (status ``not built: <why>``)."""
    skipped = dict(skipped or {})
    unknown = sorted(set(skipped) - set(PANELS))
    if unknown:
        raise EpiflowError(f"not panels of the registry: {', '.join(unknown)}", field="--skip",
                           fix="name panels listed by 'epiflow figure --list'")
    rows = [{"panel": p.name, "benchmark": p.benchmark, "config_task": p.task_key,
             "inputs": ", ".join((["metrics.tsv"] if p.needs_metrics else []) + list(p.tables)),
             "shows": p.title, "paper": p.paper,
             "status": f"not built: {skipped[p.name]}" if p.name in skipped else "drawn"}
            for p in PANELS.values()]
    rows += [{"panel": n.name, "benchmark": "", "config_task": "",
              "inputs": ("see " + ", ".join(n.instead)) if n.instead else "", "shows": "", "paper": n.paper,
              "status": f"not drawn: {n.reason}"} for n in NOT_DRAWN.values()]
    return pd.DataFrame(sorted(rows, key=lambda r: _paper_order(r["panel"])))
