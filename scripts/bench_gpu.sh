#!/usr/bin/env bash
# The GPU benchmark behind docs/benchmarks.md. Usage: scripts/bench_gpu.sh steps|trials|aux OUTDIR
# steps : resnet56 and vit, sgd/sam/zsharp, four speed modes (one process per model)
# trials: k concurrent resnet20 trainings on one GPU, k = 1, 2, 4, 8 (processes; CUDA streams in one process)
# aux   : data-loader throughput and the cost of each sharpness metric on resnet56
set -euo pipefail
part=${1:?steps|trials|aux}
out=${2:-.}
mkdir -p "$out"
py=${PYTHON:-python3}
case "$part" in
  steps)
    for model in resnet56 vit; do
      $py -m zsharp_sweeps.bench --device cuda --model "$model" --optimizers sgd,sam,zsharp \
        --batch-size 128 --steps 100 --warmup 10 \
        --modes fp32,bf16+cl,bf16+cl+graph,bf16+cl+compile+graph --json "$out/steps_$model.json"
    done ;;
  trials)
    $py -m zsharp_sweeps.bench --device cuda --model resnet20 --optimizers zsharp --batch-size 128 \
      --steps 200 --warmup 10 --precision bf16 --channels-last --cuda-graph \
      --concurrent 1,2,4,8 --json "$out/trials_resnet20.json"
    $py -m zsharp_sweeps.bench --device cuda --model resnet20 --optimizers zsharp --batch-size 128 \
      --steps 200 --warmup 10 --precision bf16 --channels-last --cuda-graph \
      --concurrent 1,2,4,8 --concurrent-mode streams --json "$out/trials_resnet20_streams.json"
      ;;
  aux)
    $py -m zsharp_sweeps.bench --device cuda --loader --batch-size 128 --loader-workers 4,8,16 \
      --json "$out/loader.json"
    $py -m zsharp_sweeps.bench --device cuda --model resnet56 --sharpness --json "$out/sharpness.json" ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
