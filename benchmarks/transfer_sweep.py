"""Held-out transfer benchmark on real cells (issue #15, parts 3 and 5).

Protocol (one seeded split, built once and cached under ``--work``):

1. ``granja2019_bmmc_d6t1.h5ad`` (10,335 bone-marrow cells, 16 types) is split stratified by cell type
   into a pretraining part (``1 - --heldout``) and a held-out part (``--heldout``, default 1/4).
2. The pretraining part alone goes through the library's corpus path (candidate cCREs from its peaks,
   ``map_dataset``, ``build_corpus`` with vocabulary curation): ``WORK/corpus_pre``.
3. The held-out cells are mapped onto that corpus's ``vocab.bed`` and built with ``vocabulary='external'``
   and the corpus ``df.npy`` (so they are tokenized with the corpus document frequencies):
   ``WORK/corpus_held``. They are never seen by curation, pretraining or its eval split.
4. Each run pretrains with the given options (``--set key=value`` for :class:`PretrainConfig` fields,
   ``--model key=value`` for model-config overrides), embeds the held-out cells zero-shot and scores
   Leiden-bisection NMI / ARI (``epiflow.metrics.clustering``), plus the held-out CCA AUROC and, for
   reference, the AUROC a cell-independent score (the corpus document frequency of the queried cCRE)
   reaches on the same queries.
5. Baselines on the same held-out cells and vocabulary (``--baselines``, computed once and cached):
   LSI recipe variants and PCA.

One TSV row per run is appended to ``--table`` (default ``WORK/sweep.tsv``); the full record goes to
``WORK/runs/NAME/result.json``.

    OMP_NUM_THREADS=1 python benchmarks/transfer_sweep.py prepare
    OMP_NUM_THREADS=1 python benchmarks/transfer_sweep.py baselines
    OMP_NUM_THREADS=1 python benchmarks/transfer_sweep.py run --name base --set epochs=6 --set lr=0.002
    OMP_NUM_THREADS=1 python benchmarks/transfer_sweep.py lsi-grid --h5ad ../shared/data/buenrostro2018_bm0828.h5ad
    OMP_NUM_THREADS=1 python benchmarks/transfer_sweep.py diagnose --name base   # depth structure, Leiden seeds
    OMP_NUM_THREADS=1 python benchmarks/transfer_sweep.py annotate --name base   # annotation vs LSI + SVM
    OMP_NUM_THREADS=1 python benchmarks/transfer_sweep.py cross --names base     # Buenrostro 2018, zero-shot
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

log = logging.getLogger("transfer_sweep")

DEFAULT_DATA = Path(os.environ.get("EPIFLOW_SHARED_DATA", ROOT.parent / "shared" / "data")) / \
    "granja2019_bmmc_d6t1.h5ad"
if not DEFAULT_DATA.exists():
    DEFAULT_DATA = Path("/work/shared/data/granja2019_bmmc_d6t1.h5ad")


# ----------------------------------------------------------------------------- data
def prepare(work: Path, data: Path, heldout: float, seed: int, min_cells: int, min_ccres: int,
            max_cells: int | None = None) -> dict:
    """Build (once) the pretraining corpus and the held-out corpus on its vocabulary."""
    import anndata as ad
    from sklearn.model_selection import train_test_split

    from epiflow.corpus.build import build_corpus, candidate_set
    from epiflow.corpus.manifest import load_manifest
    from epiflow.corpus.mapping import map_dataset, write_mapped
    from epiflow.genome.bed import read_bed

    meta_path = work / "split.json"
    want = {"data": str(data), "heldout": heldout, "seed": seed, "min_cells": min_cells,
            "min_ccres_per_cell": min_ccres, "max_cells": max_cells}
    if meta_path.exists():
        have = json.loads(meta_path.read_text())
        if {k: have.get(k) for k in want} == want and (work / "corpus_held" / "corpus.json").exists():
            return have
        raise SystemExit(f"{work} holds another split ({have}); use another --work folder")
    work.mkdir(parents=True, exist_ok=True)
    a = ad.read_h5ad(data)
    idx = np.arange(a.n_obs)
    if max_cells is not None and max_cells < a.n_obs:
        idx, _ = train_test_split(idx, train_size=max_cells, stratify=a.obs["cell_type"], random_state=seed)
        idx = np.sort(idx)
    pre, held = train_test_split(idx, test_size=heldout, stratify=a.obs["cell_type"].to_numpy()[idx],
                                 random_state=seed)
    pre, held = np.sort(pre), np.sort(held)
    for name, rows in (("pre", pre), ("held", held)):
        sub = a[rows].copy()
        sub.obs["dataset"] = f"granja_{name}"
        sub.write_h5ad(work / f"raw_{name}.h5ad", compression="gzip")
        (work / f"manifest_{name}.tsv").write_text(
            "name\tformat\tpath\tgenome\ttissue\tcell_type_key\n"
            f"granja_{name}\th5ad\t{work / f'raw_{name}.h5ad'}\thg19\tbone_marrow\tcell_type\n")
    e_pre = load_manifest(work / "manifest_pre.tsv")[0]
    cand, _ = candidate_set([e_pre], "hg19")
    m, rep = map_dataset(e_pre, cand, "hg19")
    write_mapped(m, work / "mapped_pre.h5ad", rep, work / "mapped_pre.json")
    build_corpus(cand, [work / "mapped_pre.h5ad"], work / "corpus_pre", genome="hg19", min_cells=min_cells,
                 min_ccres_per_cell=min_ccres, shard_size=5000)
    vocab = read_bed(work / "corpus_pre" / "vocab.bed")[["chrom", "start", "end"]]
    e_held = load_manifest(work / "manifest_held.tsv")[0]
    m, rep = map_dataset(e_held, vocab, "hg19")
    write_mapped(m, work / "mapped_held.h5ad", rep, work / "mapped_held.json")
    build_corpus(vocab, [work / "mapped_held.h5ad"], work / "corpus_held", genome="hg19",
                 min_ccres_per_cell=min_ccres, shard_size=5000, vocabulary="external",
                 external_df=work / "corpus_pre" / "df.npy")
    pre_meta = json.loads((work / "corpus_pre" / "corpus.json").read_text())
    held_meta = json.loads((work / "corpus_held" / "corpus.json").read_text())
    out = {**want, "n_pre_split": int(len(pre)), "n_held_split": int(len(held)),
           "n_pre_cells": pre_meta["n_cells"], "n_held_cells": held_meta["n_cells"],
           "n_ccres": pre_meta["n_ccres"], "vocab_id": pre_meta["vocab_id"],
           "held_vocab_id": held_meta["vocab_id"]}
    if out["vocab_id"] != out["held_vocab_id"]:
        raise SystemExit("the held-out corpus is not on the pretraining vocabulary")
    meta_path.write_text(json.dumps(out, indent=2))
    return out


def held_out(work: Path):
    """(counts CSR, labels, corpus) of the held-out cells."""
    import scipy.sparse as sp

    from epiflow.corpus.shard import open_corpus

    corpus = open_corpus(work / "corpus_held")
    mats, labels = [], []
    for sh in corpus.iter_shards():
        mats.append(sh.counts_csr())
        labels.append(sh.obs["cell_type"].astype(str).to_numpy())
    return sp.vstack(mats, format="csr"), np.concatenate(labels), corpus


# ----------------------------------------------------------------------------- scoring
def score(emb: np.ndarray, labels: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> dict:
    from epiflow.metrics.clustering import clustering_scores, leiden_bisect

    emb = np.asarray(emb, dtype=np.float32)
    pred, res, reached = leiden_bisect(emb, len(np.unique(labels)), n_neighbors=n_neighbors, seed=seed)
    s = clustering_scores(labels, pred)
    return {"NMI": round(s["NMI"], 4), "ARI": round(s["ARI"], 4), "reached": bool(reached)}


def baselines(work: Path, seed: int = 0) -> dict:
    from epiflow.baselines.adapters.light import _pca
    from epiflow.baselines.lsi import LSI_RECIPES, lsi
    from epiflow.baselines.preprocess import log_normalise

    out_path = work / "baselines.json"
    counts, labels, _ = held_out(work)
    res = json.loads(out_path.read_text()) if out_path.exists() else {}
    for recipe in LSI_RECIPES:
        key = f"LSI[{recipe}]"
        if key in res:
            continue
        t0 = time.time()
        emb, info = lsi(counts, 50, recipe=recipe, seed=seed, return_info=True)
        res[key] = {**score(emb, labels, seed), "dims": int(emb.shape[1]),
                    "dropped_first": info["dropped_first"], "wall_s": round(time.time() - t0, 1)}
        log.info("%s %s", key, res[key])
        out_path.write_text(json.dumps(res, indent=2))
    if "PCA" not in res:
        emb, k = _pca(log_normalise(counts), 50, seed)
        res["PCA"] = {**score(emb, labels, seed), "dims": int(k)}
        out_path.write_text(json.dumps(res, indent=2))
    return res


def lsi_grid(h5ad: Path, seeds=(0, 1)) -> dict:
    """Every LSI recipe on the raw peaks of an h5ad (obs ``cell_type``), Leiden seeds averaged."""
    import anndata as ad

    from epiflow.baselines.lsi import LSI_RECIPES, lsi
    from epiflow.metrics.clustering import clustering_scores, leiden_bisect

    a = ad.read_h5ad(h5ad)
    x = a.X.tocsr()
    keep = np.diff(x.indptr) > 0
    x, lab = x[keep], a.obs["cell_type"].astype(str).to_numpy()[keep]
    out = {}
    for recipe in LSI_RECIPES:
        emb = lsi(x, 50, recipe=recipe, seed=0)
        s = [clustering_scores(lab, leiden_bisect(emb, len(set(lab)), seed=sd)[0]) for sd in seeds]
        out[recipe] = {m: round(float(np.mean([v[m] for v in s])), 4) for m in ("NMI", "ARI")}
        log.info("%s %s %s", h5ad.name, recipe, out[recipe])
    return out


def diagnose(work: Path, name: str, seeds=(1, 2, 3)) -> dict:
    """Depth structure of a run's held-out embeddings: variance fraction and |Spearman with the number
    of accessible cCREs| of the first 5 PCs, NMI / ARI after regressing log depth out, and the
    Leiden-seed spread of the plain [CLS] scores."""
    from scipy.stats import spearmanr

    from epiflow.model import load_epiagent_checkpoint
    from epiflow.model.inference import embed

    counts, labels, _ = held_out(work)
    depth = np.diff(counts.indptr)
    model = load_epiagent_checkpoint(work / "runs" / name / "checkpoint.pth").eval()
    out = {}
    for readout in ("cls", "mean"):
        e = embed(work / "corpus_held", model, progress=False, device="cpu", readout=readout).obsm["X_epiagent"]
        u, sv, _ = np.linalg.svd(e - e.mean(0), full_matrices=False)
        pcs = u * sv
        x = np.c_[np.ones(len(depth)), np.log(depth)]
        resid = e - x @ np.linalg.lstsq(x, e, rcond=None)[0]
        out[readout] = {
            "pc_var_frac": [round(float(v), 3) for v in sv[:5] ** 2 / (sv ** 2).sum()],
            "pc_abs_spearman_depth": [round(abs(float(spearmanr(pcs[:, i], depth).statistic)), 3) for i in range(5)],
            "depth_regressed": score(resid, labels),
            "leiden_seeds": {sd: score(e, labels, sd) for sd in seeds},
        }
    return out


def prepare_cross(work: Path, data: Path, min_ccres: int) -> Path:
    """(once) Buenrostro 2018 BM0828 (another study, its own peaks) mapped onto the pretraining
    corpus's vocabulary and tokenized with its df: ``WORK/corpus_buen``."""
    from epiflow.corpus.build import build_corpus
    from epiflow.corpus.manifest import load_manifest
    from epiflow.corpus.mapping import map_dataset, write_mapped
    from epiflow.genome.bed import read_bed

    out = work / "corpus_buen"
    if (out / "corpus.json").exists():
        return out
    (work / "manifest_buen.tsv").write_text(
        "name\tformat\tpath\tgenome\ttissue\tcell_type_key\n"
        f"buenrostro2018\th5ad\t{data}\thg19\tbone_marrow\tcell_type\n")
    vocab = read_bed(work / "corpus_pre" / "vocab.bed")[["chrom", "start", "end"]]
    # only ~3 % of its counts fall in the 10,000-peak Granja panel: the panel, not a build mismatch
    m, rep = map_dataset(load_manifest(work / "manifest_buen.tsv")[0], vocab, "hg19", min_frac_in_ccres=0.0)
    write_mapped(m, work / "mapped_buen.h5ad", rep, work / "mapped_buen.json")
    build_corpus(vocab, [work / "mapped_buen.h5ad"], out, genome="hg19", min_ccres_per_cell=min_ccres,
                 shard_size=5000, vocabulary="external", external_df=work / "corpus_pre" / "df.npy")
    return out


def cross_study(work: Path, data: Path, names: list[str], min_ccres: int, seed: int = 0) -> dict:
    """Zero-shot [CLS] embeddings of the Buenrostro cells by each run's model, next to LSI (default
    recipe) and PCA on the same cells and vocabulary, and LSI on the study's own peaks (same cells)."""
    import anndata as ad

    from epiflow.baselines.adapters.light import _pca
    from epiflow.baselines.lsi import lsi
    from epiflow.baselines.preprocess import log_normalise
    from epiflow.model import load_epiagent_checkpoint
    from epiflow.model.inference import embed

    corpus = prepare_cross(work, data, min_ccres)
    from epiflow.corpus.shard import open_corpus

    c = open_corpus(corpus)
    shards = list(c.iter_shards())
    import scipy.sparse as sp

    counts = sp.vstack([sh.counts_csr() for sh in shards], format="csr")
    obs = np.concatenate([sh.obs["cell_id"].astype(str).to_numpy() if "cell_id" in sh.obs else
                          sh.obs.index.astype(str).to_numpy() for sh in shards])
    labels = np.concatenate([sh.obs["cell_type"].astype(str).to_numpy() for sh in shards])
    res_path = work / "cross_buenrostro.json"
    res = json.loads(res_path.read_text()) if res_path.exists() else {}
    res["n_cells"], res["n_types"] = int(len(labels)), int(len(np.unique(labels)))
    if "LSI[corpus vocab]" not in res:
        res["LSI[corpus vocab]"] = score(lsi(counts, 50, seed=seed), labels, seed)
        emb, _ = _pca(log_normalise(counts), 50, seed)
        res["PCA[corpus vocab]"] = score(emb, labels, seed)
        own = ad.read_h5ad(data)
        own_ids = own.obs_names.astype(str).to_numpy()
        pos = {b: i for i, b in enumerate(own_ids)}
        keep = [pos.get(b.split(":", 1)[-1], pos.get(b)) for b in obs]
        if all(k is not None for k in keep):
            X = sp.csr_matrix(own.X)[np.asarray(keep)]
            res["LSI[own peaks]"] = score(lsi(X, 50, seed=seed), labels, seed)
        else:
            res["LSI[own peaks]"] = "cell ids not matched"
    for name in names:
        model = load_epiagent_checkpoint(work / "runs" / name / "checkpoint.pth").eval()
        e = embed(corpus, model, progress=False, device="cpu").obsm["X_epiagent"]
        res[f"EpiAgent[{name}]"] = score(e, labels, seed)
    res_path.write_text(json.dumps(res, indent=2))
    return res


def annotate_heldout(work: Path, name: str, seed: int = 0) -> dict:
    """The annotation task (``epiflow.tasks.annotation.run``, its defaults: a linear head fine-tuned
    with the encoder, 20 epochs) on the held-out cells with a run's checkpoint, next to LSI + logistic
    regression and LSI + SVM on the same reference / query split (1/3 query, stratified)."""
    from epiflow.report.results import write_task_result
    from epiflow.tasks.annotation import run
    from epiflow.tasks.common import load_cells, load_model
    from epiflow.tasks.config import AnnotationConfig

    out_dir = work / "runs" / name / "annotation"
    t0 = time.time()
    cfg = AnnotationConfig(seed=seed, backend="auto", progress=False, figures=False)
    cells = load_cells(work / "corpus_held")
    model = load_model(work / "runs" / name / "checkpoint.pth", n_ccres=cells.n_ccres, backend=cfg.backend,
                       device=cfg.device)
    res = run(cells, model, cfg)
    write_task_result(res, out_dir)
    met = res.metrics
    t = met[met["metric"].isin(["accuracy", "macro_F1"])].pivot_table(index="method", columns="metric",
                                                                        values="value")
    res = {m: {k: round(float(v), 4) for k, v in row.items()} for m, row in t.iterrows()}
    res["wall_s"] = round(time.time() - t0, 1)
    (out_dir / "result.json").write_text(json.dumps(res, indent=2))
    return res


def df_auroc(model, index, uids, max_len: int, seed: int, df: np.ndarray) -> float:
    """AUROC of a cell-independent score (corpus df of the queried cCRE) on the held-out CCA queries."""
    from sklearn.metrics import roc_auc_score

    from epiflow.train.data import BatchConfig, ShardCache, make_batch

    cache = ShardCache(index, capacity=4)
    bcfg = BatchConfig(n_ccres=index.n_ccres, max_len=max_len, k=1, rlm=False, seed=seed, cca_max_pos=2000)
    b = make_batch(cache, uids, 0, bcfg, train=False)
    return float(roc_auc_score(b["cca_label"].numpy(), df[b["cca_ids"].numpy() - 4]))


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    if v.lower() in ("none", "null"):
        return None
    if "," in v:
        return tuple(_parse_value(x) for x in v.split(","))
    return v


def run(args) -> dict:

    from epiflow.model import load_epiagent_checkpoint
    from epiflow.model.inference import embed
    from epiflow.train.data import build_index
    from epiflow.train.pretrain import PretrainConfig, evaluate_cca, pretrain

    work = Path(args.work)
    train_seed = args.seed if args.train_seed is None else args.train_seed
    sets = dict(kv.split("=", 1) for kv in args.set)
    sets = {k: _parse_value(v) for k, v in sets.items()}
    model_over = {k: _parse_value(v) for k, v in (kv.split("=", 1) for kv in args.model)}
    out_dir = work / "runs" / args.name
    cfg = PretrainConfig(model_config=args.preset, model_overrides=model_over, progress=False,
                         eval_fraction=0.02, ckpt_every=0, device="cpu", seed=train_seed)
    cfg = PretrainConfig(**{**cfg.__dict__, **sets})
    t0 = time.time()
    if args.steps_only_eval and (out_dir / "checkpoint.pth").exists():
        summary = json.loads((out_dir / "summary.json").read_text())
    else:
        summary = pretrain(work / "corpus_pre", out_dir, cfg)
    wall = time.time() - t0
    model = load_epiagent_checkpoint(out_dir / "checkpoint.pth")
    model.eval()
    counts, labels, corpus = held_out(work)
    row = {"name": args.name, "preset": args.preset, "options": {**sets, **{f"model.{k}": v for k, v in
                                                                             model_over.items()}},
           "steps": summary["steps"], "epochs": cfg.epochs, "pretrain_wall_s": round(wall, 1),
           "last_loss": summary.get("last", {}).get("loss"), "train_seed": train_seed}
    index = build_index(work / "corpus_held")
    uids = np.arange(index.n_cells)
    max_len = min(8190, model.config.max_rank - 2) if cfg.max_len is None else cfg.max_len
    ev = evaluate_cca(model, index, uids, max_len=max_len, seed=args.seed, max_pos=2000)
    row["heldout_cca_auroc"] = round(ev["cca_auroc"], 4)
    df = np.load(work / "corpus_pre" / "df.npy")
    row["df_only_auroc"] = round(df_auroc(model, index, uids, max_len, args.seed, df), 4)
    for readout in args.readouts:
        t1 = time.time()
        a = embed(work / "corpus_held", model, max_len=max_len, progress=False, device="cpu",
                  readout=readout)
        emb = a.obsm["X_epiagent"]
        assert (a.obs["cell_type"].astype(str).to_numpy() == labels).all()
        row[f"zs[{readout}]"] = {**score(emb, labels, args.seed), "embed_s": round(time.time() - t1, 1)}
        z = (emb - emb.mean(0)) / (emb.std(0) + 1e-6)
        row[f"zs[{readout},z]"] = score(z, labels, args.seed)
    if args.finetune_epochs > 0:  # the feature-extraction task's fine-tuning (CCA K=1 + SR) on the held-out cells
        from epiflow.tasks.features_finetune import finetune_embeddings

        t1 = time.time()
        ft = finetune_embeddings(out_dir / "checkpoint.pth", work / "corpus_held", epochs=args.finetune_epochs,
                                 lr=args.finetune_lr, max_len=max_len, seed=train_seed, device="cpu",
                                 zero_shot=False, progress=False, sr_objective=cfg.sr_objective)
        row["ft[cls]"] = {**score(ft["finetuned"], labels, args.seed), "epochs": args.finetune_epochs,
                          "lr": args.finetune_lr, "steps": ft.get("steps"), "ft_s": round(time.time() - t1, 1)}
    row["total_wall_s"] = round(time.time() - t0, 1)
    (out_dir / "result.json").write_text(json.dumps(row, indent=2, default=str))
    table = Path(args.table) if args.table else work / "sweep.tsv"
    new = not table.exists()
    with open(table, "a") as fh:
        if new:
            fh.write("name\tpreset\tsteps\tepochs\tpretrain_wall_s\theldout_cca_auroc\tdf_only_auroc\t"
                     "readouts\toptions\n")
        ro = "; ".join(f"{k}: NMI {v['NMI']:.3f} ARI {v['ARI']:.3f}" for k, v in row.items()
                       if k.startswith(("zs[", "ft[")))
        fh.write(f"{args.name}\t{args.preset}\t{row['steps']}\t{row['epochs']}\t{row['pretrain_wall_s']}\t"
                 f"{row['heldout_cca_auroc']}\t{row['df_only_auroc']}\t{ro}\t{json.dumps(row['options'])}\n")
    print(json.dumps(row, indent=2, default=str))
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("prepare", "baselines", "run", "lsi-grid", "diagnose", "annotate", "cross"))
    p.add_argument("--h5ad", nargs="*", default=[], help="lsi-grid: h5ad files of raw peak counts")
    p.add_argument("--work", default=str(ROOT / "results" / "transfer"))
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--heldout", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0, help="the split, evaluation and Leiden seed")
    p.add_argument("--train-seed", type=int, default=None,
                   help="pretraining / fine-tuning seed (default: --seed); the split stays that of --seed")
    p.add_argument("--min-cells", type=int, default=20, help="vocabulary curation threshold (cells)")
    p.add_argument("--min-ccres", type=int, default=30, help="cells with fewer accessible cCREs are dropped")
    p.add_argument("--max-cells", type=int, default=None, help="stratified subset of the data set first")
    p.add_argument("--name", default="run")
    p.add_argument("--names", nargs="*", default=[], help="cross: the runs to evaluate (default --name)")
    p.add_argument("--cross-data", default=str(DEFAULT_DATA.parent / "buenrostro2018_bm0828.h5ad"),
                   help="cross: the other study's h5ad (default Buenrostro 2018 BM0828)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", action="append", default=[], help="PretrainConfig field=value (repeatable)")
    p.add_argument("--model", action="append", default=[], help="model-config field=value (repeatable)")
    p.add_argument("--readouts", nargs="+", default=["cls"])
    p.add_argument("--table", default=None)
    p.add_argument("--finetune-epochs", type=int, default=0, help="also fine-tune on the held-out cells (CCA + SR)")
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--steps-only-eval", action="store_true", help="re-evaluate an existing run folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.what == "lsi-grid":
        print(json.dumps({Path(h).name: lsi_grid(Path(h)) for h in args.h5ad}, indent=2))
        return
    work = Path(args.work)
    info = prepare(work, Path(args.data), args.heldout, args.seed, args.min_cells, args.min_ccres, args.max_cells)
    if args.what == "prepare":
        print(json.dumps(info, indent=2))
    elif args.what == "diagnose":
        print(json.dumps(diagnose(work, args.name), indent=2))
    elif args.what == "cross":
        print(json.dumps(cross_study(work, Path(args.cross_data), args.names or [args.name], args.min_ccres,
                                     args.seed), indent=2))
    elif args.what == "annotate":
        print(json.dumps(annotate_heldout(work, args.name, args.seed), indent=2))
    elif args.what == "baselines":
        print(json.dumps(baselines(work, args.seed), indent=2))
    else:
        run(args)


if __name__ == "__main__":
    main()
