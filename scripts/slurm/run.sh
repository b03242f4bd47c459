#!/usr/bin/env bash
# One training run inside a SLURM allocation: srun starts one rank per task (one per GPU), and every rank reads
# its rank, the world size and the master (the job's first node) from SLURM's variables.
#
#   sbatch [resources] scripts/slurm/run.sh <task> [hydra overrides...]     (the *.sbatch files call this)
#
# The run directory is runs/<task>/<job name>-<job id>, unless RUN_DIR is set: a requeued job keeps its id, so it
# finds its checkpoint and resumes. SLURM's warning signal (--signal=USR1@120 in the *.sbatch files) makes the
# ranks checkpoint and rank 0 requeue the job (scontrol requeue); PYTHON picks the interpreter (default python).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: sbatch [options] $0 <digits|cifar10|imagenet|wmt16> [overrides...]" >&2; exit 2; }
TASK=$1; shift
[ -f "experiments/$TASK/train.py" ] || { echo "no task '$TASK': run from the repository root" >&2; exit 2; }
RUN_DIR=${RUN_DIR:-runs/$TASK/${SLURM_JOB_NAME:-run}-${SLURM_JOB_ID:?run this inside a SLURM job (sbatch)}}
echo "slowmo: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST -> $RUN_DIR"
exec srun --kill-on-bad-exit=1 "${PYTHON:-python}" "experiments/$TASK/train.py" "hydra.run.dir=$RUN_DIR" "$@"
