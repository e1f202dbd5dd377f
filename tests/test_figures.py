"""`epiflow figure`: every paper panel builds from small hand-made results tables, the panel names carry
the paper's letters, the panels no table can draw are listed with a reason, errors name what is
missing, and the workflow rebuilds one panel as a named target."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from epiflow.cli import main
from epiflow.errors import EpiflowError
from epiflow.plots.figures import (DRAW, NOT_DRAWN, PANEL_NAME, PANELS, PAPER_PANELS, build_panel, panel_table,
                                   paper_letter)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = [str(BIN / "snakemake")] if (BIN / "snakemake").exists() else [sys.executable, "-m", "snakemake"]
TYPES = ["B", "T", "NK", "Mono"]


def _long(rows):
    return pd.DataFrame(rows, columns=["task", "dataset", "method", "metric", "value"])


def _write(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, sep="\t", index=False, compression="gzip" if path.suffix == ".gz" else None)
    return path


def make_results(root: Path) -> dict:
    """Tables shaped like those of the task verbs (small, seeded): one long metrics table, and per config
    task key {dataset: [per-dataset tables]} (as the workflow passes a task's own folders)."""
    rng = np.random.default_rng(0)
    rows, tables = [], {}
    for ds in ("d1", "d2"):
        for m, base in (("EpiAgent", 0.7), ("LSI", 0.5)):
            rows += [("feature_extraction", ds, m, "NMI", base), ("feature_extraction", ds, m, "ARI", base - 0.1),
                     ("feature_extraction", ds, m, "n_clusters", 4),
                     ("trajectory", ds, m, "spearman_types", base)]
        for m, base in (("EpiAgent", 0.9), ("LSI+SVM", 0.8)):
            rows += [("annotation", ds, m, k, base - i * 0.05) for i, k in
                     enumerate(["accuracy", "balanced_accuracy", "macro_F1", "micro_F1", "weighted_F1"])]
        for m, base in (("Raw", 0.4), ("LSI-recon", 0.5), ("EpiAgent", 0.6)):
            rows += [("imputation", ds, m, "NMI", base), ("imputation", ds, m, "ARI", base - 0.1)]
        n = 40
        lab = np.array(TYPES)[rng.integers(0, 4, n)]
        cells = pd.DataFrame({"cell": [f"{ds}:c{i}" for i in range(n)], "cell_type": lab,
                              "leiden_EpiAgent": rng.integers(0, 4, n), "umap1_EpiAgent": rng.normal(size=n),
                              "umap2_EpiAgent": rng.normal(size=n), "leiden_LSI": rng.integers(0, 4, n),
                              "umap1_LSI": rng.normal(size=n), "umap2_LSI": rng.normal(size=n),
                              "pseudotime_EpiAgent": np.where(rng.random(n) < 0.9, rng.random(n), np.nan),
                              "pseudotime_LSI": rng.random(n)})
        traj = pd.DataFrame([{"dataset": ds, "method": m, "cell_type": t, "tier": i, "n_cells": 10,
                              "mean_pseudotime": i / 4 + (0.05 if m == "LSI" else 0)}
                             for m in ("EpiAgent", "LSI") for i, t in enumerate(TYPES)])
        pred = pd.DataFrame({"cell_id": cells["cell"], "dataset": ds, "split": ["query", "reference"] * (n // 2),
                             "true": lab, "pred_EpiAgent": np.where(rng.random(n) < 0.8, lab, "B"),
                             "pred_LSI+SVM": np.where(rng.random(n) < 0.6, lab, "T")})
        per_cell = pd.DataFrame({"cell_id": cells["cell"], "cell_type": lab})
        per_ccre = pd.DataFrame({"ccre_index": np.arange(60)})
        for m, r in (("Raw", 0.4), ("LSI-recon", 0.6), ("EpiAgent", 0.8)):
            per_cell[f"pearson_{m}"] = np.clip(rng.normal(r, 0.1, n), -1, 1)
            per_cell[f"mse_{m}"] = rng.uniform(0.1, 1.0, n)
            per_ccre[f"pearson_{m}"] = np.clip(rng.normal(r, 0.1, 60), -1, 1)
            per_ccre[f"mse_{m}"] = rng.uniform(0.1, 1.0, 60)
        paga = pd.DataFrame([{"dataset": ds, "method": m, "type_a": a, "type_b": b,
                              "connectivity": 0.9 if j == i + 1 else 0.02}
                             for m in ("EpiAgent", "LSI") for i, a in enumerate(TYPES) for j, b in enumerate(TYPES)
                             if j > i])
        tables.setdefault("feature_extraction", {})[ds] = [_write(cells, root / ds / "cells.tsv"),
                                                           _write(traj, root / ds / "trajectory.tsv"),
                                                           _write(paga, root / ds / "paga.tsv")]
        tables.setdefault("annotation", {})[ds] = [_write(pred, root / ds / "predictions.tsv")]
        tables.setdefault("imputation", {})[ds] = [_write(per_cell, root / ds / "per_cell.tsv"),
                                                   _write(per_ccre, root / ds / "per_ccre.tsv")]
    # perturbations: per-group rows, direction accuracies by k, the mean-accessibility table
    for task, ds in (("stimulated_perturbation", "stim"), ("genetic_perturbation", "screen")):
        for m, base in (("EpiAgent", 0.8), ("no_change", 0.5)):
            rows += [(task, ds, m, "R2_all", base), (task, ds, m, "R2_top1000", base - 0.1),
                     (task, ds, m, "wasserstein_top1000", 1 - base), (task, ds, m, "pearson_top1000", base),
                     (task, ds, m, "pearson_delta_top1000", base - 0.2)]
            rows += [(task, ds, m, f"dir_acc@{k}", base - k / 10000) for k in (100, 250, 1000)]
            rows += [(task, ds, m, f"R2_top1000[{g}]", base - 0.01 * i) for i, g in enumerate(["B", "T"])]
    groups = np.repeat(["B", "T"], 30)
    means = pd.DataFrame({"group": groups, "ccre": np.tile(np.arange(30), 2), "real_control": rng.random(60),
                          "real_perturbed": rng.random(60), "top_da": rng.random(60) < 0.3,
                          "pred_EpiAgent": rng.random(60)})
    # fig3g: predict-stimulation's cells.tsv (per held-out group and method, three kinds of cells)
    stim_cells = pd.concat([pd.DataFrame({"group": g, "method": m, "kind": np.repeat(["unperturbed", "perturbed",
                                                                                    "predicted"], 15),
                                          "cell": [f"{g}{i % 15}" for i in range(45)],
                                          "umap1": np.repeat([0.0, 3.0, 2.5 if m == "EpiAgent" else 0.5], 15)
                                          + rng.normal(0, 0.4, 45), "umap2": rng.normal(0, 1, 45)})
                            for g in ("B", "T") for m in ("EpiAgent", "no_change")], ignore_index=True)
    tables["stimulation"] = {"stim": [_write(means, root / "stim" / "mean_accessibility.tsv.gz"),
                                      _write(stim_cells, root / "stim" / "cells.tsv")]}
    # integration + query mapping
    for m, base in (("EpiAgent-BC", 0.8), ("EpiAgent-zeroshot", 0.6)):
        rows += [("integration", "atlas", m, k, base) for k in
                 ("NMI", "ARI", "ASW_cell_type", "iLISI", "kBET", "batch_ASW", "graph_connectivity")]
        rows += [("query_mapping", "q", m, "accuracy", base), ("query_mapping", "q", m, "macro_F1", base - 0.1)]
    qp = pd.DataFrame({"cell": [f"q{i}" for i in range(20)], "label": np.array(TYPES)[np.arange(20) % 4],
                       "pred_EpiAgent-BC": np.array(TYPES)[(np.arange(20) + (np.arange(20) % 5 == 0)) % 4]})
    umap = pd.DataFrame({"cell": [f"r{i}" for i in range(30)], "batch": np.array(["b1", "b2"])[np.arange(30) % 2],
                         "cell_type": np.array(TYPES)[np.arange(30) % 4]})
    for m in ("EpiAgent-BC", "EpiAgent-zeroshot", "LSI"):
        umap[f"umap1_{m}"], umap[f"umap2_{m}"] = rng.normal(size=30), rng.normal(size=30)
    # as integrate writes it with a query: the query's rows (no reference UMAP, its transferred label)
    # and the joint UMAP of reference and query
    umap["role"] = "reference"
    umap = pd.concat([umap, pd.DataFrame({"cell": qp["cell"], "role": "query", "batch": "query",
                                          "cell_type": qp["label"], "prediction": qp["pred_EpiAgent-BC"]})],
                     ignore_index=True)
    umap["joint_umap1"] = np.r_[rng.normal(size=30), rng.normal(2, 1, 20)]
    umap["joint_umap2"] = rng.normal(size=50)
    tables["integration"] = {"atlas": [_write(qp, root / "atlas" / "query_predictions.tsv"),
                                       _write(umap, root / "atlas" / "cells.tsv")]}
    # knockout
    rows += [("knockout", "tumor", "EpiAgent", "random_mean_effect", -0.001)]
    for i, g in enumerate(["MYC:10", "EGFR:20", "SOX2:30"]):
        rows += [("knockout", "tumor", "EpiAgent", f"mean_effect[{g}]", -0.01 * (i + 1)),
                 ("knockout", "tumor", "EpiAgent", f"p_value[{g}]", 10.0 ** -(i + 1))]
    ko = pd.DataFrame({"gene": ["MYC", "EGFR", "SOX2", "Group"], "ccre": [10, 20, 30, -1], "n_ccres": [1, 1, 1, 3],
                       "mean_effect": [-0.01, -0.02, -0.03, -0.05], "sd_effect": [0.005, 0.01, 0.01, 0.02],
                       "t": [-2.0, -3.0, -4.0, -5.0], "p_value": [0.1, 0.01, 0.001, 1e-4]})
    # fig5b: cCREs around two genes' TSS (one on each strand), the promoter cCREs marked
    near = pd.DataFrame({"gene": ["MYC"] * 6 + ["EGFR"] * 4, "rel_start": [-9000, -4000, -1500, -600, 300, 8000,
                                                                           -5000, -2500, -200, 4000]})
    near["rel_end"] = near["rel_start"] + 500
    near["window"] = np.where(near["gene"] == "MYC", 2000, 5000)
    near["downstream"] = 0
    near["target"] = [False, False, True, True, False, False, False, True, True, False]
    near["state_a"], near["state_b"] = "normal", "cancer"
    near["fraction_a"], near["fraction_b"] = rng.uniform(0, 0.3, 10), rng.uniform(0.1, 0.6, 10)
    # fig5c / fig5d: reference cells with a score gradient along UMAP1, query shifts per knockout
    score = rng.random(200)
    ref = pd.DataFrame({"cell": np.arange(200), "score": score, "umap1": 10 * score + rng.normal(0, 1, 200),
                        "umap2": rng.normal(0, 2, 200)})
    shifts = []
    for i, name in enumerate(["MYC:10", "EGFR:20", "SOX2:30", "Group"]):
        x0, y0 = 5 + rng.normal(0, 0.5, 12), rng.normal(0, 1, 12)
        shifts.append(pd.DataFrame({"knockout": name, "query": np.arange(12), "umap1_added": x0,
                                    "umap2_added": y0, "umap1_removed": x0 - 0.5 * (i + 1),
                                    "umap2_removed": y0 + rng.normal(0, 0.2, 12), "score_added": 0.5,
                                    "score_removed": 0.5 - 0.05 * (i + 1)}))
    tables["knockout"] = {"tumor": [_write(pd.DataFrame({"ccre": np.arange(50),
                                                         "mean_effect": rng.normal(0, 0.003, 50)}),
                                           root / "tumor" / "random.tsv"),
                                    _write(ko, root / "tumor" / "knockout.tsv"),
                                    _write(near, root / "tumor" / "tss_ccres.tsv"),
                                    _write(ref, root / "tumor" / "reference_cells.tsv"),
                                    _write(pd.concat(shifts), root / "tumor" / "shifts.tsv")]}
    # zero-shot annotation
    for m, base in (("EpiAgent-zeroshot", 0.7), ("EpiAgent-zeroshot-masked", 0.75)):
        rows += [("zeroshot_annotation", "new", m, k, base) for k in
                 ("accuracy", "micro_F1", "balanced_accuracy", "macro_F1")]
    zp = pd.DataFrame({"cell": [f"n{i}" for i in range(20)], "prediction": np.array(TYPES)[np.arange(20) % 4],
                       "label_mapped": np.array(TYPES)[(np.arange(20) // 5) % 4]})
    zc = zp.assign(label_mapped=zp["label_mapped"].where(np.arange(20) % 7 != 0),  # a few unmapped labels
                   umap1=rng.normal(size=20), umap2=rng.normal(size=20))
    tables["zeroshot_annotation"] = {"new": [_write(zp, root / "new" / "predictions.tsv"),
                                             _write(zc, root / "new" / "cells.tsv")]}
    metrics = _write(_long(rows), root / "metrics.tsv")
    return {"metrics": [metrics], "tables": tables}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return make_results(tmp_path_factory.mktemp("tables"))


def test_registry_covers_the_paper_figures():
    assert set(p.draw for p in PANELS.values()) <= set(DRAW)
    figs = {name[:4] for name in PANELS}
    assert figs == {"fig2", "fig3", "fig4", "fig5", "fig6"}
    for name, p in PANELS.items():
        assert p.name == name and p.benchmark and p.title and p.paper.startswith("Fig.")
    tab = panel_table()
    assert set(tab["panel"]) == set(PANELS) | set(NOT_DRAWN)
    assert (tab["status"] == "drawn").sum() == len(PANELS)


def _paper_facts_panels() -> dict[str, set[str]]:
    """fig<N> -> the letters of the result panels in PAPER_FACTS' "Figure panels" table (when the shared
    docs are there; schematic rows -- overviews, workflows, architectures -- left out), else the
    registry's own copy."""
    facts = ROOT.parent / "shared" / "docs" / "PAPER_FACTS.md"
    if not facts.exists():
        return {f: set(letters) for f, letters in PAPER_PANELS.items()}
    out: dict[str, set[str]] = {}
    for fig, letters, content in re.findall(r"^\| Fig\. (\d)([a-m](?:-[a-m])?(?:, \d[a-m])*) \| (.*) \|$",
                                            facts.read_text(), re.M):
        if fig == "1" or re.search(r"no result|workflow|overview|architecture", content):
            continue
        for part in letters.split(", "):
            out.setdefault(f"fig{fig}", set()).add(part[-1])
    return out


def test_panel_names_carry_the_paper_letters():
    """Every drawn or not-drawn panel is fig<N><letter>[_<view>] with a letter of a result panel of the
    paper's Fig. N (PAPER_FACTS), its paper column names that panel, and every result panel of the paper
    is drawn or listed as not drawn."""
    paper = _paper_facts_panels()
    assert paper == {f: set(ls) for f, ls in PAPER_PANELS.items()}
    for name in list(PANELS) + list(NOT_DRAWN):
        m = PANEL_NAME.match(name)
        assert m, name
        assert m.group(2) in paper[m.group(1)], name
        letter = paper_letter(name)
        what = PANELS[name].paper if name in PANELS else NOT_DRAWN[name].paper
        fig, let = letter[3], letter[4]
        assert re.match(rf"Fig\. {fig}([a-m]-)?[a-m]?", what) and (f"{fig}{let}" in what or "-" in what), (name, what)
    covered = {paper_letter(n) for n in PANELS if PANEL_NAME.match(n).group(3) is None} | set(NOT_DRAWN)
    for fig, letters in paper.items():
        for let in letters:
            assert f"{fig}{let}" in covered, f"paper panel {fig}{let} is neither drawn nor listed as not drawn"
    assert not set(PANELS) & set(NOT_DRAWN)


def test_not_drawn_panels_say_why(tmp_path, capsys):
    for name, nd in NOT_DRAWN.items():
        assert nd.reason and len(nd.reason) > 30 and nd.paper.startswith("Fig."), name
        assert set(nd.instead) <= set(PANELS), name
    with pytest.raises(EpiflowError, match="fig4h.*not drawn: needs the query's RNA"):
        build_panel("fig4h", out=tmp_path / "x.png")
    assert main(["figure", "--list"]) == 0
    listed = capsys.readouterr().out
    for name, nd in NOT_DRAWN.items():
        assert name in listed
    assert "not drawn: needs the query's RNA" in listed
    out = tmp_path / "panels.tsv"
    assert main(["figure", "--list", "--skip", "fig2f=no trajectory dataset", "--out", str(out)]) == 0
    tab = pd.read_csv(out, sep="\t").set_index("panel")
    assert tab.loc["fig2f", "status"] == "not built: no trajectory dataset"
    assert tab.loc["fig2b", "status"] == "drawn"
    assert tab.loc["fig4h", "status"].startswith("not drawn: ")
    assert main(["figure", "--list", "--skip", "fig9z=x"]) == 2
    assert main(["figure", "--list", "--skip", "fig2f"]) == 2


@pytest.mark.parametrize("panel", list(PANELS))
def test_every_panel_builds_from_small_tables(panel, results, tmp_path):
    from PIL import Image

    out = tmp_path / f"{panel}.png"
    tables = results["tables"].get(PANELS[panel].task_key, {})
    written = build_panel(panel, metrics=results["metrics"], tables=tables, out=out)
    assert written == [out] and out.stat().st_size > 5000
    with Image.open(out) as im:
        w, h = im.size
        assert w > 300 and h > 200
        # not a blank canvas: many distinct colours
        assert len(set(im.convert("RGB").resize((120, 80)).getdata())) > 20
    assert not list(tmp_path.glob("*.tmp*"))


def test_missing_inputs_are_named(results, tmp_path):
    with pytest.raises(EpiflowError, match="fig2b.*no metrics table"):
        build_panel("fig2b", out=tmp_path / "x.png")
    only_fe = _write(_long([("annotation", "d", "EpiAgent", "accuracy", 0.5)]), tmp_path / "m.tsv")
    with pytest.raises(EpiflowError, match="fig2b.*'feature_extraction'.*tasks.feature_extraction"):
        build_panel("fig2b", metrics=[only_fe], out=tmp_path / "x.png")
    with pytest.raises(EpiflowError, match="fig2c_epiagent.*cells.tsv"):
        build_panel("fig2c_epiagent", tables={"d1": results["tables"]["annotation"]["d1"]}, out=tmp_path / "x.png")
    bad = _write(pd.DataFrame({"cell": ["a"], "umap1_EpiAgent": [0.0], "umap2_EpiAgent": [0.0]}),
                 tmp_path / "bad" / "cells.tsv")
    with pytest.raises(EpiflowError, match="lacks column.*cell_type"):
        build_panel("fig2c_epiagent", tables={"d": [bad]}, out=tmp_path / "x.png")
    # a knockout run on cCRE indices (--target-ccres) writes tss_ccres.tsv without rows: fig5b says so
    empty = _write(pd.DataFrame(columns=["gene", "rel_start", "rel_end", "window", "downstream", "target",
                                         "state_a", "state_b", "fraction_a", "fraction_b"]),
                   tmp_path / "ko" / "tss_ccres.tsv")
    with pytest.raises(EpiflowError, match="fig5b.*tss_ccres.tsv of ko has no rows") as err:
        build_panel("fig5b", tables={"ko": [empty]}, out=tmp_path / "x.png")
    assert "--genes" in str(err.value.fix)
    with pytest.raises(EpiflowError, match="fig5d.*no 'shifts.tsv'"):
        build_panel("fig5d", tables={"tumor": results["tables"]["knockout"]["tumor"][:4]}, out=tmp_path / "x.png")
    with pytest.raises(EpiflowError, match="unknown figure panel 'fig9z'"):
        build_panel("fig9z", out=tmp_path / "x.png")
    # the joint UMAP panels need integrate's query rows; the zero-shot UMAP needs the annotator's UMAP
    ref_only = _write(pd.DataFrame({"cell": ["a", "b"], "role": "reference", "batch": "b1", "cell_type": "B",
                                    "prediction": None, "joint_umap1": [0.0, 1.0], "joint_umap2": [0.0, 1.0]}),
                      tmp_path / "ref" / "cells.tsv")
    with pytest.raises(EpiflowError, match="fig4f.*no query cells.*--query"):
        build_panel("fig4f", tables={"d": [ref_only, results["tables"]["integration"]["atlas"][0]]},
                    out=tmp_path / "x.png")
    with pytest.raises(EpiflowError, match="fig6b.*lacks column.*umap1"):
        build_panel("fig6b", tables={"d": results["tables"]["zeroshot_annotation"]["new"][:1] +
                                     [_write(pd.DataFrame({"cell": ["a"], "label_mapped": ["B"], "prediction": ["B"]}),
                                             tmp_path / "z" / "cells.tsv")]}, out=tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_group_option_draws_one_held_out_type(results, tmp_path):
    """--group (the workflow passes tasks.stimulation.focus_group, the paper's mono-1): fig3d / fig3g draw
    that held-out type alone; a type without rows and a panel without per-group views are clear errors."""
    from PIL import Image

    stim = results["tables"]["stimulation"]
    sizes = {}
    for groups in ((), ("T",)):
        for panel in ("fig3d", "fig3g"):
            out = tmp_path / f"{panel}{len(groups)}.png"
            build_panel(panel, tables=stim, out=out, groups=groups)
            with Image.open(out) as im:
                sizes[panel, len(groups)] = im.size
    # one row (fig3g) / one scatter (fig3d) instead of two
    assert sizes["fig3g", 1][1] < sizes["fig3g", 0][1]
    assert sizes["fig3d", 1][0] < sizes["fig3d", 0][0]
    with pytest.raises(EpiflowError, match="fig3g.*no group mono-1 \\(has: B, T\\)"):
        build_panel("fig3g", tables=stim, out=tmp_path / "x.png", groups=["mono-1"])
    with pytest.raises(EpiflowError, match="fig2b has no per-group views"):
        build_panel("fig2b", metrics=results["metrics"], out=tmp_path / "x.png", groups=["T"])
    cells = stim["stim"][1]
    assert main(["figure", "fig3g", "--table", f"stim={cells}", "--group", "B", "--out", str(tmp_path / "g.png")]) == 0
    assert main(["figure", "fig3g", "--table", f"stim={cells}", "--group", "X", "--out", str(tmp_path / "h.png")]) == 2
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "h.png").exists()


def test_cli(results, tmp_path, capsys):
    out = tmp_path / "fig2c_epiagent.png"
    d1 = results["tables"]["feature_extraction"]["d1"][0]
    assert main(["figure", "fig2c_epiagent", "--table", f"d1={d1}", "--out", str(out), "--svg"]) == 0
    assert out.exists() and out.with_suffix(".svg").exists()
    assert main(["figure", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in PANELS)
    assert main(["figure", "fig2c_epiagent", "--table", "no-equals-sign", "--out", str(out)]) == 2
    assert main(["figure", "fig2b", "--metrics", str(tmp_path / "missing.tsv"), "--out", str(out)]) == 2


def _snakemake(args, cwd=ROOT):
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([*SNAKEMAKE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_workflow_rebuilds_one_panel_as_a_named_target(results, tmp_path):
    """`snakemake <results>/figures/fig2b.png` on the test config with the task tables in place runs only
    the figure job; a panel the config cannot produce stops with a message naming the missing table."""
    res = tmp_path / "results" / "test"
    src = pd.read_csv(results["metrics"][0], sep="\t")
    fe = src[src["task"] == "feature_extraction"].drop_duplicates(["method", "metric"])
    # every feature-extraction dataset of config/test.yaml (atlas_b1, and the downstream pbmc_fragments)
    for name in ("atlas_b1", "pbmc_fragments"):
        _write(fe.assign(dataset=name), res / "tasks" / "feature_extraction" / name / "metrics.tsv")
    _write(_long([("feature_extraction", "atlas_b1", "LDA", "NMI", 0.3),
                  ("feature_extraction", "atlas_b1", "LDA", "ARI", 0.2)]), res / "baselines" / "metrics.tsv")
    common = ["-s", str(ROOT / "workflow" / "Snakefile"), "--directory", str(tmp_path), "--cores", "1",
              "--configfile", str(ROOT / "config" / "test.yaml")]
    dry = _snakemake(["results/test/figures/fig2b.png", "-n", *common])
    assert dry.returncode == 0, dry.stdout + dry.stderr
    jobs = [ln.split()[0] for ln in dry.stdout.split("Job stats:")[1].splitlines()[3:] if ln.strip()]
    assert jobs[:2] == ["figure", "total"], dry.stdout
    proc = _snakemake(["results/test/figures/fig2b.png", *common])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (res / "figures" / "fig2b.png").stat().st_size > 5000
    bad = _snakemake(["results/test/figures/fig2f.png", "-n", *common])
    assert bad.returncode != 0
    assert "figure fig2f" in bad.stderr + bad.stdout and "trajectory.tsv" in bad.stderr + bad.stdout


def test_fig3g_draws_the_baselines_cells_beside_epiagents(results, tmp_path):
    """fig3g reads the baseline tools' cells.tsv of the same dataset (run-baseline --task perturbation writes
    it with predict-stimulation's columns): their rows are stacked, so each (dataset, held-out type) row
    gets the baselines' UMAPs beside EpiAgent's methods; --group still selects the held-out type."""
    from PIL import Image

    import epiflow.plots.figures as figures

    epi = results["tables"]["stimulation"]["stim"][1]
    df = pd.read_csv(epi, sep="\t")
    scgen = df[df["method"] == "no_change"].assign(method="scGen")
    bl = _write(scgen, tmp_path / "baselines" / "perturbation" / "stim" / "scgen" / "cells.tsv")
    seen = {}
    draw = figures.DRAW["stimulation_umap"]

    def spy(panel, metrics, tables):
        seen["cells"] = tables["stim"]["cells.tsv"]
        return draw(panel, metrics, tables)

    sizes = {}
    try:
        figures.DRAW["stimulation_umap"] = spy
        for name, paths in (("alone", [epi]), ("both", [epi, bl])):
            build_panel("fig3g", tables={"stim": paths}, out=tmp_path / f"{name}.png", groups=["T"])
            with Image.open(tmp_path / f"{name}.png") as im:
                sizes[name] = im.size
    finally:
        figures.DRAW["stimulation_umap"] = draw
    cells = seen["cells"]
    assert set(cells["group"]) == {"T"} and set(cells["method"]) == {"EpiAgent", "no_change", "scGen"}
    assert len(cells) == 3 * 45
    assert sizes["both"][0] > sizes["alone"][0]  # one more UMAP in the row
    bad = _write(scgen.drop(columns=["cell"]), tmp_path / "bad" / "cells.tsv")
    with pytest.raises(EpiflowError, match="fig3g.*cells.tsv tables of stim have different columns"):
        build_panel("fig3g", tables={"stim": [epi, bad]}, out=tmp_path / "x.png")
