#!/usr/bin/env bash
# Submit the whole of Table 1: every task x base algorithm x SlowMo off/on x seed, one sbatch job each.
#   CIFAR10=/data/cifar10 IMAGENET=/data/imagenet WMT16=/data/wmt16_en_de scripts/slurm/reproduce_table1.sh
#   SEEDS="0 1 2 3 4" TASKS="cifar10" scripts/slurm/reproduce_table1.sh --dry-run   # print the sbatch lines
# Tau follows the paper: 12 for CIFAR-10 and for Local SGD / Local Adam everywhere, 48 for SGP/OSGP on ImageNet
# and WMT (the presets' values). AR-SGD runs without SlowMo, as in the paper. Collect the finished runs with
#   python scripts/plot.py runs/cifar10 --out results/table1/cifar10      (and so on per task)
set -euo pipefail
DRY=""; [ "${1:-}" = "--dry-run" ] && DRY=echo
SEEDS=${SEEDS:-0 1 2 3 4}
TASKS=${TASKS:-cifar10 imagenet wmt16}
declare -A DATA=([cifar10]=${CIFAR10:-} [imagenet]=${IMAGENET:-} [wmt16]=${WMT16:-})
declare -A BASES=([cifar10]="localsgd osgp sgp" [imagenet]="localsgd osgp sgp" [wmt16]="localsgd sgp")
cd "$(dirname "$0")/../.."
for task in $TASKS; do
  [ -n "$DRY" ] || [ -n "${DATA[$task]}" ] || { echo "set ${task^^} to the $task data directory" >&2; exit 2; }
  for seed in $SEEDS; do
    cells=()
    for base in ${BASES[$task]}; do
      extra=""
      [ "$base" = localsgd ] && extra="slowmo.tau=12"  # Local SGD's H follows tau
      cells+=("algorithm=$base slowmo=off $extra" "algorithm=$base slowmo=on $extra")
    done
    cells+=("algorithm=allreduce slowmo=off")
    for cell in "${cells[@]}"; do
      name=$(echo "$cell" | sed -E 's/algorithm=([a-z]+) slowmo=([a-z]+).*/\1-slowmo_\2/')
      DATA=${DATA[$task]:-/path/to/$task} $DRY sbatch --job-name="slowmo-$task-$name-s$seed" \
        "scripts/slurm/$task.sbatch" $cell "seed=$seed"
    done
  done
done
