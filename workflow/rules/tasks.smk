# Stage 4: downstream tasks (each task's folder: results/tasks/<task>/<dataset>/, with metrics.tsv
# in the common long format task, dataset, method, metric, value).
# Feature extraction: Leiden (bisected to the number of cell types) NMI / ARI and UMAPs of the
# EpiAgent embeddings beside the LSI baseline, per evaluated dataset ('all' = every corpus cell).


wildcard_constraints:
    fe_dataset=r"[A-Za-z0-9._-]+",
    an_dataset=r"[A-Za-z0-9._-]+",
    im_dataset=r"[A-Za-z0-9._-]+",
    st_dataset=r"[A-Za-z0-9._-]+",
    ge_dataset=r"[A-Za-z0-9._-]+",
    in_name=r"[A-Za-z0-9._-]+",
    ko_dataset=r"[A-Za-z0-9._-]+",
    # 'annotator' / 'annotator-NAME' are the folders of the trained annotators (rule train_annotator)
    zs_dataset=r"(?!annotator(?:-[A-Za-z0-9_-]*)?/)[A-Za-z0-9._-]+",
    zs_annotator=r"annotator(?:-[A-Za-z0-9_-]+)?",


# Fine-tuned embeddings (tasks.feature_extraction.epochs > 0): the verb fine-tunes a copy of
# the model on the evaluated cells with CCA (K = 1) + SR and evaluates it (EpiAgent-finetuned) beside
# the zero-shot embeddings of rule embed (EpiAgent) and LSI.
# Trajectory (EpiAgent Fig. 2d-g): the datasets of tasks.feature_extraction.trajectory.datasets go to
# rule evaluate_features_trajectory, which adds PAGA + diffusion pseudotime rooted in root_type and
# the Spearman correlation with `order` for every embedding, and declares trajectory.tsv / .png
# (the input of panel fig2f); the other datasets to rule evaluate_features.
import re
import shlex

FE_CFG = config["tasks"]["feature_extraction"]
FE_TRAJECTORY = list(FE_CFG["trajectory"]["datasets"]) if FE_CFG["enabled"] else []
_fe_unknown = [d for d in FE_TRAJECTORY if d not in FE_CFG["datasets"]]
if _fe_unknown:
    raise WorkflowError(
        f"config tasks.feature_extraction.trajectory.datasets lists {_fe_unknown}, which are not in "
        f"tasks.feature_extraction.datasets ({FE_CFG['datasets']}): the trajectory runs on evaluated datasets"
    )
# per-dataset tables written for only some datasets of a task (the registry's partial_tables): panels
# draw the datasets that have them
PARTIAL_UNIT_TABLES = {
    table: why for t in TASKS.values() for table, why in t.partial_tables.items()
}
if FE_CFG["enabled"] and not FE_TRAJECTORY and workflow.is_main_process:
    from snakemake.logging import logger

    logger.info(
        "epiflow: no trajectory (config tasks.feature_extraction.trajectory.datasets is empty: no "
        "evaluated dataset has cell types of a known order); panel fig2f is skipped"
    )
_FE_NAME = r"[A-Za-z0-9._-]"
_FE_TRAJ_ALT = "|".join(re.escape(d) for d in FE_TRAJECTORY)


rule evaluate_features:
    input:
        embeddings=lambda w: embeddings_file(w.fe_dataset),
        corpus=dataset_input("fe_dataset"),
        checkpoint=checkpoint_file,
        own=own_features_input,
    output:
        metrics=f"{R}/tasks/feature_extraction/{{fe_dataset}}/metrics.tsv",
        cells=f"{R}/tasks/feature_extraction/{{fe_dataset}}/cells.tsv",
        umap=report(
            f"{R}/tasks/feature_extraction/{{fe_dataset}}/umap.png",
            caption="../report/feature_extraction.rst",
            category=TASKS["feature_extraction"].category,
            subcategory="{fe_dataset}",
            labels={"dataset": "{fe_dataset}", "figure": "UMAP (EpiAgent | LSI)"},
        ),
    log:
        f"{R}/logs/evaluate_features/{{fe_dataset}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate_features/{{fe_dataset}}.tsv"
    wildcard_constraints:
        # the datasets with a trajectory belong to rule evaluate_features_trajectory
        fe_dataset=(
            rf"(?!(?:{_FE_TRAJ_ALT})(?!{_FE_NAME})){_FE_NAME}+"
            if FE_TRAJECTORY
            else rf"{_FE_NAME}+"
        ),
    conda:
        "../../envs/epiflow.yaml"
    threads: res("evaluate_features", "threads")
    resources:
        mem_mb=res("evaluate_features", "mem_mb"),
        runtime=res("evaluate_features", "runtime"),
    params:
        outdir=lambda w, output: os.path.dirname(output.metrics),
        dataset=lambda w: "" if w.fe_dataset == "all" else f"--dataset {w.fe_dataset}",
        args=fe_args(False),
        own=lambda w, input: (
            f"--own-features {shlex.quote(input.own[0])}" if input.own else ""
        ),
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow evaluate-features --embeddings EpiAgent={input.embeddings:q}'
        " --corpus {input.corpus:q} {params.dataset} --checkpoint {input.checkpoint:q} {params.args}"
        " {params.own} --out {params.outdir:q} > {log:q} 2>&1"


use rule evaluate_features as evaluate_features_trajectory with:
    output:
        metrics=f"{R}/tasks/feature_extraction/{{fe_dataset}}/metrics.tsv",
        cells=f"{R}/tasks/feature_extraction/{{fe_dataset}}/cells.tsv",
        umap=report(
            f"{R}/tasks/feature_extraction/{{fe_dataset}}/umap.png",
            caption="../report/feature_extraction.rst",
            category=TASKS["feature_extraction"].category,
            subcategory="{fe_dataset}",
            labels={"dataset": "{fe_dataset}", "figure": "UMAP (EpiAgent | LSI)"},
        ),
        trajectory=f"{R}/tasks/feature_extraction/{{fe_dataset}}/trajectory.tsv",
        trajectory_png=report(
            f"{R}/tasks/feature_extraction/{{fe_dataset}}/trajectory.png",
            caption="../report/feature_extraction.rst",
            category=TASKS["feature_extraction"].category,
            subcategory="{fe_dataset}",
            labels={
                "dataset": "{fe_dataset}",
                "figure": "trajectory (PAGA + pseudotime)",
            },
        ),
    wildcard_constraints:
        fe_dataset=_FE_TRAJ_ALT if FE_TRAJECTORY else r"(?!)",
    params:
        outdir=lambda w, output: os.path.dirname(output.metrics),
        dataset=lambda w: "" if w.fe_dataset == "all" else f"--dataset {w.fe_dataset}",
        args=fe_args(True),
        own=lambda w, input: (
            f"--own-features {shlex.quote(input.own[0])}" if input.own else ""
        ),


# Supervised annotation: stratified 2/3 reference, 1/3 query; the pretrained model plus a classifier
# fine-tuned on the reference, beside LSI + logistic regression / SVM and the frozen embeddings.
rule annotate:
    input:
        checkpoint=checkpoint_file,
        corpus=dataset_input("an_dataset"),
    output:
        metrics=f"{R}/tasks/annotation/{{an_dataset}}/metrics.tsv",
        predictions=f"{R}/tasks/annotation/{{an_dataset}}/predictions.tsv",
        confusion=report(
            f"{R}/tasks/annotation/{{an_dataset}}/confusion.png",
            caption="../report/annotation.rst",
            category=TASKS["annotation"].category,
            subcategory="{an_dataset}",
            labels={"dataset": "{an_dataset}", "figure": "confusion matrix"},
        ),
        sankey=report(
            f"{R}/tasks/annotation/{{an_dataset}}/sankey.png",
            caption="../report/annotation.rst",
            category=TASKS["annotation"].category,
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
        args=verb_args("annotation"),
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow annotate --corpus {input.corpus:q} --checkpoint {input.checkpoint:q}'
        " {params.dataset} {params.args} --out {params.outdir:q} > {log:q} 2>&1"


# Imputation: fine-tuning with CCA + MSE reconstruction of the TF-IDF signal, imputed values from the
# signal decoder, scored against the per-cell-type mean signal and by clustering (vs raw, LSI).
rule impute:
    input:
        checkpoint=checkpoint_file,
        corpus=dataset_input("im_dataset"),
    output:
        metrics=f"{R}/tasks/imputation/{{im_dataset}}/metrics.tsv",
        imputed=f"{R}/tasks/imputation/{{im_dataset}}/imputed.h5ad",
        per_cell=f"{R}/tasks/imputation/{{im_dataset}}/per_cell.tsv",
        per_ccre=f"{R}/tasks/imputation/{{im_dataset}}/per_ccre.tsv",
        box=report(
            f"{R}/tasks/imputation/{{im_dataset}}/imputation_box.png",
            caption="../report/imputation.rst",
            category=TASKS["imputation"].category,
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
        args=verb_args("imputation"),
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow impute --corpus {input.corpus:q} --checkpoint {input.checkpoint:q}'
        " {params.dataset} {params.args} --out {params.outdir:q} > {log:q} 2>&1"


# Stimulated perturbation (out-of-sample): [PER] token fine-tuned on OT-matched control ->
# stimulated pairs of all cell types but one, that type's stimulated cells predicted, in turn.
rule predict_stimulation:
    input:
        checkpoint=checkpoint_file,
        corpus=dataset_input("st_dataset"),
    output:
        metrics=f"{R}/tasks/stimulation/{{st_dataset}}/metrics.tsv",
        means=f"{R}/tasks/stimulation/{{st_dataset}}/mean_accessibility.tsv.gz",
        cells=f"{R}/tasks/stimulation/{{st_dataset}}/predicted_cells.h5ad",
        scatter=report(
            f"{R}/tasks/stimulation/{{st_dataset}}/scatter.png",
            caption="../report/stimulation.rst",
            category=TASKS["stimulation"].category,
            subcategory="{st_dataset}",
            labels={"dataset": "{st_dataset}", "figure": "predicted vs observed mean"},
        ),
        direction=report(
            f"{R}/tasks/stimulation/{{st_dataset}}/direction.png",
            caption="../report/stimulation.rst",
            category=TASKS["stimulation"].category,
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
        args=verb_args("stimulation"),
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow predict-stimulation --corpus {input.corpus:q}'
        " --checkpoint {input.checkpoint:q} {params.dataset} {params.args}"
        " --out {params.outdir:q} > {log:q} 2>&1"


# Unseen genetic perturbations: gene tokens through a GNN over the GO Jaccard gene graph, fine-tuned
# on 75% of the knocked-out genes, the held-out 25% predicted from the control cells.
rule predict_genetic:
    input:
        checkpoint=checkpoint_file,
        corpus=dataset_input("ge_dataset"),
        go=lambda w: demo_file("genetic", "go", "go.tsv"),
    output:
        metrics=f"{R}/tasks/genetic/{{ge_dataset}}/metrics.tsv",
        split=f"{R}/tasks/genetic/{{ge_dataset}}/split.tsv",
        means=f"{R}/tasks/genetic/{{ge_dataset}}/mean_accessibility.tsv.gz",
        cells=f"{R}/tasks/genetic/{{ge_dataset}}/predicted_cells.h5ad",
        scatter=report(
            f"{R}/tasks/genetic/{{ge_dataset}}/scatter.png",
            caption="../report/genetic.rst",
            category=TASKS["genetic"].category,
            subcategory="{ge_dataset}",
            labels={"dataset": "{ge_dataset}", "figure": "predicted vs observed mean"},
        ),
        direction=report(
            f"{R}/tasks/genetic/{{ge_dataset}}/direction.png",
            caption="../report/genetic.rst",
            category=TASKS["genetic"].category,
            subcategory="{ge_dataset}",
            labels={"dataset": "{ge_dataset}", "figure": "direction accuracy"},
        ),
    log:
        f"{R}/logs/predict_genetic/{{ge_dataset}}.log",
    benchmark:
        f"{R}/benchmarks/predict_genetic/{{ge_dataset}}.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("predict_genetic", "threads")
    resources:
        mem_mb=res("predict_genetic", "mem_mb"),
        runtime=res("predict_genetic", "runtime"),
    params:
        outdir=lambda w, output: os.path.dirname(output.metrics),
        dataset=lambda w: "" if w.ge_dataset == "all" else f"--dataset {w.ge_dataset}",
        args=verb_args("genetic"),
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow predict-genetic --corpus {input.corpus:q}'
        " --checkpoint {input.checkpoint:q} --go {input.go:q} {params.dataset} {params.args}"
        " --out {params.outdir:q} > {log:q} 2>&1"


# Batch integration of the configured datasets together (one job): OT-matched partners across
# batches, fine-tuning with a batch token, integration metrics beside zero-shot and LSI; optional
# query datasets labelled by their nearest reference cells (query_predictions.tsv, read by the
# fig4g panel, is an output only when tasks.integration.query names datasets).
INTEGRATION_QUERY_OUTPUT = (
    {"query": f"{R}/tasks/integration/{{in_name}}/query_predictions.tsv"}
    if config["tasks"]["integration"]["query"]
    else {}
)


rule integrate:
    input:
        checkpoint=checkpoint_file,
        corpus=dataset_input(None, "tasks", "integration", "datasets"),
        query=lambda w: (
            data_dir(
                config["tasks"]["integration"]["query"], "tasks.integration.query"
            )
            if config["tasks"]["integration"]["query"]
            else []
        ),
    output:
        **INTEGRATION_QUERY_OUTPUT,
        metrics=f"{R}/tasks/integration/{{in_name}}/metrics.tsv",
        embeddings=f"{R}/tasks/integration/{{in_name}}/embeddings.h5ad",
        batches=f"{R}/tasks/integration/{{in_name}}/batches.tsv",
        matches=f"{R}/tasks/integration/{{in_name}}/matches.tsv",
        model=f"{R}/tasks/integration/{{in_name}}/checkpoint.pth",
        model_config=f"{R}/tasks/integration/{{in_name}}/checkpoint.pth.json",
        train_log=f"{R}/tasks/integration/{{in_name}}/train_log.tsv",
        umap_batch=report(
            f"{R}/tasks/integration/{{in_name}}/umap_batch.png",
            caption="../report/integration.rst",
            category=TASKS["integration"].category,
            subcategory="{in_name}",
            labels={"reference": "{in_name}", "figure": "UMAP by batch"},
        ),
        umap_type=report(
            f"{R}/tasks/integration/{{in_name}}/umap_cell_type.png",
            caption="../report/integration.rst",
            category=TASKS["integration"].category,
            subcategory="{in_name}",
            labels={"reference": "{in_name}", "figure": "UMAP by cell type"},
        ),
    log:
        f"{R}/logs/integrate/{{in_name}}.log",
    benchmark:
        f"{R}/benchmarks/integrate/{{in_name}}.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("integrate", "threads")
    resources:
        mem_mb=res("integrate", "mem_mb"),
        runtime=res("integrate", "runtime"),
    params:
        outdir=lambda w, output: os.path.dirname(output.metrics),
        query=lambda w, input: (
            f"--query {input.query} "
            + datasets_arg("--query-dataset", config["tasks"]["integration"]["query"])
            if config["tasks"]["integration"]["query"]
            else ""
        ),
        dataset=datasets_arg("--dataset", config["tasks"]["integration"]["datasets"]),
        label_map=opt("--label-map", config["tasks"]["integration"].get("label_map")),
        args=verb_args("integration"),
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow integrate --corpus {input.corpus:q} --checkpoint {input.checkpoint:q}'
        " {params.dataset} {params.args} {params.label_map} {params.query} --out {params.outdir:q} > {log:q} 2>&1"


# In-silico knockout of the promoter cCREs of the configured genes between two cell states
# (chimeric cells, change of the nearest reference cells' score, t-test against random cCREs).
rule knockout:
    input:
        checkpoint=checkpoint_file,
        corpus=dataset_input("ko_dataset"),
        tss=lambda w: demo_file("knockout", "tss", "tss.bed"),
    output:
        metrics=f"{R}/tasks/knockout/{{ko_dataset}}/metrics.tsv",
        knockout=f"{R}/tasks/knockout/{{ko_dataset}}/knockout.tsv",
        random=f"{R}/tasks/knockout/{{ko_dataset}}/random.tsv",
        effects=report(
            f"{R}/tasks/knockout/{{ko_dataset}}/knockout_effects.png",
            caption="../report/knockout.rst",
            category=TASKS["knockout"].category,
            subcategory="{ko_dataset}",
            labels={"dataset": "{ko_dataset}", "figure": "knockout effects vs random"},
        ),
        umap=report(
            f"{R}/tasks/knockout/{{ko_dataset}}/knockout_umap.png",
            caption="../report/knockout.rst",
            category=TASKS["knockout"].category,
            subcategory="{ko_dataset}",
            labels={"dataset": "{ko_dataset}", "figure": "UMAP of the chimeric cells"},
        ),
    log:
        f"{R}/logs/knockout/{{ko_dataset}}.log",
    benchmark:
        f"{R}/benchmarks/knockout/{{ko_dataset}}.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("knockout", "threads")
    resources:
        mem_mb=res("knockout", "mem_mb"),
        runtime=res("knockout", "runtime"),
    params:
        outdir=lambda w, output: os.path.dirname(output.metrics),
        dataset=lambda w: "" if w.ko_dataset == "all" else f"--dataset {w.ko_dataset}",
        args=verb_args("knockout"),
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow knockout --corpus {input.corpus:q} --checkpoint {input.checkpoint:q}'
        " --tss {input.tss:q} --vocab {input.corpus:q}/vocab.bed {params.dataset} {params.args}"
        " --out {params.outdir:q} > {log:q} 2>&1"


# Zero-shot annotation, step 1: the pretrained model + the authors' classifier head fine-tuned on the
# reference datasets (coarse labels), once per annotator (common.smk: zs_annotators); step 2
# (annotate_zeroshot) labels other datasets with it.
rule train_annotator:
    input:
        checkpoint=checkpoint_file,
        corpus=lambda w: data_dir(
            zs_settings(w)["reference"],
            f"tasks.zeroshot_annotation reference of {w.zs_annotator}",
        ),
        label_map=lambda w: zs_settings(w)["label_map"] or [],
    output:
        model=f"{ZS_ROOT}/{{zs_annotator}}/checkpoint.pth",
        model_config=f"{ZS_ROOT}/{{zs_annotator}}/checkpoint.pth.json",
        classes=f"{ZS_ROOT}/{{zs_annotator}}/classes.tsv",
        ccres=f"{ZS_ROOT}/{{zs_annotator}}/reference_ccres.npy",
        metrics=f"{ZS_ROOT}/{{zs_annotator}}/metrics.tsv",
        train_log=f"{ZS_ROOT}/{{zs_annotator}}/train_log.tsv",
    log:
        f"{R}/logs/train_annotator/{{zs_annotator}}.log",
    benchmark:
        f"{R}/benchmarks/train_annotator/{{zs_annotator}}.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("train_annotator", "threads")
    resources:
        mem_mb=res("train_annotator", "mem_mb"),
        runtime=res("train_annotator", "runtime"),
    params:
        outdir=lambda w, output: os.path.dirname(output.model),
        dataset=lambda w: datasets_arg("--dataset", zs_settings(w)["reference"]),
        label_map=lambda w, input: opt("--label-map", input.label_map),
        args=lambda w: verb_args(
            "zeroshot_annotation",
            "train-annotator",
            label_key=zs_settings(w)["label_key"],
        ),
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow train-annotator --corpus {input.corpus:q} --checkpoint {input.checkpoint:q}'
        " {params.dataset} {params.args} {params.label_map} --out {params.outdir:q} > {log:q} 2>&1"


rule annotate_zeroshot:
    input:
        checkpoint=zs_annotator_file("checkpoint.pth"),
        model_config=zs_annotator_file("checkpoint.pth.json"),
        classes=zs_annotator_file("classes.tsv"),
        ccres=zs_annotator_file("reference_ccres.npy"),
        corpus=lambda w: data_dir(zs_unit(w.zs_dataset)[2], f"dataset {w.zs_dataset}"),
        label_map=zs_query_label_map,
    output:
        metrics=f"{ZS_ROOT}/{{zs_dataset}}/metrics.tsv",
        predictions=f"{ZS_ROOT}/{{zs_dataset}}/predictions.tsv",
        confusion=report(
            f"{ZS_ROOT}/{{zs_dataset}}/confusion.png",
            caption="../report/zeroshot_annotation.rst",
            category=TASKS["zeroshot_annotation"].category,
            subcategory="{zs_dataset}",
            labels={"dataset": "{zs_dataset}", "figure": "confusion matrix"},
        ),
    log:
        f"{R}/logs/annotate_zeroshot/{{zs_dataset}}.log",
    benchmark:
        f"{R}/benchmarks/annotate_zeroshot/{{zs_dataset}}.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("annotate_zeroshot", "threads")
    resources:
        mem_mb=res("annotate_zeroshot", "mem_mb"),
        runtime=res("annotate_zeroshot", "runtime"),
    params:
        outdir=lambda w, output: os.path.dirname(output.metrics),
        dataset=lambda w: (
            ""
            if zs_unit(w.zs_dataset)[2] == "all"
            else f"--dataset {zs_unit(w.zs_dataset)[2]}"
        ),
        args=lambda w: verb_args(
            "zeroshot_annotation",
            "annotate-zeroshot",
            method=zs_unit(w.zs_dataset)[1]["method"],
            label_key=zs_unit(w.zs_dataset)[1]["label_key"],
        ),
        label_map=lambda w, input: opt("--label-map", input.label_map),
        restrict=lambda w, input: (
            f"--restrict-ccres {input.ccres}"
            if config["tasks"]["zeroshot_annotation"].get("restrict_ccres")
            else ""
        ),
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow annotate-zeroshot --corpus {input.corpus:q} --checkpoint {input.checkpoint:q}'
        " --classes {input.classes:q} {params.dataset} {params.args} {params.label_map} {params.restrict}"
        " --out {params.outdir:q} > {log:q} 2>&1"
