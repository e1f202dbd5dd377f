"""The common interface of every baseline tool, and the registry of adapters.

An *adapter* is a plain function ``fit(adata, task, params) -> BaselineOutput`` that takes an
AnnData in the canonical layout below and returns, depending on the task, a cell embedding,
predicted labels, an imputed matrix or predicted perturbed cells. The same function runs

* in the main environment (``env='inprocess'``: light tools needing only numpy / scipy /
  scikit-learn), or
* in the tool's own isolated environment, built from ``envs/baseline-<tool>.yaml``
  (``env='venv'``, :mod:`epiflow.baselines.venv`): the AnnData is written to an h5ad, the tool's
  Python runs ``python -m epiflow.baselines.runner`` with only ``epiflow``'s source on
  ``PYTHONPATH``, and the outputs come back in an ``.npz`` file (:func:`save_output`).

Canonical input AnnData (built by :func:`canonical_input` from the user's column names)
---------------------------------------------------------------------------------------
* ``X``: raw counts, CSR float32, cells x features (cCREs or peaks); ``var`` has ``chrom``,
  ``start``, ``end`` when the coordinates are known (needed by gene-activity scores and scBasset);
* ``obs['label']``: cell type (str; for ``annotation`` the query cells' labels are blanked to ``''``
  so an adapter cannot see them), ``obs['split']``: ``reference`` / ``query`` (annotation);
* ``obs['batch']``: batch (integration; also used by tools that model batches);
* ``obs['condition']``: ``control`` / ``perturbed`` and ``uns['holdout']``: the cell type whose
  perturbed cells are held out and must be predicted from its control cells (perturbation);
* ``obs['perturbation']``: ``uns['control']`` or the perturbed gene(s) joined by ``+``, and
  ``uns['heldout']``: the perturbations whose cells were removed and must be predicted (genetic:
  unseen genetic perturbations, the held-out split of EpiAgent's own genetic task);
* ``uns['params']``: nothing; adapter parameters travel separately as a JSON-able dict.

Outputs (:class:`BaselineOutput`)
---------------------------------
``embedding`` (cells x d float32), ``labels`` (one str per cell; annotation), ``imputed`` (cells x
kept features float32, with ``features`` = indices of the kept input features), ``predicted``
(predicted perturbed cells x features float32, with ``features``; for ``genetic`` one row per
held-out perturbation, its mean predicted accessibility, named in ``groups``), ``info`` (JSON-able
dict: parameters actually used, epochs, notes).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import EpiflowError

TASKS = ("feature_extraction", "integration", "annotation", "imputation", "perturbation", "genetic")
OUTPUT_KIND = {"feature_extraction": "embedding", "integration": "embedding", "annotation": "labels",
               "imputation": "imputed", "perturbation": "predicted", "genetic": "predicted"}


@dataclass
class BaselineOutput:
    embedding: np.ndarray | None = None
    labels: np.ndarray | None = None
    imputed: np.ndarray | None = None
    predicted: np.ndarray | None = None
    features: np.ndarray | None = None
    groups: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def check(self, task: str, n_cells: int) -> "BaselineOutput":
        """Raise when the output the task needs is missing or has the wrong shape."""
        kind = OUTPUT_KIND[task]
        val = getattr(self, kind)
        if val is None:
            raise EpiflowError(f"the adapter returned no '{kind}' for task {task}", field=kind)
        if kind in ("embedding", "labels", "imputed") and len(val) != n_cells:
            raise EpiflowError(f"'{kind}' has {len(val)} rows for {n_cells} cells", field=kind)
        if kind in ("embedding", "imputed", "predicted"):
            arr = np.asarray(val)
            if arr.ndim != 2 or not np.isfinite(arr).all():
                raise EpiflowError(f"'{kind}' must be a finite 2-d matrix, got shape {arr.shape}"
                                   + ("" if arr.ndim != 2 else " with NaN/inf values"), field=kind)
        if task == "genetic" and (self.groups is None or len(self.groups) != len(val)):
            raise EpiflowError("genetic: 'groups' must name the held-out perturbation of every predicted row",
                               field="groups")
        return self


@dataclass(frozen=True)
class AdapterSpec:
    tool: str                 # key: envs/baseline-<tool>.yaml, CLI --tool
    method: str               # name in the metrics tables
    tasks: tuple[str, ...]
    entry: str                # "module:function" (imported lazily)
    default_env: str = "venv"  # 'inprocess' (main env is enough) or 'venv'
    pypi: str = ""            # the PyPI distribution of the tool ('' for our own implementation)
    note: str = ""
    task_methods: tuple[tuple[str, str], ...] = ()  # (task, name) where a task's table names it otherwise

    def method_for(self, task: str | None) -> str:
        """The method's name in the metrics table of ``task`` (e.g. SnapATAC2+SVM for annotation)."""
        return dict(self.task_methods).get(task, self.method)

    def load(self) -> Callable[..., BaselineOutput]:
        mod, fn = self.entry.split(":")
        return getattr(importlib.import_module(mod), fn)


_A = "epiflow.baselines.adapters"
REGISTRY: dict[str, AdapterSpec] = {s.tool: s for s in [
    AdapterSpec("lsi", "LSI", ("feature_extraction", "integration"), f"{_A}.light:fit_lsi", "inprocess",
                note="TF-IDF + truncated SVD (epiflow.baselines.lsi)"),
    AdapterSpec("lda", "cisTopic-LDA", ("feature_extraction", "integration"), f"{_A}.light:fit_lda", "inprocess",
                note="cisTopic-style LDA topic model (scikit-learn, online variational Bayes)"),
    AdapterSpec("pca", "PCA", ("feature_extraction", "integration"), f"{_A}.light:fit_pca", "inprocess",
                note="log-normalised counts, PCA"),
    AdapterSpec("pca_svm", "PCA+SVM", ("annotation",), f"{_A}.light:fit_pca_svm", "inprocess",
                note="gene-activity scores (or features), PCA, linear SVM"),
    AdapterSpec("mlp", "MLP", ("annotation",), f"{_A}.light:fit_mlp", "inprocess",
                note="gene-activity scores (or features), scikit-learn MLP"),
    AdapterSpec("snapatac2", "SnapATAC2", ("feature_extraction", "integration", "annotation"),
                f"{_A}.snap:fit_snapatac2", "venv", "snapatac2",
                note="feature selection + spectral embedding; mnc_correct for integration; spectral + linear "
                     "SVM for annotation", task_methods=(("annotation", "SnapATAC2+SVM"),)),
    AdapterSpec("harmony", "Harmony", ("integration",), f"{_A}.harmony:fit_harmony", "venv", "harmonypy"),
    AdapterSpec("peakvi", "PeakVI", ("feature_extraction", "integration"), f"{_A}.scvi_models:fit_peakvi",
                "venv", "scvi-tools"),
    AdapterSpec("scbasset", "scBasset", ("feature_extraction", "integration"), f"{_A}.scvi_models:fit_scbasset",
                "venv", "scvi-tools", note="needs a genome FASTA (param fasta) for the peak sequences"),
    AdapterSpec("scalex", "SCALEX", ("feature_extraction", "integration"), f"{_A}.others:fit_scalex", "venv",
                "scalex"),
    AdapterSpec("scale", "SCALE", ("feature_extraction",), f"{_A}.others:fit_scale", "venv", "scale-atac"),
    AdapterSpec("castle", "CASTLE", ("feature_extraction", "integration"), f"{_A}.others:fit_castle", "venv",
                "sccastle"),
    AdapterSpec("cellcano", "Cellcano", ("annotation",), f"{_A}.others:fit_cellcano", "venv", "cellcano"),
    AdapterSpec("scopen", "scOpen", ("imputation",), f"{_A}.others:fit_scopen", "venv", "scopen"),
    AdapterSpec("sccase", "scCASE", ("imputation",), f"{_A}.others:fit_sccase", "venv", "sccase"),
    AdapterSpec("scgen", "scGen", ("perturbation",), f"{_A}.others:fit_scgen", "venv", "scgen"),
    AdapterSpec("scpram", "scPRAM", ("perturbation",), f"{_A}.others:fit_scpram", "venv", "scpram"),
    AdapterSpec("gears", "GEARS", ("genetic",), f"{_A}.others:fit_gears", "venv", "cell-gears",
                note="needs a gene-GO table (param go); GO and co-expression graphs built offline"),
]}

# Paper baselines that cannot be installed from PyPI (listed in the status table).
NOT_ON_PYPI = {"EpiAnno": "annotation", "SANGO": "annotation"}


def get_adapter(tool: str, task: str | None = None) -> AdapterSpec:
    if tool not in REGISTRY:
        raise EpiflowError(f"unknown baseline tool '{tool}' (known: {', '.join(sorted(REGISTRY))})",
                           field="tool")
    spec = REGISTRY[tool]
    if task is not None:
        if task not in TASKS:
            raise EpiflowError(f"unknown task '{task}' (known: {', '.join(TASKS)})", field="task")
        if task not in spec.tasks:
            raise EpiflowError(f"{spec.method} does not do {task} (it does: {', '.join(spec.tasks)})",
                               field="task")
    return spec


def tools_for(task: str) -> list[str]:
    return [t for t, s in REGISTRY.items() if task in s.tasks]


# ----------------------------------------------------------------------------- npz exchange format
def save_output(out: BaselineOutput, path) -> None:
    """Write an output to ``path`` (.npz; absent fields are left out; ``info`` as JSON)."""
    arrays: dict[str, Any] = {}
    for f in dataclasses.fields(out):
        v = getattr(out, f.name)
        if f.name == "info":
            arrays["info_json"] = np.array(json.dumps(v, default=_json_default))
        elif v is not None:
            arr = np.asarray(v)
            if f.name in ("labels", "groups"):
                arr = arr.astype(str)
            arrays[f.name] = arr
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def load_output(path) -> BaselineOutput:
    with np.load(path, allow_pickle=False) as z:
        kw = {k: z[k] for k in z.files if k != "info_json"}
        info = json.loads(str(z["info_json"])) if "info_json" in z.files else {}
    return BaselineOutput(**kw, info=info)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
