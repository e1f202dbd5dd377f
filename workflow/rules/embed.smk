# Stage 3: cell embeddings (encoder output at [CLS]) of every corpus cell.


rule embed:
    input:
        checkpoint=checkpoint_file,
        corpus=rules.build_corpus.output.corpus,
    output:
        h5ad=f"{R}/embed/embeddings.h5ad",
    log:
        f"{R}/logs/embed.log",
    benchmark:
        f"{R}/benchmarks/embed.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("embed", "threads")
    resources:
        mem_mb=res("embed", "mem_mb"),
        runtime=res("embed", "runtime"),
    params:
        backend=config["model"]["backend"],
        heads=opt("--num-heads", config["model"]["num_heads"]),
        batch_tokens=config["embed"]["batch_tokens"],
        device=opt("--device", device_arg(config["embed"]["device"])),
        readout=config["embed"].get("readout", "cls"),
    shell:
        '"$EPIFLOW_PYTHON" -m epiflow embed --checkpoint {input.checkpoint:q} --corpus {input.corpus:q}'
        " --backend {params.backend} {params.heads} --batch-tokens {params.batch_tokens}"
        " {params.device} --readout {params.readout} --no-progress --out {output.h5ad:q} > {log:q} 2>&1"


# the same for the cells of one downstream dataset (its folder of rule downstream_corpus)
use rule embed as embed_downstream with:
    input:
        checkpoint=checkpoint_file,
        corpus=f"{R}/downstream/{{dataset}}",
    output:
        h5ad=f"{R}/embed/downstream/{{dataset}}.h5ad",
    log:
        f"{R}/logs/embed_downstream/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/embed_downstream/{{dataset}}.tsv"
