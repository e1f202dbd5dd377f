# Stage 2: pretraining (CCA + SR, RLM warm-up) of EpiAgent on the corpus.
# Skipped when config model.checkpoint names published weights.
# Locally the launcher runs `epiflow pretrain` in-process; on SLURM the profile sets the `mpi`
# resource to `srun --ntasks-per-node=1 ...`, which starts the launcher once per node, and the
# launcher starts one torchrun per node (see scripts/torchrun_launch.sh).


rule pretrain:
    input:
        corpus=rules.build_corpus.output.corpus,
    output:
        checkpoint=f"{R}/pretrain/checkpoint.pth",
        state=f"{R}/pretrain/train_state.pt",
        metrics=f"{R}/pretrain/metrics.csv",
        eval=f"{R}/pretrain/eval.json",
        loss=report(
            f"{R}/pretrain/loss.png",
            caption="../report/pretrain.rst",
            category="Pretraining",
            labels={"figure": "training losses"},
        ),
    log:
        f"{R}/logs/pretrain.log",
    benchmark:
        f"{R}/benchmarks/pretrain.tsv"
    conda:
        "../../envs/epiflow.yaml"
    threads: res("pretrain", "threads")
    resources:
        mem_mb=res("pretrain", "mem_mb"),
        runtime=res("pretrain", "runtime"),
        mpi="",
    params:
        launcher=LAUNCHER,
        outdir=lambda w, output: os.path.dirname(output.checkpoint),
        args=pretrain_args(),
    shell:
        "{resources.mpi} bash {params.launcher} --corpus {input.corpus}"
        " --out {params.outdir} {params.args} --no-progress > {log} 2>&1"
