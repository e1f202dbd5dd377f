# Stage 0: the embedded demo corpus (synthetic datasets, cCRE sources, TSS, genes, GO).
# Only used when config datasets.manifest is null.


checkpoint simulate:
    output:
        manifest=f"{R}/simulate/manifest.tsv",
        sources=f"{R}/simulate/ccre_sources.bed",
        tss=f"{R}/simulate/tss.bed",
        genes=f"{R}/simulate/genes.bed",
        go=f"{R}/simulate/go.tsv",
        readme=f"{R}/simulate/README.md",
    log:
        f"{R}/logs/simulate.log",
    benchmark:
        f"{R}/benchmarks/simulate.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("simulate", "threads")
    resources:
        mem_mb=res("simulate", "mem_mb"),
        runtime=res("simulate", "runtime"),
    params:
        outdir=lambda w, output: os.path.dirname(output.manifest),
        preset=config["datasets"]["simulate"]["preset"],
        seed=config["datasets"]["simulate"]["seed"],
        n_cells=opt("--n-cells", config["datasets"]["simulate"]["n_cells"]),
        downstream=opt(
            "--downstream",
            ",".join(config["datasets"]["simulate"].get("downstream") or []),
        ),
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow simulate --out {params.outdir:q} --preset {params.preset}'
        " --seed {params.seed} {params.n_cells} {params.downstream} --force > {log:q} 2>&1"
