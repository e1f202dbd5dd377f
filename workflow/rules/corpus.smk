# Stage 1: the corpus. Candidate cCREs (union of peak/cCRE sets, or an external vocabulary),
# every dataset mapped onto them, then QC, vocabulary curation, document frequency and shards.


wildcard_constraints:
    dataset=r"[A-Za-z0-9._-]+",


# Semi-synthetic stimulation and genetic-knockout benchmarks built from real cells (known effects;
# docs/perturbation.md); manifest rows pointing at these files make them datasets.
rule perturbation_benchmark:
    input:
        source=lambda w: config["perturbation_benchmark"]["source"],
        tss=lambda w: config["perturbation_benchmark"]["tss"],
        go=lambda w: config["perturbation_benchmark"]["go"],
    output:
        [f"{PERTURBATION_BENCHMARK_DIR}/{f}" for f in PERTURBATION_BENCHMARK_FILES],
    log:
        f"{R}/logs/perturbation_benchmark.log",
    benchmark:
        f"{R}/benchmarks/perturbation_benchmark.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: 1
    params:
        out=lambda w, output: os.path.dirname(output[0]),
        cell_type_key=config["perturbation_benchmark"]["cell_type_key"],
        n_genes=config["perturbation_benchmark"]["n_genes"],
        seed=config["perturbation_benchmark"]["seed"],
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow make-perturbation-benchmark --corpus {input.source:q}'
        " --tss {input.tss:q} --go {input.go:q} --label-key {params.cell_type_key:q}"
        " --n-genes {params.n_genes} --seed {params.seed} --no-corpus --out {params.out:q}"
        " > {log:q} 2>&1"


rule candidate_ccres:
    input:
        unpack(external_vocab_files),
        manifest=manifest_file,
        sources=ccre_sources,
        generated=generated_data,
    output:
        bed=f"{R}/candidates/candidates.bed",
        report=f"{R}/candidates/candidates.bed.json",
    log:
        f"{R}/logs/candidate_ccres.log",
    benchmark:
        f"{R}/benchmarks/candidate_ccres.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("candidate_ccres", "threads")
    resources:
        mem_mb=res("candidate_ccres", "mem_mb"),
        runtime=res("candidate_ccres", "runtime"),
    params:
        genome=config["genome"],
        sources=lambda w, input: opt("--sources", list(input.sources)),
        external=opt("--external-vocab", external_vocab_files().get("external_bed")),
        external_df=opt("--external-df", external_vocab_files().get("external_df")),
        chain=opt("--chain", config["chain"]),
        mirror=opt("--data-mirror", config["data_mirror"]),
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow candidate-ccres --manifest {input.manifest:q}'
        " --genome {params.genome} {params.sources} {params.external}"
        " {params.external_df} {params.chain} {params.mirror}"
        " --out {output.bed:q} --report {output.report:q} > {log:q} 2>&1"


rule map_dataset:
    input:
        manifest=manifest_file,
        ccres=rules.candidate_ccres.output.bed,
        generated=generated_data,
    output:
        h5ad=f"{R}/mapped/{{dataset}}.h5ad",
        report=f"{R}/mapped/{{dataset}}.json",
    log:
        f"{R}/logs/map_dataset/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/map_dataset/{{dataset}}.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("map_dataset", "threads")
    resources:
        mem_mb=res("map_dataset", "mem_mb"),
        runtime=res("map_dataset", "runtime"),
    params:
        genome=config["genome"],
        chain=opt("--chain", config["chain"]),
        tss=(
            opt("--tss-dir", config["tss_dir"])
            if config["mapping"]["check_build"]
            else "--no-build-check"
        ),
        min_frac=config["mapping"]["min_frac_in_ccres"],
        mirror=opt("--data-mirror", config["data_mirror"]),
        counts=(
            "--use-count-column"
            if config["mapping"]["use_count_column"]
            else "--no-count-column"
        ),
        chunksize=config["mapping"]["chunksize"],
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow map-dataset --manifest {input.manifest:q}'
        " --dataset {wildcards.dataset} --ccres {input.ccres:q} --genome {params.genome}"
        " {params.chain} {params.tss} {params.mirror} {params.counts}"
        " --chunksize {params.chunksize} --min-frac-in-ccres {params.min_frac}"
        " --out {output.h5ad:q} --report {output.report:q} > {log:q} 2>&1"


rule build_corpus:
    input:
        ccres=rules.candidate_ccres.output.bed,
        report=rules.candidate_ccres.output.report,
        mapped=mapped_files,
    output:
        corpus=directory(f"{R}/corpus"),
    log:
        f"{R}/logs/build_corpus.log",
    benchmark:
        f"{R}/benchmarks/build_corpus.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("build_corpus", "threads")
    resources:
        mem_mb=res("build_corpus", "mem_mb"),
        runtime=res("build_corpus", "runtime"),
    params:
        genome=config["genome"],
        vocabulary=config["vocabulary"]["mode"],
        min_cells_per_ccre=config["vocabulary"]["min_cells"],
        min_ccres=config["qc"]["min_ccres_per_cell"],
        shard_size=config["shard_size"],
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow build-corpus --ccres {input.ccres:q} --mapped {input.mapped:q}'
        " --genome {params.genome} --vocabulary-mode {params.vocabulary}"
        " --min-cells-per-ccre {params.min_cells_per_ccre} --min-ccres-per-cell {params.min_ccres}"
        " --shard-size {params.shard_size} --out {output.corpus:q} > {log:q} 2>&1"


# Downstream datasets (manifest role `downstream`): mapped like the others, never in the corpus;
# tokenized onto the corpus vocabulary with the corpus document frequency (or, in a run without
# corpus datasets, onto the external vocabulary with its df) into a corpus-format folder each.
rule downstream_corpus:
    input:
        unpack(downstream_vocab_inputs),
        ccres=rules.candidate_ccres.output.bed,
        report=rules.candidate_ccres.output.report,
        mapped=f"{R}/mapped/{{dataset}}.h5ad",
    output:
        folder=directory(f"{R}/downstream/{{dataset}}"),
    log:
        f"{R}/logs/downstream_corpus/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/downstream_corpus/{{dataset}}.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("downstream_corpus", "threads")
    resources:
        mem_mb=res("downstream_corpus", "mem_mb"),
        runtime=res("downstream_corpus", "runtime"),
    params:
        genome=config["genome"],
        vocab=lambda w, input: (
            f"--corpus {shlex.quote(str(input.corpus))}"
            if "corpus" in input.keys()
            else f"--vocab {shlex.quote(str(input.ccres))} --df {shlex.quote(str(input.df))}"
        ),
        min_ccres=config["qc"]["min_ccres_per_cell"],
        shard_size=config["shard_size"],
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow tokenize-downstream --ccres {input.ccres:q} --mapped {input.mapped:q}'
        " {params.vocab} --genome {params.genome} --min-ccres-per-cell {params.min_ccres}"
        " --shard-size {params.shard_size} --out {output.folder:q} > {log:q} 2>&1"
