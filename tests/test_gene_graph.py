"""GEARS-style GO Jaccard gene graph: known Jaccard values, threshold, top-k, GAF input."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from epiflow.errors import InputFormatError
from epiflow.genome.gene_graph import build_gene_graph, read_go_annotations


def _table(d):
    return pd.DataFrame([(g, t) for g, ts in d.items() for t in ts], columns=["gene", "go_id"])


GO = {"A": ["GO:1", "GO:2", "GO:3"], "B": ["GO:1", "GO:2"], "C": ["GO:3", "GO:4"], "D": ["GO:5"]}


def _edges(graph):
    return {(r.gene, r.neighbour): r.jaccard for r in graph.to_frame().itertuples()}


def test_jaccard_known_answer(tmp_path):
    path = tmp_path / "go.tsv.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("gene_symbol\tgo_id\n")
        _table(GO).to_csv(fh, sep="\t", header=False, index=False)
    g = build_gene_graph(path)
    assert g.genes == ["A", "B", "C", "D"]
    e = _edges(g)
    assert e[("A", "B")] == pytest.approx(2 / 3) and e[("B", "A")] == pytest.approx(2 / 3)
    assert e[("A", "C")] == pytest.approx(1 / 4) and e[("C", "A")] == pytest.approx(1 / 4)
    assert len(e) == 4                       # B-C, *-D have Jaccard 0; no self loops
    # direction: row 0 = neighbour (source), row 1 = gene (target)
    i = g.index()
    k = list(zip(g.edge_index[1], g.edge_index[0])).index((i["A"], i["B"]))
    assert g.edge_weight[k] == pytest.approx(2 / 3)


def test_threshold_is_strict():
    assert ("A", "C") not in _edges(build_gene_graph(_table(GO), threshold=0.25))
    assert ("A", "C") in _edges(build_gene_graph(_table(GO), threshold=0.2499))


def test_top_k_keeps_most_similar():
    # G0 has 30 terms; H_i holds the first i of them: J(G0, H_i) = i / 30
    d = {"G0": [f"GO:{t}" for t in range(30)]}
    for i in range(1, 26):
        d[f"H{i:02d}"] = [f"GO:{t}" for t in range(i)]
    g = build_gene_graph(_table(d), top_k=20)
    nb = g.neighbours("G0")
    assert len(nb) == 20
    assert set(nb["gene"]) == {f"H{i:02d}" for i in range(6, 26)}
    assert nb["jaccard"].iloc[0] == pytest.approx(25 / 30)
    assert np.all(np.diff(nb["jaccard"].to_numpy()) <= 0)
    # every gene has at most 20 incoming edges, all above the threshold
    assert np.bincount(g.edge_index[1]).max() <= 20
    assert (g.edge_weight > 0.1).all()


def test_gene_subset_and_isolated_nodes():
    g = build_gene_graph(_table(GO), genes=["B", "A", "Z"])
    assert g.genes == ["B", "A", "Z"]
    assert set(_edges(g)) == {("A", "B"), ("B", "A")}


def test_gaf_input(tmp_path):
    gaf = tmp_path / "x.gaf"
    rows = [
        ["UniProtKB", "P1", "A", "", "GO:1", "ref", "IDA", "", "P", "", "", "protein", "taxon:9606", "2020", "x"],
        ["UniProtKB", "P1", "A", "NOT", "GO:9", "ref", "IDA", "", "P", "", "", "protein", "taxon:9606", "2020", "x"],
        ["UniProtKB", "P2", "B", "", "GO:1", "ref", "IDA", "", "P", "", "", "protein", "taxon:9606", "2020", "x"],
        ["UniProtKB", "P2", "B", "", "GO:7", "ref", "IDA", "", "F", "", "", "protein", "taxon:9606", "2020", "x"],
    ]
    gaf.write_text("!gaf-version: 2.2\n" + "\n".join("\t".join(r) for r in rows) + "\n")
    df = read_go_annotations(gaf)
    assert sorted(map(tuple, df.to_numpy())) == [("A", "GO:1"), ("B", "GO:1")]
    assert _edges(build_gene_graph(gaf))[("A", "B")] == pytest.approx(1.0)


def test_bad_file_is_clear(tmp_path):
    p = tmp_path / "bad.tsv"
    p.write_text("gene\tterm\nA\tnot_a_go_id\n")
    with pytest.raises(InputFormatError, match="GO ids"):
        read_go_annotations(p)
    with pytest.raises(InputFormatError, match="not found"):
        read_go_annotations(tmp_path / "missing.tsv")


def test_truncated_gzip_is_clear(tmp_path):
    text = "".join(f"GENE{i}\tGO:{i * 7919 % 10 ** 7:07d}\n" for i in range(50000))
    data = gzip.compress(text.encode())
    p = tmp_path / "go.tsv.gz"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFormatError, match="cannot decompress the GO annotation file") as ei:
        read_go_annotations(p)
    assert str(p) in str(ei.value) and "Fix:" in str(ei.value)


def test_shared_go_file(data_dir):
    path = data_dir / "go_bp_human.tsv.gz"
    if not path.exists():
        pytest.skip("go_bp_human.tsv.gz not in the shared data")
    g = build_gene_graph(path)
    assert g.n_genes > 15000
    assert np.bincount(g.edge_index[1]).max() <= 20 and (g.edge_weight > 0.1).all()
