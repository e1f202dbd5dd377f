# Stage 4: downstream tasks (each task's folder: results/tasks/<task>/<unit>/; a unit is a dataset, or the
# integration's name; metrics.tsv in the common long format task, dataset, method, metric, value).
# Feature extraction: Leiden (bisected to the number of cell types) NMI / ARI and UMAPs of the
# EpiAgent embeddings beside the LSI baseline, per evaluated dataset ('all' = every corpus cell).


wildcard_constraints:
    # one result folder of a task (a dataset; the integration's name; a zero-shot NAME.dataset)
    unit=r"[A-Za-z0-9._-]+",
    zs_annotator=r"annotator(?:-[A-Za-z0-9_-]+)?",


# Fine-tuned embeddings (tasks.feature_extraction.epochs > 0): the verb fine-tunes a copy of
# the model on the evaluated cells with CCA (K = 1) + SR and evaluates it (EpiAgent-finetuned) beside
# the zero-shot embeddings of rule embed (EpiAgent) and LSI.
# Trajectory (EpiAgent Fig. 2d-g): the datasets of tasks.feature_extraction.trajectory.datasets go to
# rule evaluate_features_trajectory, which adds PAGA + diffusion pseudotime rooted in root_type and
# the Spearman correlation with `order` for every embedding, and declares trajectory.tsv / .png and
# paga.tsv (the inputs of panels fig2d-g); the other datasets to rule evaluate_features.
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
if FE_CFG["enabled"] and not FE_TRAJECTORY and workflow.is_main_process:
    from snakemake.logging import logger

    logger.info(
        "epiflow: no trajectory (config tasks.feature_extraction.trajectory.datasets is empty: no "
        "evaluated dataset has cell types of a known order); panels fig2d-g are skipped"
    )
_FE_NAME = r"[A-Za-z0-9._-]"
_FE_TRAJ_ALT = "|".join(re.escape(d) for d in FE_TRAJECTORY)


rule evaluate_features:
    input:
        embeddings=lambda w: embeddings_file(w.unit),
        corpus=dataset_input("unit"),
        checkpoint=checkpoint_file,
        own=own_features_input,
    output:
        metrics=f"{R}/tasks/feature_extraction/{{unit}}/metrics.tsv",
        cells=f"{R}/tasks/feature_extraction/{{unit}}/cells.tsv",
        umap=report(
            f"{R}/tasks/feature_extraction/{{unit}}/umap.png",
            caption="../report/feature_extraction.rst",
            category=TASKS["feature_extraction"].category,
            subcategory="{unit}",
            labels={"dataset": "{unit}", "figure": "UMAP (EpiAgent | LSI)"},
        ),
    log:
        f"{R}/logs/evaluate_features/{{unit}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate_features/{{unit}}.tsv"
    wildcard_constraints:
        # the datasets with a trajectory belong to rule evaluate_features_trajectory
        unit=(
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
        dataset=lambda w: "" if w.unit == "all" else f"--dataset {w.unit}",
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
        metrics=f"{R}/tasks/feature_extraction/{{unit}}/metrics.tsv",
        cells=f"{R}/tasks/feature_extraction/{{unit}}/cells.tsv",
        umap=report(
            f"{R}/tasks/feature_extraction/{{unit}}/umap.png",
            caption="../report/feature_extraction.rst",
            category=TASKS["feature_extraction"].category,
            subcategory="{unit}",
            labels={"dataset": "{unit}", "figure": "UMAP (EpiAgent | LSI)"},
        ),
        trajectory=f"{R}/tasks/feature_extraction/{{unit}}/trajectory.tsv",
        paga=f"{R}/tasks/feature_extraction/{{unit}}/paga.tsv",
        trajectory_png=report(
            f"{R}/tasks/feature_extraction/{{unit}}/trajectory.png",
            caption="../report/feature_extraction.rst",
            category=TASKS["feature_extraction"].category,
            subcategory="{unit}",
            labels={
                "dataset": "{unit}",
                "figure": "trajectory (PAGA + pseudotime)",
            },
        ),
    wildcard_constraints:
        unit=_FE_TRAJ_ALT if FE_TRAJECTORY else r"(?!)",
    params:
        outdir=lambda w, output: os.path.dirname(output.metrics),
        dataset=lambda w: "" if w.unit == "all" else f"--dataset {w.unit}",
        args=fe_args(True),
        own=lambda w, input: (
            f"--own-features {shlex.quote(input.own[0])}" if input.own else ""
        ),


# Supervised annotation: stratified 2/3 reference, 1/3 query; the pretrained model plus a classifier
# fine-tuned on the reference, beside LSI + logistic regression / SVM and the frozen embeddings.
rule annotate:
    input:
        checkpoint=checkpoint_file,
        corpus=dataset_input("unit"),
    output:
        metrics=f"{R}/tasks/annotation/{{unit}}/metrics.tsv",
        predictions=f"{R}/tasks/annotation/{{unit}}/predictions.tsv",
        confusion=report(
            f"{R}/tasks/annotation/{{unit}}/confusion.png",
            caption="../report/annotation.rst",
            category=TASKS["annotation"].category,
            subcategory="{unit}",
            labels={"dataset": "{unit}", "figure": "confusion matrix"},
        ),
        sankey=report(
            f"{R}/tasks/annotation/{{unit}}/sankey.png",
            caption="../report/annotation.rst",
            category=TASKS["annotation"].category,
            subcategory="{unit}",
            labels={"dataset": "{unit}", "figure": "Sankey: true -> predicted"},
        ),
    log:
        f"{R}/logs/annotate/{{unit}}.log",
    benchmark:
        f"{R}/benchmarks/annotate/{{unit}}.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("annotate", "threads")
    resources:
        mem_mb=res("annotate", "mem_mb"),
        runtime=res("annotate", "runtime"),
    params:
        outdir=lambda w, output: os.path.dirname(output.metrics),
        dataset=lambda w: "" if w.unit == "all" else f"--dataset {w.unit}",
        args=verb_args("annotation"),
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow annotate --corpus {input.corpus:q} --checkpoint {input.checkpoint:q}'
        " {params.dataset} {params.args} --out {params.outdir:q} > {log:q} 2>&1"


# Imputation: fine-tuning with CCA + MSE reconstruction of the TF-IDF signal, imputed values from the
# signal decoder, scored against the per-cell-type mean signal and by clustering (vs raw, LSI).
rule impute:
    input:
        checkpoint=checkpoint_file,
        corpus=dataset_input("unit"),
    output:
        metrics=f"{R}/tasks/imputation/{{unit}}/metrics.tsv",
        imputed=f"{R}/tasks/imputation/{{unit}}/imputed.h5ad",
        per_cell=f"{R}/tasks/imputation/{{unit}}/per_cell.tsv",
        per_ccre=f"{R}/tasks/imputation/{{unit}}/per_ccre.tsv",
        box=report(
            f"{R}/tasks/imputation/{{unit}}/imputation_box.png",
            caption="../report/imputation.rst",
            category=TASKS["imputation"].category,
            subcategory="{unit}",
            labels={
                "dataset": "{unit}",
                "figure": "Pearson r / MSE per cell and cCRE",
            },
        ),
    log:
        f"{R}/logs/impute/{{unit}}.log",
    benchmark:
        f"{R}/benchmarks/impute/{{unit}}.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("impute", "threads")
    resources:
        mem_mb=res("impute", "mem_mb"),
        runtime=res("impute", "runtime"),
    params:
        outdir=lambda w, output: os.path.dirname(output.metrics),
        dataset=lambda w: "" if w.unit == "all" else f"--dataset {w.unit}",
        args=verb_args("imputation"),
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow impute --corpus {input.corpus:q} --checkpoint {input.checkpoint:q}'
        " {params.dataset} {params.args} --out {params.outdir:q} > {log:q} 2>&1"


# Stimulated perturbation (out-of-sample): [PER] token fine-tuned on OT-matched control ->
# stimulated pairs of all cell types but one, that type's stimulated cells predicted, in turn.
rule predict_stimulation:
    input:
        checkpoint=checkpoint_file,
        corpus=dataset_input("unit"),
    output:
        **switched_outputs(
            "stimulation",
            cells=f"{R}/tasks/stimulation/{{unit}}/predicted_cells.h5ad",
            umaps=f"{R}/tasks/stimulation/{{unit}}/cells.tsv",
        ),
        metrics=f"{R}/tasks/stimulation/{{unit}}/metrics.tsv",
        means=f"{R}/tasks/stimulation/{{unit}}/mean_accessibility.tsv.gz",
        scatter=report(
            f"{R}/tasks/stimulation/{{unit}}/scatter.png",
            caption="../report/stimulation.rst",
            category=TASKS["stimulation"].category,
            subcategory="{unit}",
            labels={"dataset": "{unit}", "figure": "predicted vs observed mean"},
        ),
        direction=report(
            f"{R}/tasks/stimulation/{{unit}}/direction.png",
            caption="../report/stimulation.rst",
            category=TASKS["stimulation"].category,
            subcategory="{unit}",
            labels={"dataset": "{unit}", "figure": "direction accuracy"},
        ),
    log:
        f"{R}/logs/predict_stimulation/{{unit}}.log",
    benchmark:
        f"{R}/benchmarks/predict_stimulation/{{unit}}.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("predict_stimulation", "threads")
    resources:
        mem_mb=res("predict_stimulation", "mem_mb"),
        runtime=res("predict_stimulation", "runtime"),
    params:
        outdir=lambda w, output: os.path.dirname(output.metrics),
        dataset=lambda w: "" if w.unit == "all" else f"--dataset {w.unit}",
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
        corpus=dataset_input("unit"),
        go=lambda w: demo_file("genetic", "go", "go.tsv"),
    output:
        **switched_outputs(
            "genetic", cells=f"{R}/tasks/genetic/{{unit}}/predicted_cells.h5ad"
        ),
        metrics=f"{R}/tasks/genetic/{{unit}}/metrics.tsv",
        split=f"{R}/tasks/genetic/{{unit}}/split.tsv",
        means=f"{R}/tasks/genetic/{{unit}}/mean_accessibility.tsv.gz",
        scatter=report(
            f"{R}/tasks/genetic/{{unit}}/scatter.png",
            caption="../report/genetic.rst",
            category=TASKS["genetic"].category,
            subcategory="{unit}",
            labels={"dataset": "{unit}", "figure": "predicted vs observed mean"},
        ),
        direction=report(
            f"{R}/tasks/genetic/{{unit}}/direction.png",
            caption="../report/genetic.rst",
            category=TASKS["genetic"].category,
            subcategory="{unit}",
            labels={"dataset": "{unit}", "figure": "direction accuracy"},
        ),
    log:
        f"{R}/logs/predict_genetic/{{unit}}.log",
    benchmark:
        f"{R}/benchmarks/predict_genetic/{{unit}}.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("predict_genetic", "threads")
    resources:
        mem_mb=res("predict_genetic", "mem_mb"),
        runtime=res("predict_genetic", "runtime"),
    params:
        outdir=lambda w, output: os.path.dirname(output.metrics),
        dataset=lambda w: "" if w.unit == "all" else f"--dataset {w.unit}",
        args=verb_args("genetic"),
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow predict-genetic --corpus {input.corpus:q}'
        " --checkpoint {input.checkpoint:q} --go {input.go:q} {params.dataset} {params.args}"
        " --out {params.outdir:q} > {log:q} 2>&1"


# Batch integration of the configured datasets together (one job): OT-matched partners across
# batches, fine-tuning with a batch token, integration metrics beside zero-shot and LSI; optional
# query datasets labelled by their nearest reference cells (query_predictions.tsv, read by the
# fig4g_confusion panel, is an output only when tasks.integration.query names datasets).
INTEGRATION_QUERY_OUTPUT = (
    {"query": f"{R}/tasks/integration/{{unit}}/query_predictions.tsv"}
    if config["tasks"]["integration"]["query"]
    else {}
)


rule integrate:
    input:
        checkpoint=checkpoint_file,
        corpus=lambda w: data_dirs(
            config["tasks"]["integration"]["datasets"], "tasks.integration.datasets"
        ),
        query=lambda w: (
            data_dirs(
                config["tasks"]["integration"]["query"], "tasks.integration.query"
            )
            if config["tasks"]["integration"]["query"]
            else []
        ),
    output:
        **INTEGRATION_QUERY_OUTPUT,
        **switched_outputs(
            "integration",
            cells=f"{R}/tasks/integration/{{unit}}/cells.tsv",
            umap_batch=report(
                f"{R}/tasks/integration/{{unit}}/umap_batch.png",
                caption="../report/integration.rst",
                category=TASKS["integration"].category,
                subcategory="{unit}",
                labels={"reference": "{unit}", "figure": "UMAP by batch"},
            ),
            umap_type=report(
                f"{R}/tasks/integration/{{unit}}/umap_cell_type.png",
                caption="../report/integration.rst",
                category=TASKS["integration"].category,
                subcategory="{unit}",
                labels={"reference": "{unit}", "figure": "UMAP by cell type"},
            ),
        ),
        metrics=f"{R}/tasks/integration/{{unit}}/metrics.tsv",
        embeddings=f"{R}/tasks/integration/{{unit}}/embeddings.h5ad",
        batches=f"{R}/tasks/integration/{{unit}}/batches.tsv",
        matches=f"{R}/tasks/integration/{{unit}}/matches.tsv",
        model=f"{R}/tasks/integration/{{unit}}/checkpoint.pth",
        model_config=f"{R}/tasks/integration/{{unit}}/checkpoint.pth.json",
        train_log=f"{R}/tasks/integration/{{unit}}/train_log.tsv",
    log:
        f"{R}/logs/integrate/{{unit}}.log",
    benchmark:
        f"{R}/benchmarks/integrate/{{unit}}.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("integrate", "threads")
    resources:
        mem_mb=res("integrate", "mem_mb"),
        runtime=res("integrate", "runtime"),
    params:
        outdir=lambda w, output: os.path.dirname(output.metrics),
        query=lambda w, input: (
            # one path or several (a single input file is a plain string)
            opt("--query", input.query)
            + " "
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
        corpus=dataset_input("unit"),
        tss=lambda w: demo_file("knockout", "tss", "tss.bed"),
    output:
        metrics=f"{R}/tasks/knockout/{{unit}}/metrics.tsv",
        knockout=f"{R}/tasks/knockout/{{unit}}/knockout.tsv",
        random=f"{R}/tasks/knockout/{{unit}}/random.tsv",
        reference_cells=f"{R}/tasks/knockout/{{unit}}/reference_cells.tsv",
        shifts=f"{R}/tasks/knockout/{{unit}}/shifts.tsv",
        tss_ccres=f"{R}/tasks/knockout/{{unit}}/tss_ccres.tsv",
        effects=report(
            f"{R}/tasks/knockout/{{unit}}/knockout_effects.png",
            caption="../report/knockout.rst",
            category=TASKS["knockout"].category,
            subcategory="{unit}",
            labels={"dataset": "{unit}", "figure": "knockout effects vs random"},
        ),
        umap=report(
            f"{R}/tasks/knockout/{{unit}}/knockout_umap.png",
            caption="../report/knockout.rst",
            category=TASKS["knockout"].category,
            subcategory="{unit}",
            labels={"dataset": "{unit}", "figure": "UMAP of the chimeric cells"},
        ),
    log:
        f"{R}/logs/knockout/{{unit}}.log",
    benchmark:
        f"{R}/benchmarks/knockout/{{unit}}.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("knockout", "threads")
    resources:
        mem_mb=res("knockout", "mem_mb"),
        runtime=res("knockout", "runtime"),
    params:
        outdir=lambda w, output: os.path.dirname(output.metrics),
        dataset=lambda w: "" if w.unit == "all" else f"--dataset {w.unit}",
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
        corpus=lambda w: data_dir(zs_unit(w.unit)[2], f"dataset {w.unit}"),
        label_map=zs_query_label_map,
    output:
        metrics=f"{ZS_ROOT}/{{unit}}/metrics.tsv",
        predictions=f"{ZS_ROOT}/{{unit}}/predictions.tsv",
        cells=f"{ZS_ROOT}/{{unit}}/cells.tsv",
        confusion=report(
            f"{ZS_ROOT}/{{unit}}/confusion.png",
            caption="../report/zeroshot_annotation.rst",
            category=TASKS["zeroshot_annotation"].category,
            subcategory="{unit}",
            labels={"dataset": "{unit}", "figure": "confusion matrix"},
        ),
    log:
        f"{R}/logs/annotate_zeroshot/{{unit}}.log",
    benchmark:
        f"{R}/benchmarks/annotate_zeroshot/{{unit}}.tsv"
    wildcard_constraints:
        # 'annotator' / 'annotator-NAME' are the folders of the trained annotators (train_annotator)
        unit=r"(?!annotator(?:-[A-Za-z0-9_-]*)?/)[A-Za-z0-9._-]+",
    conda:
        "../../envs/epiflow.yaml"
    threads: res("annotate_zeroshot", "threads")
    resources:
        mem_mb=res("annotate_zeroshot", "mem_mb"),
        runtime=res("annotate_zeroshot", "runtime"),
    params:
        outdir=lambda w, output: os.path.dirname(output.metrics),
        dataset=lambda w: (
            "" if zs_unit(w.unit)[2] == "all" else f"--dataset {zs_unit(w.unit)[2]}"
        ),
        args=lambda w: verb_args(
            "zeroshot_annotation",
            "annotate-zeroshot",
            method=zs_unit(w.unit)[1]["method"],
            label_key=zs_unit(w.unit)[1]["label_key"],
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
