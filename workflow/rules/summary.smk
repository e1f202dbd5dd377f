# Final stage: one table of every metric (results/summary.tsv), printed at the end of the run.


rule summarize:
    input:
        unpack(seen_inputs),
        pretrain=pretrain_metrics_file,
        metrics=task_metrics_files,
    output:
        tsv=report(
            f"{R}/summary.tsv",
            caption="../report/summary.rst",
            category="Summary",
            labels={"table": "all metrics"},
        ),
    log:
        f"{R}/logs/summarize.log",
    benchmark:
        f"{R}/benchmarks/summarize.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: 1
    resources:
        mem_mb=res("summarize", "mem_mb"),
        runtime=res("summarize", "runtime"),
    params:
        # column seen_in_pretraining: corpus datasets true, downstream false (external model: unknown)
        seen=seen_args,
        pretrain=lambda w, input: opt("--pretrain-metrics", list(input.pretrain)),
        metrics=lambda w, input: opt("--metrics", list(input.metrics)),
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow summarize {params.seen}'
        " {params.pretrain} {params.metrics} --out {output.tsv:q} > {log:q} 2>&1"
