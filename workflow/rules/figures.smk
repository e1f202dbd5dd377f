# Figures: the paper's result panels (Fig. 2b-m, 3c-i, 4c-h, 5b-e, 6b-g; named by the paper's letters,
# docs/paper.md), each its own target results/figures/<panel>.png, drawn by `epiflow figure <panel>`
# from the tables the task rules wrote (metrics.tsv, cells.tsv, predictions.tsv, per_cell.tsv, ...).
# A panel is part of `all` only when the current configuration produces every table it needs (task
# enabled, and some rule declares the file); asking for another panel by name stops with a message
# saying why. results/figures/panels.tsv (rule figure_panels, in `all` and the report) lists every
# paper panel: drawn, not built with this configuration (why), or not drawable (NOT_DRAWN, reason).
from epiflow.plots.figures import PANELS


wildcard_constraints:
    panel="|".join(PANELS),
    table="|".join(list(TASK_OUTPUTS) + ["baselines"]),


rule figure:
    input:
        unpack(figure_inputs),
    output:
        png=report(
            f"{R}/figures/{{panel}}.png",
            caption="../report/figure.rst",
            category=lambda w: report_category(PANELS[w.panel].task_key),
            subcategory="Paper figures",
            labels=lambda w: {"panel": w.panel, "paper": PANELS[w.panel].paper},
        ),
    log:
        f"{R}/logs/figure/{{panel}}.log",
    benchmark:
        f"{R}/benchmarks/figure/{{panel}}.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: 1
    resources:
        mem_mb=res("figure", "mem_mb"),
        runtime=res("figure", "runtime"),
    params:
        args=figure_args,
        caption=figure_caption,
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow figure {wildcards.panel} {params.args}'
        " --out {output.png:q} > {log:q} 2>&1"


# Every paper panel and what became of it: drawn, not built with this configuration, not drawable.
rule figure_panels:
    output:
        tsv=report(
            f"{R}/figures/panels.tsv",
            caption="../report/panels.rst",
            category="Summary",
            subcategory="Paper figures",
            labels={"table": "paper panels (drawn / not drawn)"},
        ),
    log:
        f"{R}/logs/figure/panels.log",
    benchmark:
        f"{R}/benchmarks/figure/panels.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: 1
    resources:
        mem_mb=res("figure", "mem_mb"),
        runtime=res("figure", "runtime"),
    params:
        args=panels_args,
        caption=panels_caption,
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow figure --list {params.args} --out {output.tsv:q} > {log:q} 2>&1'


# One table per benchmark in the report (the metrics of every dataset of a task, long format), beside
# that task's figures; results/summary.tsv holds all of them together.
rule benchmark_table:
    input:
        unpack(seen_inputs),
        metrics=table_inputs,
    output:
        tsv=report(
            f"{R}/tables/{{table}}.tsv",
            caption="../report/table.rst",
            category=table_category,
            subcategory="Tables",
            labels=lambda w: {"table": f"{w.table} metrics"},
        ),
    log:
        f"{R}/logs/benchmark_table/{{table}}.log",
    benchmark:
        f"{R}/benchmarks/benchmark_table/{{table}}.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: 1
    resources:
        mem_mb=res("summarize", "mem_mb"),
        runtime=res("summarize", "runtime"),
    params:
        caption=table_caption,
        seen=seen_args,
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow summarize --metrics {input.metrics:q} {params.seen}'
        " --no-corpus-rows --out {output.tsv:q} > {log:q} 2>&1"
