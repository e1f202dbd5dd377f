# Reference files fetched from a URL by a job of their own (config `downloads`: file name -> URL),
# written to results/downloads/<name>. A configuration names such a file by that path (e.g.
# tasks.genetic.go in config/paper.yaml), so planning the run, and a dry run, never touch the
# network; offline, a file of the same name in `data_mirror` is copied instead.
import re

DOWNLOADS = config.get("downloads") or {}


# on the submitting machine: cluster nodes often have no internet access
localrules:
    download,


wildcard_constraints:
    download="|".join(re.escape(k) for k in DOWNLOADS) or "(?!x)x",


rule download:
    output:
        f"{R}/downloads/{{download}}",
    log:
        f"{R}/logs/download/{{download}}.log",
    benchmark:
        f"{R}/benchmarks/download/{{download}}.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: 1
    resources:
        mem_mb=res("download", "mem_mb"),
        runtime=res("download", "runtime"),
    params:
        url=lambda w: DOWNLOADS[w.download],
        mirror=config["data_mirror"] or "",
    shell:
        "if [ -n '{params.mirror}' ] && [ -f '{params.mirror}/{wildcards.download}' ]; then"
        " cp '{params.mirror}/{wildcards.download}' {output:q}.part;"
        " else curl -fsSL --retry 3 -o {output:q}.part '{params.url}'; fi > {log:q} 2>&1;"
        " mv {output:q}.part {output:q}"
