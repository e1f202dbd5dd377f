from pathlib import Path


# Input check run by the Snakefile's onstart (real runs only, not dry runs): every dataset that the
# planned jobs read must have a URL or a local file (its manifest path, or the same file name in
# data_mirror). Published datasets of config/manifests/paper_datasets.tsv have no single-file URL
# and must be fetched by hand; without this check the run would stop later, inside a mapping job,
# with the reason buried in its log.
def missing_dataset_files():
    """Problems (one line each) of the datasets that the planned jobs read."""
    if USE_SIMULATED or workflow.dag is None:
        return []
    from epiflow.corpus.manifest import load_manifest

    jobs = list(workflow.dag.needrun_jobs())
    if any(j.rule.name == "candidate_ccres" for j in jobs):
        wanted = None  # the candidate cCREs read every dataset
    else:
        wanted = {
            j.wildcards.get("dataset") for j in jobs if j.rule.name == "map_dataset"
        }
        if not wanted:
            return []
    mirror = config["data_mirror"]
    problems = []
    for e in load_manifest(config["datasets"]["manifest"]):
        if wanted is not None and e.name not in wanted:
            continue
        fields = [] if e.url else [("path", e.path)]
        fields += [(k, getattr(e, k)) for k in ("barcodes", "labels", "peaks")]
        for field, value in fields:
            if not value:
                continue
            p = Path(value)
            if not p.is_absolute():
                p = Path(e.manifest).parent / p
            if p.exists() or (mirror and (Path(mirror) / p.name).exists()):
                continue
            if p.resolve() in {Path(g).resolve() for g in generated_data()}:
                continue  # written by this workflow (rule perturbation_benchmark)
            where = (
                f"{p}, or {Path(mirror) / p.name}"
                if mirror
                else f"{p} (data_mirror is not set)"
            )
            source = (
                e.extra.get("source_page") or "the paper's data availability statement"
            )
            acc = e.extra.get("accession")
            acc = f"; accession {acc}" if acc else ""
            problems.append(
                f"{e.name} (line {e.line}{acc}): "
                f"no URL, and its {'file' if field == 'path' else field + ' file'} is "
                f"not at {where}; get it from {source}"
            )
    return problems
