# Baselines beside EpiAgent (issue 9): one job per (task, dataset, tool), each tool in its own
# environment. With `--sdm conda` the job runs in the conda env built from envs/baseline-<tool>.yaml
# (adapter in-process there); otherwise `epiflow run-baseline` builds / reuses a plain virtualenv from
# the same file's pip list under config baselines.env_cache and runs the adapter with its Python
# (light tools -- LSI, LDA, PCA, PCA+SVM, MLP -- run in the main env unless baselines.isolate_light).
# Outputs: {R}/baselines/<task>/<dataset>/<tool>/metrics.tsv (the common long table) and one
# merged {R}/baselines/metrics.tsv; perturbation jobs (rule run_baseline_stimulation) also write
# cells.tsv, the Fig. 3g UMAPs of their predicted cells, which fig3g draws beside EpiAgent's (only
# with tasks.stimulation.umap, as predict-stimulation's own cells.tsv).
#
# Which datasets (baseline_units in common.smk): baselines.datasets, except for the tasks that
# follow an EpiAgent task and take its datasets (none when it is off):
#   integration  -> tasks.integration.datasets, one job named tasks.integration.name
#   perturbation -> tasks.stimulation.datasets, leave-one-cell-type-out as predict-stimulation
#   genetic      -> tasks.genetic.datasets, EpiAgent's own held-out split
# Every job takes the settings that define the comparison from its EpiAgent task (baseline_args):
# perturbation and genetic jobs control, condition_key / perturbation_key, label_key as --label-key,
# holdout, holdout_fraction, min_cells, k, n_top, seed, focus_group for the UMAPs
# (baselines.holdout.<task> overrides the held-out groups for the baselines alone, e.g. one type
# where a tool is slow); integration jobs batch_key, label_key, label_map, max_cells, common_ccres,
# seed; feature_extraction / annotation / imputation jobs the task's scoring settings
# (n_neighbors, max_iter / query_fraction / min_cell_fraction, n_pcs) and, on a dataset the task
# evaluates, its label_key and seed.
#
# Config (see config/README.md):
#   baselines:
#     enabled: false
#     datasets: [atlas_b1]          # manifest names, or 'all' (see above for the following tasks)
#     tasks: {feature_extraction: [lsi, lda], integration: [pca, harmony], annotation: [pca_svm, mlp],
#             perturbation: [scgen, scpram], genetic: [gears]}
#     params: {peakvi: {max_epochs: 50}}   # per tool, passed as --param key=value (JSON values)
#                                   # (GEARS's GO table: tasks.genetic.go unless params: {gears: {go: ...}})
#     holdout: {perturbation: [GMP]}       # optional: the baselines' own held-out groups
#     env_cache: null               # venv cache; null = $EPIFLOW_ENV_CACHE or ~/.cache/epiflow/envs
#     isolate_light: false          # true: light tools in their own venvs too
#     label_key: cell_type          # on datasets no EpiAgent task of theirs evaluates (and genetic's labels)
#     batch_key: batch              # feature_extraction / annotation / imputation tools
#     genes: null                   # BED6 gene file for gene-activity scores (annotation)
#     seed: 0                       # where the task's seed is not taken (see above)


wildcard_constraints:
    bl_task=r"feature_extraction|integration|annotation|imputation|perturbation|genetic",
    bl_tool=r"[a-z][a-z0-9_]*",
    bl_dataset=r"[A-Za-z0-9._-]+",


rule run_baseline:
    input:
        corpus=baseline_corpus,
        go=baseline_go,
    output:
        metrics=f"{R}/baselines/{{bl_task}}/{{bl_dataset}}/{{bl_tool}}/metrics.tsv",
        output=f"{R}/baselines/{{bl_task}}/{{bl_dataset}}/{{bl_tool}}/output.npz",
    log:
        f"{R}/logs/baselines/{{bl_task}}/{{bl_dataset}}/{{bl_tool}}.log",
    benchmark:
        f"{R}/benchmarks/baselines/{{bl_task}}/{{bl_dataset}}/{{bl_tool}}.tsv"
    wildcard_constraints:
        bl_task=r"feature_extraction|integration|annotation|imputation|genetic",
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
        args=baseline_args,
    shell:
        # the hash seed pinned (as run_in_venv pins it for a tool's own environment): under --sdm conda
        # the adapter runs in this process, and a tool iterating over a set of strings (SnapATAC2's
        # mnc_correct over the batch labels) would give another result in every run
        'PYTHONHASHSEED=0 "$EPIFLOW_PYTHON" -m epiflow run-baseline --tool {wildcards.bl_tool} --task {wildcards.bl_task}'
        " --corpus {input.corpus:q} {params.dataset} {params.args}"
        " {params.tool_params} --env {params.env} {params.cache} --threads {threads}"
        " --out {params.outdir:q} > {log:q} 2>&1"


# Stimulated perturbation (scGen, scPRAM): the same job, leave-one-cell-type-out, and the UMAPs of
# the predicted cells (cells.tsv, as predict-stimulation's) for fig3g.
use rule run_baseline as run_baseline_stimulation with:
    output:
        **switched_outputs(
            "stimulation",
            cells=f"{R}/baselines/{{bl_task}}/{{bl_dataset}}/{{bl_tool}}/cells.tsv",
        ),
        metrics=f"{R}/baselines/{{bl_task}}/{{bl_dataset}}/{{bl_tool}}/metrics.tsv",
        output=f"{R}/baselines/{{bl_task}}/{{bl_dataset}}/{{bl_tool}}/output.npz",
    wildcard_constraints:
        bl_task="perturbation",


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
