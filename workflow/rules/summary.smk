# Final stage: one table of every metric (results/summary.tsv), printed at the end of the run.


rule summarize:
    input:
        corpus=rules.build_corpus.output.corpus,
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
        pretrain=lambda w, input: opt("--pretrain-metrics", list(input.pretrain)),
        metrics=lambda w, input: opt("--metrics", list(input.metrics)),
    shell:
        "python -m epiflow summarize --corpus {input.corpus:q} {params.pretrain}"
        " {params.metrics} --out {output.tsv:q} > {log:q} 2>&1"
