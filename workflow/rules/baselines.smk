# Baselines beside EpiAgent (issue 9): one job per (task, dataset, tool), each tool in its own
# environment. With `--sdm conda` the job runs in the conda env built from envs/baseline-<tool>.yaml
# (adapter in-process there); otherwise `epiflow run-baseline` builds / reuses a plain virtualenv from
# the same file's pip list under config baselines.env_cache and runs the adapter with its Python
# (light tools -- LSI, LDA, PCA, PCA+SVM, MLP -- run in the main env unless baselines.isolate_light).
# Outputs: {R}/baselines/<task>/<dataset>/<tool>/metrics.tsv (the common long table) and one
# merged {R}/baselines/metrics.tsv.
#
# Config (see config/README.md; helper functions in common.smk):
#   baselines:
#     enabled: false
#     datasets: [atlas_b1]          # manifest names, or 'all' (integration baselines instead take
#                                   # tasks.integration.datasets together, folder tasks.integration.name)
#     tasks: {feature_extraction: [lsi, lda], integration: [pca, harmony], annotation: [pca_svm, mlp]}
#     params: {peakvi: {max_epochs: 50}}   # per tool, passed as --param key=value (JSON values)
#     env_cache: null               # venv cache; null = $EPIFLOW_ENV_CACHE or ~/.cache/epiflow/envs
#     isolate_light: false          # true: light tools in their own venvs too
#     label_key: cell_type
#     batch_key: batch
#     condition_key: condition      # perturbation
#     (genetic task, GEARS: obs column 'perturbation' unless baselines.perturbation_key; the GO table
#      comes from params: {gears: {go: ../shared/data/go_bp_human.tsv.gz}}; the config schema must
#      list 'genetic' under baselines.tasks for it to be configured)
#     genes: null                   # BED6 gene file for gene-activity scores (annotation)
#     seed: 0


wildcard_constraints:
    bl_task=r"feature_extraction|integration|annotation|imputation|perturbation|genetic",
    bl_tool=r"[a-z][a-z0-9_]*",
    bl_dataset=r"[A-Za-z0-9._-]+",


rule run_baseline:
    input:
        corpus=baseline_corpus,
    output:
        metrics=f"{R}/baselines/{{bl_task}}/{{bl_dataset}}/{{bl_tool}}/metrics.tsv",
        output=f"{R}/baselines/{{bl_task}}/{{bl_dataset}}/{{bl_tool}}/output.npz",
    log:
        f"{R}/logs/baselines/{{bl_task}}/{{bl_dataset}}/{{bl_tool}}.log",
    benchmark:
        f"{R}/benchmarks/baselines/{{bl_task}}/{{bl_dataset}}/{{bl_tool}}.tsv"
    conda:
        "../../envs/baseline-{bl_tool}.yaml"
    threads: res("run_baseline", "threads")
    resources:
        mem_mb=res("run_baseline", "mem_mb"),
        runtime=res("run_baseline", "runtime"),
    params:
        outdir=lambda w, output: os.path.dirname(output.metrics),
        dataset=baseline_dataset_arg,
        env=baseline_env_mode,
        cache=lambda w: opt("--env-cache", BL.get("env_cache")),
        tool_params=baseline_params,
        label_key=BL.get("label_key", "cell_type"),
        batch_key=BL.get("batch_key", "batch"),
        condition_key=BL.get("condition_key", "condition"),
        perturbation_key=BL.get("perturbation_key", "perturbation"),
        seed=BL.get("seed", 0),
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow run-baseline --tool {wildcards.bl_tool} --task {wildcards.bl_task}'
        " --corpus {input.corpus:q} {params.dataset} --label-key {params.label_key}"
        " --batch-key {params.batch_key} --condition-key {params.condition_key}"
        " --perturbation-key {params.perturbation_key}"
        " {params.tool_params} --env {params.env} {params.cache} --threads {threads}"
        " --seed {params.seed} --out {params.outdir:q} > {log:q} 2>&1"


rule baselines_table:
    input:
        [f for f in baseline_targets() if not f.endswith(f"{R}/baselines/metrics.tsv")],
    output:
        f"{R}/baselines/metrics.tsv",
    log:
        f"{R}/logs/baselines/table.log",
    benchmark:
        f"{R}/benchmarks/baselines/table.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: 1
    resources:
        mem_mb=res("baselines_table", "mem_mb"),
        runtime=res("baselines_table", "runtime"),
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow baselines-table {input:q} --out {output:q} > {log:q} 2>&1'
