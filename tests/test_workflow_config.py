"""The configuration files: schema coverage, documentation of every key, shipped configs valid."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from epiflow.tasks.registry import workflow_schema

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = workflow_schema(ROOT / "workflow/schemas/config.schema.yaml")  # + the task settings
RAW_SCHEMA = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
DEFAULT = yaml.safe_load((ROOT / "config/config.yaml").read_text())


def _resolve(node) -> dict:
    if isinstance(node, bool):  # `false`: a key forbidden in this variant
        return {}
    while "$ref" in node:
        node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    if "allOf" in node:
        merged: dict = {}
        for part in node["allOf"]:
            part = _resolve(part)
            merged.setdefault("properties", {}).update(part.get("properties", {}))
            for k, v in part.items():
                if k != "properties":
                    merged.setdefault(k, v)
        return merged
    return node


def _schema_keys(node: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the leaf keys (values that are not sections)."""
    node = _resolve(node)
    keys = []
    for name, sub in node.get("properties", {}).items():
        if sub is False:
            continue
        path = f"{prefix}{name}"
        inner = _schema_keys(sub, path + ".")
        keys += inner if inner else [path]
    return keys


def _objects_close(node: dict, path: str = "<top>") -> list[str]:
    """Paths of object schemas that would accept unknown keys."""
    node = _resolve(node)
    bad = []
    if node.get("type") == "object" or "properties" in node:
        if node.get("additionalProperties", True) is not False:
            bad.append(path)
        for name, sub in node.get("properties", {}).items():
            if sub is not False:
                bad += _objects_close(sub, f"{path}.{name}")
    return bad


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_every_object_level_forbids_unknown_keys():
    # baselines.params maps tool names (open set) to their parameters, downloads file names to URLs;
    # everything else is closed
    assert _objects_close(SCHEMA) == ["<top>.downloads", "<top>.baselines.params"]


def test_default_config_matches_schema_exactly():
    jsonschema.Draft202012Validator(SCHEMA).validate(DEFAULT)
    # every key the schema file declares is present in the default, except the optional per-rule
    # resource entries and the optional per-task tool lists of the baselines (the task settings,
    # added from epiflow.tasks.config, may be left out: their defaults are the verbs')
    missing = [k for k in _schema_keys(RAW_SCHEMA)
               if not k.startswith(("resources.", "baselines.tasks."))]
    for key in missing:
        node = DEFAULT
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"config/config.yaml lacks '{key}'"
            node = node[part]


def test_every_key_is_documented_in_config_readme():
    text = (ROOT / "config/README.md").read_text()
    undocumented = [k for k in _schema_keys(SCHEMA)
                    if f"`{k}`" not in text and not k.startswith("resources.")]
    assert undocumented == []
    assert "`resources.default`" in text and "`resources.<rule>`" in text
    for rule in set(_resolve(SCHEMA["properties"]["resources"])["properties"]) - {"default"}:
        assert f"`{rule}`" in text, rule


def test_settings_table_of_config_readme_is_current():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "scripts/settings_doc.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def test_task_settings_in_the_schema_are_the_dataclasses():
    """A setting's bounds and choices reach the config check (declared once, in tasks.config)."""
    import copy

    bad = copy.deepcopy(DEFAULT)
    bad["tasks"]["annotation"]["head"] = "forest"
    with pytest.raises(jsonschema.ValidationError, match="forest"):
        jsonschema.Draft202012Validator(SCHEMA).validate(bad)
    bad = copy.deepcopy(DEFAULT)
    bad["tasks"]["knockout"]["max_steps"] = -1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMA).validate(bad)
    bad = copy.deepcopy(DEFAULT)
    bad["tasks"]["integration"]["device"] = "gpu"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMA).validate(bad)
    ok = copy.deepcopy(DEFAULT)
    del ok["tasks"]["annotation"]["epochs"]  # a setting left out: the verb's default
    jsonschema.Draft202012Validator(SCHEMA).validate(ok)


@pytest.mark.parametrize("name", ["test.yaml", "realdata.yaml", "published_weights.yaml"])
def test_shipped_override_configs_are_valid(name):
    over = yaml.safe_load((ROOT / "config" / name).read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(_merge(DEFAULT, over))


def test_realdata_manifest_lists_existing_shared_files():
    from epiflow.corpus.manifest import load_manifest

    entries = load_manifest(ROOT / "config/manifests/shared_hg19.tsv")
    assert {e.name for e in entries} == {"buenrostro2018_bm0828", "granja2019_bmmc",
                                         "buenrostro2018_20cells", "pbmc_multiome",
                                         "semisynthetic_stimulation", "semisynthetic_genetic"}
    assert {e.genome for e in entries} == {"hg19", "hg38"}
    # the semi-synthetic benchmarks are written by the workflow (rule perturbation_benchmark) where
    # config/realdata.yaml's results_dir puts them; they are downstream datasets
    generated = {e.name: e for e in entries if e.name.startswith("semisynthetic_")}
    assert all(e.role == "downstream" for e in generated.values())
    real = yaml.safe_load((ROOT / "config/realdata.yaml").read_text())
    for e in generated.values():
        assert (ROOT / "config/manifests" / e.path).resolve() == (
            ROOT / real["results_dir"] / "perturbation_benchmark" / Path(e.path).name).resolve()
    data = ROOT.parent / "shared" / "data"
    if not data.exists():
        pytest.skip(f"{data} absent")
    for e in entries:
        if e.name in generated:
            continue
        for rel in (e.path, e.labels, e.barcodes, e.peaks):
            if rel:
                assert (ROOT / "config/manifests" / rel).resolve().exists(), rel


def test_check_workflow_config_notes_renames_and_problems():
    """epiflow.workflow_config (what common.smk runs first): former setting names and numbers as text are
    read with a note; wrong values are problems naming the key; both names at once is an error."""
    from epiflow.errors import ConfigError
    from epiflow.workflow_config import check_workflow_config

    schema = ROOT / "workflow/schemas/config.schema.yaml"
    cfg = copy.deepcopy(DEFAULT)
    ko = cfg["tasks"]["knockout"]
    ko["finetune_steps"] = ko.pop("max_steps")
    cfg["tasks"]["annotation"]["lr"] = "1e-3"
    cfg["baselines"]["condition_key"] = "stim"   # no longer read: the perturbation baselines follow the task
    notes, problems = check_workflow_config(cfg, schema)
    assert problems == []
    assert any("'baselines.condition_key' ('stim') is no longer read: the perturbation baselines take the "
               "condition column of tasks.stimulation.condition_key" in n for n in notes)
    assert "condition_key" not in cfg["baselines"]
    assert any("tasks.knockout.finetune_steps' is now 'tasks.knockout.max_steps'" in n for n in notes)
    assert cfg["tasks"]["knockout"]["max_steps"] == 0 and cfg["tasks"]["annotation"]["lr"] == 0.001
    cfg["tasks"]["annotation"]["head"] = "forest"
    _, problems = check_workflow_config(cfg, schema)
    assert len(problems) == 1 and "tasks.annotation.head" in problems[0]
    # a user's config merged over config/config.yaml: the former name beside the new one at its default
    both = copy.deepcopy(DEFAULT)
    both["tasks"]["knockout"]["finetune_steps"] = 3
    notes, problems = check_workflow_config(both, schema)
    assert problems == [] and both["tasks"]["knockout"]["max_steps"] == 3
    assert any("finetune_steps' is now" in n for n in notes)
    # two different values, neither the default: which one was meant is not known
    both = copy.deepcopy(DEFAULT)
    both["tasks"]["knockout"].update(finetune_steps=3, max_steps=5)
    with pytest.raises(ConfigError, match="both 'finetune_steps'.*3.*'max_steps' \\(5\\)"):
        check_workflow_config(both, schema)


def test_files_the_config_names_are_checked_before_any_job(tmp_path, monkeypatch):
    """A bad manifest and an unknown model preset are configuration problems naming the key, found
    when the workflow is parsed, not in a job after the corpus is built; a manifest that is not there
    is said (naming the key and the working directory) by the jobs that need it."""
    from epiflow.workflow_config import check_workflow_config, missing_manifest_message

    schema = ROOT / "workflow/schemas/config.schema.yaml"
    monkeypatch.chdir(tmp_path)
    cfg = copy.deepcopy(DEFAULT)
    cfg["datasets"]["manifest"] = "config/manifests/nope.tsv"
    cfg["model"]["preset"] = "huge"
    _, problems = check_workflow_config(cfg, schema)
    assert problems == ["config key 'model.preset': unknown preset 'huge'; use one of tiny, small, paper, or "
                        "the path of a JSON model config (*.json)"]
    msg = missing_manifest_message("config/manifests/nope.tsv")
    assert "'datasets.manifest': config/manifests/nope.tsv not found" in msg and f"directory {tmp_path}" in msg
    # a manifest that lists one file for pretraining and for evaluation
    (tmp_path / "m.tsv").write_text("name\tformat\tpath\tgenome\trole\n"
                                    "a\th5ad\tx.h5ad\thg38\tcorpus\nb\th5ad\tx.h5ad\thg38\tdownstream\n")
    cfg["datasets"]["manifest"] = str(tmp_path / "m.tsv")
    cfg["model"]["preset"] = "my_model.json"
    _, problems = check_workflow_config(cfg, schema)
    assert len(problems) == 1 and "'datasets.manifest'" in problems[0] and "seen in pretraining" in problems[0]
    (tmp_path / "m.tsv").write_text("name\tformat\tpath\tgenome\na\th5ad\tx.h5ad\thg38\n")
    assert check_workflow_config(cfg, schema)[1] == []


def test_one_flag_name_per_thing_with_the_former_names_read():
    """The cell-type column is --label-key, a neighbour count --n-neighbors, the loss weights --w-cca /
    --w-sr on every verb; the former
    stimulation.cell_type_key / --cell-type-key and knockout.k / --k are still read (config keys with a
    note)."""
    from epiflow.cli import build_parser
    from epiflow.workflow_config import check_workflow_config

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for verb, action in sub.choices.items():
        opts = set(action._option_string_actions)
        if "--cell-type-key" in opts:
            assert action._option_string_actions["--cell-type-key"] is action._option_string_actions["--label-key"], verb
        if verb == "knockout":
            assert action._option_string_actions["--k"] is action._option_string_actions["--n-neighbors"]
    cfg = copy.deepcopy(DEFAULT)
    st, ko = cfg["tasks"]["stimulation"], cfg["tasks"]["knockout"]
    st["cell_type_key"] = st.pop("label_key")
    ko["k"] = 12
    notes, problems = check_workflow_config(cfg, ROOT / "workflow/schemas/config.schema.yaml")
    assert problems == []
    assert st["label_key"] == "cell_type" and ko["n_neighbors"] == 12 and "k" not in ko
    assert any("tasks.stimulation.cell_type_key' is now 'tasks.stimulation.label_key'" in n for n in notes)
    a = parser.parse_args(["predict-stimulation", "--corpus", "c", "--checkpoint", "m", "--out", "o",
                           "--cell-type-key", "ct"])
    assert a.label_key == "ct"
    a = parser.parse_args(["make-perturbation-benchmark", "--corpus", "c.h5ad", "--tss", "t", "--go", "g",
                           "--out", "o", "--cell-type-key", "ct"])
    assert a.label_key == "ct"
    a = parser.parse_args(["embed", "--checkpoint", "m", "--corpus", "c", "--out", "o.h5ad", "--key", "X_a"])
    assert a.embedding_key == "X_a"
    # the loss weights: --w-cca / --w-sr on pretrain and impute (impute said --cca-weight / --sr-weight)
    for verb, extra in (("pretrain", ["--corpus", "c", "--out", "o"]),
                        ("impute", ["--corpus", "c", "--checkpoint", "m", "--out", "o"])):
        a = parser.parse_args([verb, *extra, "--w-cca", "0.5", "--w-sr", "2"])
        assert (a.w_cca, a.w_sr) == (0.5, 2.0), verb
    a = parser.parse_args(["impute", "--corpus", "c", "--checkpoint", "m", "--out", "o", "--sr-weight", "3"])
    assert a.w_sr == 3.0


# the renames of one meaning per flag name (verb, former flag, flag now, argv the verb needs besides)
RENAMED_FLAGS = [
    ("candidate-ccres", "--stats", "--report", ["--genome", "hg38", "--out", "c.bed"]),
    ("build-corpus", "--min-cells", "--min-cells-per-ccre", ["--ccres", "c.bed", "--mapped", "m.h5ad", "--out", "o"]),
    ("knockout", "--ccres", "--target-ccres", ["--corpus", "c", "--checkpoint", "m", "--out", "o"]),
    ("knockout", "--upstream", "--promoter-upstream", ["--corpus", "c", "--checkpoint", "m", "--out", "o"]),
    ("knockout", "--downstream", "--promoter-downstream", ["--corpus", "c", "--checkpoint", "m", "--out", "o"]),
    ("pretrain", "--max-cells", "--max-batch-cells", ["--corpus", "c", "--out", "o"]),
    ("predict-genetic", "--top-neighbours", "--gene-neighbors",
     ["--corpus", "c", "--checkpoint", "m", "--go", "g", "--out", "o"]),
    ("gene-graph", "--top-neighbours", "--gene-neighbors", ["--go", "g", "--out", "o.tsv"]),
    ("build-corpus", "--vocabulary", "--vocabulary-mode", ["--ccres", "c.bed", "--mapped", "m.h5ad", "--out", "o"]),
    ("run-baseline", "--min-open-fraction", "--min-cell-fraction",
     ["--tool", "pca", "--task", "imputation", "--counts", "c.h5ad", "--out", "o"]),
]


@pytest.mark.parametrize("verb,old,new,extra", RENAMED_FLAGS, ids=[f"{r[0]}{r[1]}" for r in RENAMED_FLAGS])
def test_renamed_flags_keep_their_former_names(verb, old, new, extra):
    """A flag name means one thing on every verb: candidate-ccres --report (a summary JSON, as on map-dataset,
    liftover, detect-build), build-corpus --min-cells-per-ccre (--min-cells: fewest cells per group),
    knockout --target-ccres / --promoter-upstream / --promoter-downstream (--ccres: a candidate cCRE BED,
    --downstream: downstream datasets), pretrain --max-batch-cells (--max-cells: a random subset of cells),
    --gene-neighbors (as --n-neighbors), build-corpus --vocabulary-mode (config vocabulary.mode; --vocab: a
    BED), run-baseline --min-cell-fraction (impute's name). The former name gives the same setting; --help
    shows the new one."""
    from epiflow.cli import build_parser

    parser = build_parser([verb])
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    p = sub.choices[verb]
    assert p._option_string_actions[old] is p._option_string_actions[new]
    value = {"--target-ccres": "7,9", "--vocabulary-mode": "external"}.get(new, "7")
    a_new = parser.parse_args([verb, *extra, new, value])
    a_old = parser.parse_args([verb, *extra, old, value])
    dest = p._option_string_actions[new].dest
    assert dest == new.lstrip("-").replace("-", "_")
    assert getattr(a_old, dest) == getattr(a_new, dest) == {"--target-ccres": [7, 9], "--report": "7",
                                                            "--vocabulary-mode": "external"}.get(new, 7)
    assert new in p.format_help()


def test_renamed_config_keys_are_read_with_a_note():
    """The config keys of the renamed settings follow their flags; the former keys (tasks.knockout.ccres /
    upstream / downstream, tasks.genetic.top_neighbours, pretrain.max_cells) are read as the new ones
    with a note, and the workflow passes the new flags."""
    from epiflow.cliargs import to_argv
    from epiflow.errors import ConfigError
    from epiflow.tasks.config import GeneticConfig, KnockoutConfig
    from epiflow.train.config import PretrainConfig
    from epiflow.workflow_config import check_workflow_config

    cfg = copy.deepcopy(DEFAULT)
    ko, ge, pre = cfg["tasks"]["knockout"], cfg["tasks"]["genetic"], cfg["pretrain"]
    ko["upstream"], ko["downstream"] = ko.pop("promoter_upstream"), ko.pop("promoter_downstream")
    ko["ccres"] = [3, 1]
    ge["top_neighbours"] = 15
    pre["max_cells"] = pre.pop("max_batch_cells")
    notes, problems = check_workflow_config(cfg, ROOT / "workflow/schemas/config.schema.yaml")
    assert problems == []
    for where, old, new in (("tasks.knockout", "ccres", "target_ccres"), ("tasks.knockout", "upstream",
                            "promoter_upstream"), ("tasks.knockout", "downstream", "promoter_downstream"),
                            ("tasks.genetic", "top_neighbours", "gene_neighbors"),
                            ("pretrain", "max_cells", "max_batch_cells")):
        assert any(f"'{where}.{old}' is now '{where}.{new}'" in n for n in notes), (old, notes)
    assert (ko["target_ccres"], ko["promoter_upstream"], ko["promoter_downstream"]) == ([3, 1], 2000, 500)
    assert not {"ccres", "upstream", "downstream"} & set(ko)
    assert ge["gene_neighbors"] == 15 and "top_neighbours" not in ge
    assert pre["max_batch_cells"] is None and "max_cells" not in pre
    argv = to_argv(KnockoutConfig, ko)
    assert argv[argv.index("--target-ccres") + 1] == "3,1" and argv[argv.index("--promoter-upstream") + 1] == "2000"
    assert to_argv(GeneticConfig, ge)[to_argv(GeneticConfig, ge).index("--gene-neighbors") + 1] == "15"
    # a user's config merged over config/config.yaml: the former pretrain key beside the new one at its default
    both = copy.deepcopy(DEFAULT)
    both["pretrain"]["max_cells"] = 4
    notes, problems = check_workflow_config(both, ROOT / "workflow/schemas/config.schema.yaml")
    assert problems == [] and both["pretrain"]["max_batch_cells"] == 4 and "max_cells" not in both["pretrain"]
    argv = to_argv(PretrainConfig, both["pretrain"])
    assert argv[argv.index("--max-batch-cells") + 1] == "4"
    both["pretrain"].update(max_cells=2, max_batch_cells=4)
    with pytest.raises(ConfigError, match="pretrain: both 'max_cells'.*2.*'max_batch_cells' \\(4\\)"):
        check_workflow_config(both, ROOT / "workflow/schemas/config.schema.yaml")


def test_candidate_ccres_report_is_checked_before_any_work(tmp_path, capsys):
    """candidate-ccres --report (and its former name --stats) is an output the CLI checks up front, as
    --out: a folder where its JSON would go is an error before any work."""
    from epiflow.cli import main

    (tmp_path / "taken").mkdir()
    for name in ("--report", "--stats"):
        rc = main(["candidate-ccres", "--manifest", str(tmp_path / "m.tsv"), "--genome", "hg38",
                   "--out", str(tmp_path / "c.bed"), name, str(tmp_path / "taken")])
        err = capsys.readouterr().err
        assert rc == 2 and "--report path" in err and "must be a file" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
