#!/usr/bin/env bash
# An elastic run on SLURM (dist=torchft): a lighthouse job, then one job per replica (a job array). A replica job that
# is preempted, fails or is cancelled leaves the others training; requeued or resubmitted, it heals from a live peer.
# Run on the login node, from the repository root, with the project's environment active (torchft_lighthouse on PATH):
#
#   scripts/slurm/elastic.sh <task> <replicas> [hydra overrides...]
#   e.g. MIN_REPLICAS=2 scripts/slurm/elastic.sh cifar10 4 slowmo=on +experiment=paper_cifar10 data.root=/data/cifar10
#
# Every replica writes into runs/<task>/elastic-<date>/replica_<i>/ (RUN_DIR to choose); LIGHTHOUSE_ADDR=http://host:port
# uses a lighthouse that already runs instead of submitting one. The line that resubmits one replica is printed at the
# end. Stop the run: scancel the replica array and the lighthouse job.
# SBATCH options for the replica jobs go in REPLICA_SBATCH (e.g. "--gpus=1 --cpus-per-task=10 --time=24:00:00").
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 <task> <replicas> [overrides...]" >&2; exit 2; }
TASK=$1 REPLICAS=$2; shift 2
[ -f "experiments/$TASK/train.py" ] || { echo "no task '$TASK': run from the repository root" >&2; exit 2; }
PYTHON=${PYTHON:-python}
PORT=${LIGHTHOUSE_PORT:-29510}
if [ -z "${LIGHTHOUSE_ADDR:-}" ]; then  # else: a lighthouse that already runs (e.g. on a service node)
  LIGHTHOUSE_ARGS="--min_replicas ${MIN_REPLICAS:-1} --join_timeout_ms ${JOIN_TIMEOUT_MS:-10000}"
  LIGHTHOUSE_ARGS+=" --heartbeat_timeout_ms ${HEARTBEAT_TIMEOUT_MS:-5000}"
  # bound to the node's cluster address only (its first one), not to every interface: the dashboard can kill replicas
  LIGHTHOUSE=$(sbatch --parsable --job-name=slowmo-lighthouse --ntasks=1 --output=slurm-%x-%j.out \
    --wrap "exec torchft_lighthouse $LIGHTHOUSE_ARGS --bind \$(hostname -I | cut -d' ' -f1):$PORT")
  echo "lighthouse: job $LIGHTHOUSE; waiting for its node" >&2
  until NODE=$(squeue -h -j "$LIGHTHOUSE" -t RUNNING -o %N) && [ -n "$NODE" ]; do sleep 2; done
  LIGHTHOUSE_ADDR=http://$NODE:$PORT
fi
RUN_DIR=${RUN_DIR:-runs/$TASK/elastic-$(date +%Y-%m-%d_%H-%M-%S)}
ARGS=("experiments/$TASK/train.py" dist=torchft "dist.world_size=$REPLICAS" "dist.min_replicas=${MIN_REPLICAS:-1}"
  "dist.lighthouse=$LIGHTHOUSE_ADDR" "hydra.run.dir=$RUN_DIR" "$@")
WRAP="exec srun $PYTHON ${ARGS[*]@Q} dist.replica_id=\$SLURM_ARRAY_TASK_ID"
# shellcheck disable=SC2086  # REPLICA_SBATCH is a list of options
REPLICAS_JOB=$(sbatch --parsable --job-name=slowmo-replica --array=0-$((REPLICAS - 1)) --ntasks=1 --requeue \
  --signal=USR1@120 --open-mode=append --output=slurm-%x-%A_%a.out ${REPLICA_SBATCH:-} \
  --wrap "$WRAP")
echo "replicas: job array $REPLICAS_JOB on lighthouse $LIGHTHOUSE_ADDR -> $RUN_DIR" >&2
echo "resubmit replica i: sbatch --array=<i> --job-name=slowmo-replica --ntasks=1 ${REPLICA_SBATCH:-} --wrap ${WRAP@Q}" >&2
