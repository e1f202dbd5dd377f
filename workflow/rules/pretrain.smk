# Stage 2: pretraining (CCA + SR, RLM warm-up) of EpiAgent on the corpus.
# Skipped when config model.checkpoint names published weights.
# Locally the launcher runs `epiflow pretrain` in-process; on SLURM the profile sets the `mpi`
# resource to `srun --ntasks-per-node=1 ...`, which starts the launcher once per node, and the
# launcher starts one torchrun per node (see scripts/torchrun_launch.sh).
#
# Resume: the training state lives in {results}/pretrain_state/ (PRETRAIN_STATE), which is NOT an
# output of the rule, so Snakemake's --rerun-incomplete (or its cleanup of a failed job) cannot delete
# it; the rule always passes --resume (continue from the state if there is one) and
# --restart-if-changed (a state made with other settings is set aside and the run starts afresh;
# the settings hash is stored in the state). Kill the job or the whole snakemake process at any
# point, run the same command again: pretraining continues from its last checkpoint
# (pretrain.ckpt_every steps). On SLURM a job at its time limit saves on SIGUSR1/SIGTERM and the
# next submission (profile `retries`) resumes; see profiles/slurm/config.yaml.
PRETRAIN_STATE = f"{R}/pretrain_state"


rule pretrain:
    input:
        corpus=rules.build_corpus.output.corpus,
    output:
        checkpoint=f"{R}/pretrain/checkpoint.pth",
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
        state_dir=PRETRAIN_STATE,
        args=pretrain_args(),
    shell:
        "{resources.mpi} bash {params.launcher:q} --corpus {input.corpus:q}"
        " --out {params.outdir:q} --state-dir {params.state_dir:q} --resume --restart-if-changed"
        " {params.args} > {log:q} 2>&1"
