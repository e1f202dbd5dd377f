# Stage 4: downstream tasks on the embeddings.
# Feature extraction: Leiden (bisected to the number of cell types) NMI / ARI and UMAPs of the
# EpiAgent embeddings beside the LSI baseline, per evaluated dataset ('all' = every corpus cell).


wildcard_constraints:
    fe_dataset=r"[A-Za-z0-9._-]+",


rule evaluate_features:
    input:
        embeddings=rules.embed.output.h5ad,
        corpus=rules.build_corpus.output.corpus,
    output:
        metrics=f"{R}/tasks/feature_extraction/{{fe_dataset}}/metrics.tsv",
        cells=f"{R}/tasks/feature_extraction/{{fe_dataset}}/cells.tsv",
        umap=report(
            f"{R}/tasks/feature_extraction/{{fe_dataset}}/umap.png",
            caption="../report/feature_extraction.rst",
            category="Feature extraction",
            subcategory="{fe_dataset}",
            labels={"dataset": "{fe_dataset}", "figure": "UMAP (EpiAgent | LSI)"},
        ),
    log:
        f"{R}/logs/evaluate_features/{{fe_dataset}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate_features/{{fe_dataset}}.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("evaluate_features", "threads")
    resources:
        mem_mb=res("evaluate_features", "mem_mb"),
        runtime=res("evaluate_features", "runtime"),
    params:
        outdir=lambda w, output: os.path.dirname(output.metrics),
        dataset=lambda w: "" if w.fe_dataset == "all" else f"--dataset {w.fe_dataset}",
        label_key=config["tasks"]["feature_extraction"]["label_key"],
        lsi=config["tasks"]["feature_extraction"]["lsi_components"],
        neighbors=config["tasks"]["feature_extraction"]["n_neighbors"],
        seed=config["tasks"]["feature_extraction"]["seed"],
    shell:
        "python -m epiflow evaluate-features --embeddings EpiAgent={input.embeddings}"
        " --corpus {input.corpus} {params.dataset} --label-key {params.label_key}"
        " --lsi-components {params.lsi} --n-neighbors {params.neighbors}"
        " --seed {params.seed} --out-dir {params.outdir} > {log} 2>&1"
