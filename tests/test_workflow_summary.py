"""`epiflow summarize`: one table of a run's metrics."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from epiflow.cli import main
from epiflow.errors import InputFormatError
from epiflow.report import format_summary, read_summary, summarize


def _metrics(path, rows):
    pd.DataFrame(rows, columns=["task", "dataset", "method", "metric", "value"]).to_csv(path, sep="\t",
                                                                                       index=False)
    return path


@pytest.fixture
def run_dir(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "shards").mkdir(parents=True)
    (corpus / "corpus.json").write_text(json.dumps({"format": "epiflow-corpus", "n_cells": 436,
                                                    "n_ccres": 720, "genome": "hg38", "shards": ["x"]}))
    (corpus / "shards" / "shard_00000.h5").write_bytes(b"")
    pd.DataFrame({"step": [1, 2, 3], "loss": [9.0, 8.0, 7.5], "cca": [0.7, 0.69, 0.68],
                  "rlm_loss": [0.71, 0.7, np.nan]}).to_csv(tmp_path / "metrics.csv", index=False)
    a = _metrics(tmp_path / "a.tsv", [("feature_extraction", "atlas_b1", "EpiAgent", "NMI", 0.5),
                                      ("feature_extraction", "atlas_b1", "LSI", "NMI", 0.7)])
    b = _metrics(tmp_path / "b.tsv", [("annotation", "atlas_b1", "EpiAgent", "accuracy", 0.9)])
    return tmp_path, corpus, a, b


def test_summarize_concatenates_and_adds_corpus_and_pretraining(run_dir):
    tmp, corpus, a, b = run_dir
    table = summarize([a, b], corpus=corpus, pretrain_metrics=tmp / "metrics.csv", out=tmp / "s.tsv")
    assert list(table.columns) == ["task", "dataset", "method", "metric", "value", "seen_in_pretraining",
                                   "source"]
    got = {(r.task, r.method, r.metric): r.value for r in table.itertuples()}
    assert got[("corpus", "-", "n_cells")] == 436 and got[("corpus", "-", "n_ccres")] == 720
    assert got[("corpus", "-", "n_shards")] == 1
    assert got[("pretrain", "EpiAgent", "last_loss")] == 7.5
    assert got[("pretrain", "EpiAgent", "last_rlm_loss")] == 0.7  # last logged value, NaN skipped
    assert got[("feature_extraction", "LSI", "NMI")] == 0.7
    assert got[("annotation", "EpiAgent", "accuracy")] == 0.9
    back = read_summary(tmp / "s.tsv")
    assert len(back) == len(table)
    text = format_summary(back)
    assert "== corpus ==" in text and "== feature_extraction ==" in text and "== annotation ==" in text
    assert "436" in text and "0.7" in text


def test_bad_metrics_table_names_the_file_and_columns(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("task\tvalue\nx\t1\n")
    with pytest.raises(InputFormatError) as err:
        summarize([bad])
    msg = str(err.value)
    assert str(bad) in msg and "dataset" in msg and "metric" in msg


def test_cli_writes_and_prints(run_dir, capsys):
    tmp, corpus, a, b = run_dir
    out = tmp / "summary.tsv"
    assert main(["summarize", "--metrics", str(a), str(b), "--corpus", str(corpus), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.exists() and "atlas_b1" in printed
    assert main(["summarize", "--table", str(out)]) == 0
    assert capsys.readouterr().out == printed
    assert main(["summarize", "--metrics", str(tmp / "missing.tsv")]) == 2


def test_non_numeric_value_names_file_line_and_value(tmp_path, capsys):
    bad = _metrics(tmp_path / "b.tsv", [("annotation", "d", "EpiAgent", "F1", 0.5),
                                        ("annotation", "d", "EpiAgent", "accuracy", "abc")])
    out = tmp_path / "s.tsv"
    assert main(["summarize", "--metrics", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "line 3" in err and "'abc'" in err and "Fix:" in err, err
    assert not out.exists()
    # missing values stay accepted
    ok = tmp_path / "n.tsv"
    ok.write_text("task\tdataset\tmethod\tmetric\tvalue\na\td\tm\tx\tnan\na\td\tm\ty\tNA\na\td\tm\tz\t\n")
    assert read_summary(ok)["value"].isna().all()


def test_printout_keeps_headline_metrics_only(tmp_path):
    rows = [("stimulated_perturbation", "stim", "EpiAgent", "R2_all", 0.4),
            ("stimulated_perturbation", "stim", "EpiAgent", "R2_all[B]", 0.5),
            ("stimulated_perturbation", "stim", "EpiAgent", "k_used_up@100", 100),
            ("new_task", "d", "EpiAgent", "score", 0.3), ("new_task", "d", "EpiAgent", "score[x]", 0.2)]
    table = summarize([_metrics(tmp_path / "m.tsv", rows)])
    text = format_summary(table)
    assert "R2_all" in text and "R2_all[B]" not in text and "k_used_up" not in text
    assert "score" in text and "score[x]" not in text
    assert "R2_all[B]" in format_summary(table, all_metrics=True)


def test_compare_summaries_script(tmp_path, capsys):
    """scripts/compare_summaries.py: the rows of both tables whose value changed, as Markdown."""
    import importlib.util
    from pathlib import Path

    import pandas as pd

    path = Path(__file__).resolve().parents[1] / "scripts" / "compare_summaries.py"
    spec = importlib.util.spec_from_file_location("compare_summaries", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cols = ["task", "dataset", "method", "metric", "value", "seen_in_pretraining", "source"]
    a = pd.DataFrame([["annotation", "d", "EpiAgent", "accuracy", 0.5, "false", "x"],
                      ["annotation", "d", "LSI+SVM", "accuracy", 0.7, "false", "x"],
                      ["corpus", "all", "-", "n_cells", 10, "true", "x"]], columns=cols)
    b = a.copy()
    b.loc[0, "value"] = 0.6
    a.to_csv(tmp_path / "a.tsv", sep="\t", index=False)
    b.to_csv(tmp_path / "b.tsv", sep="\t", index=False)
    assert mod.main([str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "| annotation | d | EpiAgent | accuracy | 0.5 | 0.6 | +0.1 |" and len(out) == 3
    assert len(mod.compare(a, b, changed_only=False)) == 3
    assert mod.compare(a, b, tasks=["corpus"]).empty
    assert mod.main([str(tmp_path / "a.tsv"), str(tmp_path / "missing.tsv")]) == 2
