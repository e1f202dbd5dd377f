"""Adapters of the light baselines: LSI, cisTopic-style LDA, PCA, PCA + SVM and an MLP.

They need only numpy, scipy and scikit-learn (and anndata for the input), so they run in the main
environment by default, and in a minimal virtual environment (``envs/baseline-<tool>.yaml``) just the
same.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from ...errors import EpiflowError
from ...tokenize.core import binarize
from ..base import BaselineOutput
from ..preprocess import feature_coords, gene_activity, log_normalise

log = logging.getLogger(__name__)


def _counts(adata) -> sp.csr_matrix:
    x = sp.csr_matrix(adata.X, dtype=np.float32)
    if x.shape[0] < 3 or x.shape[1] < 3:
        raise EpiflowError(f"need at least 3 cells and 3 features, got {x.shape}", field="X")
    return x


def _k(n: int, x) -> int:
    return int(max(2, min(int(n), min(x.shape) - 1)))


def fit_lsi(adata, task: str, params: dict) -> BaselineOutput:
    from ..lsi import lsi

    emb, info = lsi(_counts(adata), n_components=int(params.get("n_components", 50)),
                    drop_first=params.get("drop_first", "auto"), seed=int(params.get("seed", 0)), return_info=True)
    info.pop("explained_variance_ratio", None)
    return BaselineOutput(embedding=emb, info=info)


def fit_lda(adata, task: str, params: dict) -> BaselineOutput:
    """cisTopic-style LDA on binarised counts: ``n_topics`` topics, alpha = 50 / n_topics, beta = 0.1
    (cisTopic's defaults; scikit-learn caps the document-topic prior at 1, so alpha = min(50 / K, 1)),
    online variational Bayes instead of cisTopic's collapsed Gibbs sampler; the embedding is each
    cell's topic distribution."""
    from sklearn.decomposition import LatentDirichletAllocation

    x = binarize(_counts(adata))  # a copy: adata.X stays the counts
    k = int(params.get("n_topics", 30))
    lda = LatentDirichletAllocation(
        n_components=k, doc_topic_prior=min(1.0, float(params.get("alpha", 50.0 / k))),
        topic_word_prior=float(params.get("beta", 0.1)), learning_method=params.get("learning_method", "online"),
        max_iter=int(params.get("max_iter", 30)), batch_size=int(params.get("batch_size", 256)),
        random_state=int(params.get("seed", 0)), n_jobs=1)
    theta = lda.fit_transform(x)
    theta = theta / theta.sum(axis=1, keepdims=True)
    return BaselineOutput(embedding=theta.astype(np.float32),
                          info={"n_topics": k, "n_iter": int(lda.n_iter_), "perplexity": float(lda.perplexity(x))})


def _pca(x, n: int, seed: int, fit_rows=None):
    from sklearn.decomposition import PCA

    k = _k(n, x if fit_rows is None else x[fit_rows])
    pca = PCA(n_components=k, svd_solver="arpack", random_state=seed)
    pca.fit(x if fit_rows is None else x[fit_rows])
    return pca.transform(x).astype(np.float32), k


def fit_pca(adata, task: str, params: dict) -> BaselineOutput:
    """PCA (implicitly centred, sparse ARPACK) of the log-normalised binarised counts."""
    emb, k = _pca(log_normalise(_counts(adata)), int(params.get("n_components", 50)), int(params.get("seed", 0)))
    return BaselineOutput(embedding=emb, info={"n_components": k})


def annotation_features(adata, params: dict):
    """Log-normalised gene-activity scores when ``params['genes']`` (BED6) is given and the features
    have coordinates; otherwise the log-normalised binarised features themselves."""
    x = _counts(adata)
    genes = params.get("genes")
    if genes:
        coords = feature_coords(adata.var)
        if coords is None:
            raise EpiflowError("gene-activity scores need feature coordinates (var chrom/start/end or "
                               "'chrom:start-end' names)", field="var")
        ga, names = gene_activity(x, coords, genes, upstream=int(params.get("upstream", 2000)))
        return log_normalise(ga, binarize=False), {"input": "gene_activity", "n_genes": int(len(names))}
    return log_normalise(x), {"input": "features"}


def _reference(adata) -> tuple[np.ndarray, np.ndarray]:
    if "split" not in adata.obs or "label" not in adata.obs:
        raise EpiflowError("annotation needs obs['split'] (reference/query) and obs['label']", field="obs")
    ref = np.flatnonzero(adata.obs["split"].astype(str).to_numpy() == "reference")
    if ref.size == 0:
        raise EpiflowError("no reference cell (obs['split'] == 'reference')", field="obs/split")
    y = adata.obs["label"].astype(str).to_numpy()[ref]
    if len(np.unique(y)) < 2:
        raise EpiflowError("the reference has fewer than 2 cell types", field="obs/label")
    return ref, y


def fit_pca_svm(adata, task: str, params: dict) -> BaselineOutput:
    """PCA (fitted on the reference cells) then a linear SVM (scikit-learn ``LinearSVC``)."""

    ref, y = _reference(adata)
    x, info = annotation_features(adata, params)
    seed = int(params.get("seed", 0))
    pcs, k = _pca(x, int(params.get("n_components", 50)), seed, fit_rows=ref)
    return BaselineOutput(labels=svm_labels(pcs, ref, y, params, seed), info={**info, "n_components": k})


def svm_labels(emb, ref, y, params: dict, seed: int) -> np.ndarray:
    """Each component scaled to unit s.d. over the reference rows, a linear SVM (``LinearSVC``, param C)
    fitted on them, labels predicted for every row."""
    from sklearn.svm import LinearSVC

    z = emb / (emb[ref].std(axis=0, keepdims=True) + 1e-8)
    svm = LinearSVC(C=float(params.get("C", 1.0)), random_state=seed, max_iter=5000).fit(z[ref], y)
    return svm.predict(z).astype(str)


def fit_mlp(adata, task: str, params: dict) -> BaselineOutput:
    """scikit-learn ``MLPClassifier`` (hidden layers 256-128, Adam, early stopping) on the
    ``n_top`` most accessible gene-activity scores (or features)."""
    from sklearn.neural_network import MLPClassifier

    ref, y = _reference(adata)
    x, info = annotation_features(adata, params)
    n_top = int(params.get("n_top", 5000))
    if x.shape[1] > n_top:
        nc = np.bincount(x[ref].indices, minlength=x.shape[1])
        x = x[:, np.sort(np.argsort(-nc, kind="stable")[:n_top])]
    hidden = tuple(int(h) for h in params.get("hidden", (256, 128)))
    mlp = MLPClassifier(hidden_layer_sizes=hidden, alpha=float(params.get("alpha", 1e-3)),
                        max_iter=int(params.get("max_iter", 200)), early_stopping=len(ref) >= 50,
                        random_state=int(params.get("seed", 0)))
    mlp.fit(x[ref], y)
    return BaselineOutput(labels=mlp.predict(x).astype(str),
                          info={**info, "n_inputs": int(x.shape[1]), "n_iter": int(mlp.n_iter_)})
