# Stage 4: downstream tasks (each task's folder: results/tasks/<task>/<dataset>/, with metrics.tsv
# in the common long format task, dataset, method, metric, value).
# Feature extraction: Leiden (bisected to the number of cell types) NMI / ARI and UMAPs of the
# EpiAgent embeddings beside the LSI baseline, per evaluated dataset ('all' = every corpus cell).


wildcard_constraints:
    fe_dataset=r"[A-Za-z0-9._-]+",
    an_dataset=r"[A-Za-z0-9._-]+",
    im_dataset=r"[A-Za-z0-9._-]+",
    st_dataset=r"[A-Za-z0-9._-]+",


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


# Supervised annotation: stratified 2/3 reference, 1/3 query; the pretrained model plus a classifier
# fine-tuned on the reference, beside LSI + logistic regression / SVM and the frozen embeddings.
rule annotate:
    input:
        checkpoint=checkpoint_file,
        corpus=rules.build_corpus.output.corpus,
    output:
        metrics=f"{R}/tasks/annotation/{{an_dataset}}/metrics.tsv",
        predictions=f"{R}/tasks/annotation/{{an_dataset}}/predictions.tsv",
        confusion=report(
            f"{R}/tasks/annotation/{{an_dataset}}/confusion.png",
            caption="../report/annotation.rst",
            category="Annotation",
            subcategory="{an_dataset}",
            labels={"dataset": "{an_dataset}", "figure": "confusion matrix"},
        ),
        sankey=report(
            f"{R}/tasks/annotation/{{an_dataset}}/sankey.png",
            caption="../report/annotation.rst",
            category="Annotation",
            subcategory="{an_dataset}",
            labels={"dataset": "{an_dataset}", "figure": "Sankey: true -> predicted"},
        ),
    log:
        f"{R}/logs/annotate/{{an_dataset}}.log",
    benchmark:
        f"{R}/benchmarks/annotate/{{an_dataset}}.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("annotate", "threads")
    resources:
        mem_mb=res("annotate", "mem_mb"),
        runtime=res("annotate", "runtime"),
    params:
        outdir=lambda w, output: os.path.dirname(output.metrics),
        dataset=lambda w: "" if w.an_dataset == "all" else f"--dataset {w.an_dataset}",
        args=finetune_args("annotation"),
    shell:
        "python -m epiflow annotate --corpus {input.corpus} --checkpoint {input.checkpoint}"
        " {params.dataset} {params.args} --out-dir {params.outdir} > {log} 2>&1"


# Imputation: fine-tuning with CCA + MSE reconstruction of the TF-IDF signal, imputed values from the
# signal decoder, scored against the per-cell-type mean signal and by clustering (vs raw, LSI).
rule impute:
    input:
        checkpoint=checkpoint_file,
        corpus=rules.build_corpus.output.corpus,
    output:
        metrics=f"{R}/tasks/imputation/{{im_dataset}}/metrics.tsv",
        imputed=f"{R}/tasks/imputation/{{im_dataset}}/imputed.h5ad",
        per_cell=f"{R}/tasks/imputation/{{im_dataset}}/per_cell.tsv",
        per_ccre=f"{R}/tasks/imputation/{{im_dataset}}/per_ccre.tsv",
        box=report(
            f"{R}/tasks/imputation/{{im_dataset}}/imputation_box.png",
            caption="../report/imputation.rst",
            category="Imputation",
            subcategory="{im_dataset}",
            labels={
                "dataset": "{im_dataset}",
                "figure": "Pearson r / MSE per cell and cCRE",
            },
        ),
    log:
        f"{R}/logs/impute/{{im_dataset}}.log",
    benchmark:
        f"{R}/benchmarks/impute/{{im_dataset}}.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("impute", "threads")
    resources:
        mem_mb=res("impute", "mem_mb"),
        runtime=res("impute", "runtime"),
    params:
        outdir=lambda w, output: os.path.dirname(output.metrics),
        dataset=lambda w: "" if w.im_dataset == "all" else f"--dataset {w.im_dataset}",
        args=finetune_args("imputation"),
    shell:
        "python -m epiflow impute --corpus {input.corpus} --checkpoint {input.checkpoint}"
        " {params.dataset} {params.args} --out-dir {params.outdir} > {log} 2>&1"


# Stimulated perturbation (out-of-sample): [PER] token fine-tuned on OT-matched control ->
# stimulated pairs of all cell types but one, that type's stimulated cells predicted, in turn.
rule predict_stimulation:
    input:
        checkpoint=checkpoint_file,
        corpus=rules.build_corpus.output.corpus,
    output:
        metrics=f"{R}/tasks/stimulation/{{st_dataset}}/metrics.tsv",
        means=f"{R}/tasks/stimulation/{{st_dataset}}/mean_accessibility.tsv.gz",
        scatter=report(
            f"{R}/tasks/stimulation/{{st_dataset}}/scatter.png",
            caption="../report/stimulation.rst",
            category="Stimulated perturbation",
            subcategory="{st_dataset}",
            labels={"dataset": "{st_dataset}", "figure": "predicted vs observed mean"},
        ),
        direction=report(
            f"{R}/tasks/stimulation/{{st_dataset}}/direction.png",
            caption="../report/stimulation.rst",
            category="Stimulated perturbation",
            subcategory="{st_dataset}",
            labels={"dataset": "{st_dataset}", "figure": "direction accuracy"},
        ),
    log:
        f"{R}/logs/predict_stimulation/{{st_dataset}}.log",
    benchmark:
        f"{R}/benchmarks/predict_stimulation/{{st_dataset}}.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("predict_stimulation", "threads")
    resources:
        mem_mb=res("predict_stimulation", "mem_mb"),
        runtime=res("predict_stimulation", "runtime"),
    params:
        outdir=lambda w, output: os.path.dirname(output.metrics),
        dataset=lambda w: "" if w.st_dataset == "all" else f"--dataset {w.st_dataset}",
        args=stimulation_args(),
    shell:
        "python -m epiflow predict-stimulation --corpus {input.corpus}"
        " --checkpoint {input.checkpoint} {params.dataset} {params.args}"
        " --no-progress --out-dir {params.outdir} > {log} 2>&1"
