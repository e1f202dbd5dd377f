"""config/paper.yaml: the paper's setup dry-runs on the SLURM profile without network or data, with the
paper model, 12 epochs, the K schedule, the RLM warm-up, SPEC section 4's batch settings, every downstream
task and the figure panels; its manifest lists sources for every dataset."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from epiflow.corpus.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = [str(BIN / "snakemake")] if (BIN / "snakemake").exists() else [sys.executable, "-m", "snakemake"]
PAPER = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
DOWNSTREAM = ["buenrostro2018", "kanemaru2023", "li2023b", "ameen2022", "lareau2019", "liscovitchbrauer2021",
              "pierce2021", "li2023a", "lee2023", "terekhanova2023", "zhang2021"]


def _jobs(out: str) -> dict[str, list[str]]:
    """rule -> shell commands of its jobs, from `snakemake -n -p` output."""
    jobs: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):", line)
        if m:
            current = m.group(1)
            jobs.setdefault(current, [])
        elif current and line.startswith("Shell command: "):
            jobs[current].append(line[len("Shell command: "):])
    return jobs


@pytest.fixture(scope="module")
def dry_run():
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    # no network: any download attempt in the planning process would fail on these proxies
    env.update(http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", ftp_proxy="http://127.0.0.1:9")
    proc = subprocess.run([*SNAKEMAKE, "--profile", "profiles/slurm", "--configfile", "config/paper.yaml", "-n",
                           "all"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out, _jobs(out)


def test_paper_dry_run_plans_every_stage(dry_run):
    out, jobs = dry_run
    for rule in ("candidate_ccres", "map_dataset", "build_corpus", "pretrain", "embed", "evaluate_features",
                 "annotate", "impute", "predict_stimulation", "predict_genetic", "integrate", "knockout",
                 "train_annotator", "annotate_zeroshot", "run_baseline", "summarize", "figure", "download"):
        assert rule in jobs, (rule, sorted(jobs))
    n_datasets = len(load_manifest(ROOT / PAPER["datasets"]["manifest"]))
    assert len(jobs["map_dataset"]) == n_datasets
    # the reference files are jobs of their own (run later, on the submitting machine), never fetched now
    assert len(jobs["download"]) == 2
    assert not (ROOT / PAPER["results_dir"]).exists() or not any((ROOT / PAPER["results_dir"]).rglob("*.gz"))


def test_paper_pretraining_settings(dry_run):
    _, jobs = dry_run
    (cmd,) = jobs["pretrain"]
    args = cmd.split()

    def val(flag):
        return args[args.index(flag) + 1]

    assert val("--model-config") == "paper"
    assert val("--epochs") == "12"
    assert val("--k-schedule") == "1,2,5"
    assert val("--rlm-epochs") == "2"
    assert val("--grad-accum") == "4"
    assert 2 <= int(val("--max-batch-cells")) <= 4
    assert int(val("--batch-tokens")) >= int(val("--max-batch-cells")) * 8192
    # 8 GPUs: the SLURM profile's pretraining allocation
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["set-resources"]["pretrain"]["gpu"] == 8
    assert cmd.startswith("srun ")


def test_paper_figures_are_planned(dry_run):
    out, jobs = dry_run
    planned = set(re.findall(r"figures/(fig\d[a-z](?:_[a-z0-9]+)?)\.png", out))
    # every benchmark of the paper has panels; the trajectory (fig2d-g) runs on Buenrostro 2018 only;
    # the query on the joint UMAP (fig4f / fig4g); both zero-shot annotators (EpiAgent-B: fig6b-d,
    # EpiAgent-NT: fig6e-g)
    for panel in ("fig2b", "fig2c", "fig2d", "fig2e", "fig2f", "fig2g", "fig2h", "fig2i", "fig2k", "fig3c", "fig3h",
                  "fig4c", "fig4d", "fig4e", "fig4f", "fig4g", "fig4g_scores", "fig5b", "fig5c", "fig5d", "fig5e",
                  "fig6b", "fig6c", "fig6d", "fig6e", "fig6f", "fig6g"):
        assert panel in planned, (panel, sorted(planned))
    from epiflow.plots.figures import PANELS

    assert set(PANELS) == planned, sorted(set(PANELS) ^ planned)  # every panel of the registry, no other
    # the paper panels no table can draw are listed, not drawn
    assert "figures/panels.tsv" in out and "fig4h" not in planned
    # Fig. 3d and 3g show the held-out mono-1 cells (tasks.stimulation.focus_group)
    figure_jobs = jobs["figure"]
    for panel in ("fig3d", "fig3g"):
        (cmd,) = [c for c in figure_jobs if f"epiflow figure {panel} " in c]
        assert "--group mono-1" in cmd, cmd
    assert not [c for c in figure_jobs if "--group" in c and not re.search(r"figure fig3[dg] ", c)]
    (stim,) = jobs["predict_stimulation"]
    assert "--focus-group mono-1" in stim
    (traj,) = jobs["evaluate_features_trajectory"]
    assert "--dataset buenrostro2018_hematopoiesis" in traj and "--trajectory" in traj and "--root-type HSC" in traj
    assert "--epochs " in traj  # zero-shot and fine-tuned embeddings, both with the trajectory
    assert len(jobs["evaluate_features"]) == 3


def test_paper_manifest_sources():
    entries = load_manifest(ROOT / PAPER["datasets"]["manifest"])
    names = [e.name for e in entries]
    for key in DOWNSTREAM:
        assert any(n.startswith(key) for n in names), key
    corpus = [e for e in entries if e.role == "corpus"]
    assert len(corpus) >= 10
    tenx = [e for e in corpus if e.name.startswith("tenx_")]
    assert tenx and all(e.url and e.url.startswith("https://cf.10xgenomics.com/") for e in tenx)
    for e in entries:
        assert e.url or e.path, e.name
        assert e.extra.get("note"), e.name  # where the file comes from, or why it is not fetched
        assert e.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", e.sha256)
        if e.extra.get("source_page"):
            assert e.extra["source_page"].startswith(("http://", "https://")), e.name
    # every dataset a task names is in the manifest (the workflow checks this too)
    for task, cfg in PAPER["tasks"].items():
        for key in ("datasets", "reference", "query"):
            for ds in cfg.get(key, []) or []:
                assert ds in names, (task, key, ds)


def test_paper_downloads_are_named_by_task_keys():
    files = {f"{PAPER['results_dir']}/downloads/{name}" for name in PAPER["downloads"]}
    assert PAPER["tasks"]["genetic"]["go"] in files
    assert PAPER["tasks"]["knockout"]["tss"] in files


GEO_PAGE = re.compile(r"https://www\.ncbi\.nlm\.nih\.gov/geo/query/acc\.cgi\?acc=(GSE\d+)$")


def test_paper_manifest_accessions_and_source_files():
    """Published datasets have no single-file URL: they name their accession (GEO series, ArrayExpress or
    EGA study; matching the source page) and the supplementary files established from public re-analyses
    (GEO files in the series' own folder), without inventing checksums."""
    entries = load_manifest(ROOT / PAPER["datasets"]["manifest"])
    with_acc = 0
    for e in entries:
        acc = e.extra.get("accession")
        page = GEO_PAGE.match(e.extra.get("source_page") or "")
        if page:
            assert acc == page.group(1), (e.name, acc)
        if acc:
            with_acc += 1
            assert re.fullmatch(r"GSE\d+|E-MTAB-\d+|EGAS\d+", acc), (e.name, acc)
        for url in (e.extra.get("source_files") or "").split():
            assert url.startswith("https://"), (e.name, url)
            if "ncbi.nlm.nih.gov/geo/series/" in url:
                assert acc and url.startswith(
                    f"https://ftp.ncbi.nlm.nih.gov/geo/series/{acc[:-3]}nnn/{acc}/suppl/{acc}_"), (e.name, url)
        if not e.url:
            # where the file comes from, or that its source could not be identified
            assert acc or e.extra.get("source_page") or "not identified" in e.extra["note"] \
                or "not verified" in e.extra["note"], e.name
        assert e.sha256 is None, e.name  # nothing was downloaded here: no checksum is claimed
    assert with_acc >= 24  # the accessions established (docs/paper.md lists the works without one)


def _real_run(tmp_path, *config):
    """A real (not dry) run of config/paper.yaml in an empty folder: it must stop before any job."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    manifest = ROOT / PAPER["datasets"]["manifest"]
    proc = subprocess.run([*SNAKEMAKE, "all", "-s", str(ROOT / "workflow" / "Snakefile"), "--directory",
                           str(tmp_path / "work"), "--profile", "profiles/local", "--cores", "1",
                           "--configfile", "config/paper.yaml", "--config",
                           f"datasets={{'manifest': '{manifest}'}}", *config],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc, proc.stdout + proc.stderr


def test_paper_run_without_data_stops_naming_the_datasets(tmp_path):
    proc, out = _real_run(tmp_path)
    assert proc.returncode != 0
    entries = load_manifest(ROOT / PAPER["datasets"]["manifest"])
    for e in entries:
        listed = f"  - {e.name} (line {e.line}" in out
        assert listed == (not e.url), (e.name, out[-4000:])  # URL entries would be downloaded
    assert "zhang2021_adult_tissues (line 2; accession GSE184462)" in out
    assert "No job was started" in out
    work = tmp_path / "work" / PAPER["results_dir"]
    assert not (work / "candidates").exists() and not (work / "mapped").exists()


def test_paper_run_accepts_files_from_data_mirror(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "zhang2021_adult_tissues_fragments.tsv.gz").write_bytes(b"")
    proc, out = _real_run(tmp_path, f"data_mirror={mirror}")
    assert proc.returncode != 0  # the other published datasets are still missing
    assert "zhang2021_adult_tissues" not in out and "domcke2020_fetal_tissues (line 3" in out
    assert str(mirror) in out  # the message shows where a mirrored file is looked for


def test_paper_downstream_datasets_stay_out_of_the_corpus(dry_run):
    """Issue 15: the corpus (vocabulary, df, pretraining cells) holds the corpus-role datasets only;
    the downstream ones are tokenized onto it and evaluated from their own folders."""
    _, jobs = dry_run
    roles = {e.name: e.role for e in load_manifest(ROOT / PAPER["datasets"]["manifest"])}
    # PAPER_FACTS: of the datasets used downstream only Li 2023a and Lee 2023 are in the paper's corpus
    assert roles["li2023a_brain"] == roles["lee2023"] == "corpus"
    for name in ("buenrostro2018_hematopoiesis", "kanemaru2023_heart", "li2023b", "ameen2022_fetal_heart",
                 "lareau2019_lps_bmmc", "liscovitchbrauer2021_crispr_sciatac", "pierce2021_spear_atac",
                 "terekhanova2023_pancancer"):
        assert roles[name] == "downstream", name
    (build,) = jobs["build_corpus"]
    for name, role in roles.items():
        assert (f"/mapped/{name}.h5ad" in build) == (role == "corpus"), name
    assert len(jobs["downstream_corpus"]) == sum(r == "downstream" for r in roles.values())
    (pretrain,) = jobs["pretrain"]
    assert "/downstream/" not in pretrain
    for cmd in jobs["evaluate_features"] + jobs["annotate"] + jobs["impute"]:
        assert "/downstream/" in cmd, cmd


# PAPER_FACTS.md ("The corpus" / "Which data each experiment uses"): the paper's reference numbers of the
# works in its corpus and of its downstream-only datasets. 48 (Lareau 2019) is in both: its resting cells
# are in the corpus, resting vs LPS cells are the stimulation task.
CORPUS_REFS = {6, 7, 8, 9, 48, 57, *range(61, 79)}
DOWNSTREAM_REFS = {37, 38, 39, 40, 48, 53, 54, 60}
# the 10x PBMC sets whose fragments URL could be established from public code (the paper has ten)
N_TENX_PBMC = 10


def test_paper_manifest_lists_every_reference_of_the_paper_with_its_role():
    entries = load_manifest(ROOT / PAPER["datasets"]["manifest"])
    by_ref: dict[str, set[str]] = {}
    for e in entries:
        ref = e.extra.get("paper_ref")
        assert ref, f"{e.name}: column paper_ref is empty"
        by_ref.setdefault(ref, set()).add(e.role)
    for ref in CORPUS_REFS:
        assert "corpus" in by_ref.get(str(ref), set()), f"reference {ref} has no corpus row"
    for ref in DOWNSTREAM_REFS:
        assert "downstream" in by_ref.get(str(ref), set()), f"reference {ref} has no downstream row"
    assert set(by_ref) == {str(r) for r in CORPUS_REFS | DOWNSTREAM_REFS} | {"10x"}, sorted(by_ref)
    # of the cited works only Lareau 2019 has rows of both roles; Li 2023a and Lee 2023 are corpus-only,
    # Li 2023b downstream-only ('10x': the PBMC sets in the corpus, the brain query downstream)
    assert {r for r, roles in by_ref.items() if len(roles) == 2} == {"48", "10x"}
    assert by_ref["8"] == by_ref["57"] == {"corpus"} and by_ref["39"] == {"downstream"}
    lareau = {e.name: e for e in entries if e.extra.get("paper_ref") == "48"}
    assert lareau["lareau2019_resting_bmmc"].role == "corpus"
    assert lareau["lareau2019_lps_bmmc"].role == "downstream"
    assert lareau["lareau2019_resting_bmmc"].path != lareau["lareau2019_lps_bmmc"].path  # resting cells only

    tenx = [e for e in entries if e.extra.get("paper_ref") == "10x"]
    pbmc = [e for e in tenx if e.role == "corpus"]
    assert len(pbmc) == N_TENX_PBMC and {e.tissue for e in pbmc} == {"blood"}
    assert len({e.url for e in pbmc}) == N_TENX_PBMC
    assert all(e.url.startswith("https://cf.10xgenomics.com/samples/cell-") for e in pbmc)
    (query,) = [e for e in tenx if e.role == "downstream"]
    assert query.name == "tenx_multiome_human_brain_3k" and query.extra["paper_task"] == "integration_query"
    assert (query.genome, query.tissue, query.format) == ("hg38", "brain", "fragments")
    assert query.url.endswith("/human_brain_3k_atac_fragments.tsv.gz")
    named = {e.name: e for e in entries}
    assert named["lee2023"].tissue == named["li2023b"].tissue == "brain"
    assert "ranzoni2021_fetal_hspc" not in named  # not among the paper's references


def test_paper_pretraining_reads_no_downstream_dataset(dry_run):
    """The corpus build and pretraining name every corpus-role dataset and no downstream-role one (the
    corpus-role Lareau row holds the resting cells only). The candidate cCREs read the manifest, whose
    downstream rows they skip by role (tests/test_roles.py)."""
    _, jobs = dry_run
    roles = {e.name: e.role for e in load_manifest(ROOT / PAPER["datasets"]["manifest"])}
    (build,) = jobs["build_corpus"]
    (pretrain,) = jobs["pretrain"]
    (candidates,) = jobs["candidate_ccres"]
    assert f"--manifest {PAPER['datasets']['manifest']}" in candidates
    built = set(re.findall(r"/mapped/([A-Za-z0-9._-]+)\.h5ad", build))
    assert built == {n for n, r in roles.items() if r == "corpus"}
    for name, role in roles.items():
        if role == "downstream":
            assert not re.search(rf"(^|[\s/,=]){re.escape(name)}([\s/.,]|$)", build + " " + pretrain), name


def test_paper_integration_reference_spans_corpus_and_downstream(dry_run):
    """Fig. 4: the reference is Li2023a + Lee2023 (corpus) + Li2023b (downstream), one batch per study;
    the query is the unlabelled 10x multiome brain dataset. integrate and the integration baseline read
    the corpus folder and Li2023b's folder together."""
    _, jobs = dry_run
    (integ,) = jobs["integrate"]
    assert "--corpus results/paper/corpus results/paper/downstream/li2023b " in integ
    assert "--dataset li2023a_brain,lee2023,li2023b" in integ and "--batch-key dataset" in integ
    assert "--query results/paper/downstream/tenx_multiome_human_brain_3k" in integ
    base = [c for c in jobs["run_baseline"] if "--task integration" in c]
    assert base and all("--corpus results/paper/corpus results/paper/downstream/li2023b " in c for c in base)


def test_paper_perturbation_baselines(dry_run):
    """PAPER_FACTS ("Which data each experiment uses"): scGen and scPRAM on the Lareau 2019 LPS stimulation,
    leave-one-cell-type-out over every type as EpiAgent's task; GEARS on both genetic screens with EpiAgent's
    split (non-targeting controls, 25 % held out, the task's seed and GO table); fig3g shows their UMAPs."""
    out, jobs = dry_run
    calls = {}
    for c in jobs["run_baseline"] + jobs["run_baseline_stimulation"]:
        task, ds, tool = re.search(r"--out (\S+)", c)[1].split("/baselines/")[1].split("/")
        calls[tool, task, ds] = c.split(" > ")[0].split()
    stim, gen = PAPER["tasks"]["stimulation"], PAPER["tasks"]["genetic"]

    def val(args, flag):
        return args[args.index(flag) + 1]

    assert sorted(k for k in calls if k[1] == "perturbation") == [("scgen", "perturbation", "lareau2019_lps_bmmc"),
                                                                  ("scpram", "perturbation", "lareau2019_lps_bmmc")]
    for tool in ("scgen", "scpram"):
        args = calls[tool, "perturbation", "lareau2019_lps_bmmc"]
        assert val(args, "--control") == stim["control"] == "control"
        assert val(args, "--condition-key") == "condition" and val(args, "--label-key") == "cell_type"
        assert "--holdout" not in args  # every usable type in turn, as predict-stimulation
        assert val(args, "--umap-group") == "mono-1"
    assert sorted(k for k in calls if k[1] == "genetic") == [("gears", "genetic", ds) for ds in gen["datasets"]]
    for ds in gen["datasets"]:
        args = calls["gears", "genetic", ds]
        assert val(args, "--control") == "non-targeting" and val(args, "--perturbation-key") == "perturbation"
        assert val(args, "--holdout-fraction") == "0.25" and val(args, "--seed") == "0"
        assert "--holdout" not in args
        assert f"'go=\"{gen['go']}\"'" in args
    (fig3g,) = [c for c in jobs["figure"] if "epiflow figure fig3g " in c]
    for tool in ("scgen", "scpram"):
        assert f"lareau2019_lps_bmmc=results/paper/baselines/perturbation/lareau2019_lps_bmmc/{tool}/cells.tsv" in fig3g
