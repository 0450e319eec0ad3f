#!/usr/bin/env bash
# The GPU verdict of docs/results.md: ResNet-20 on real Fashion-MNIST, sgd / sam / zsharp,
# 16 tuning trials each (10 epochs, hyperband, TPE), 5 fresh seeds x 30 epochs, bf16 +
# channels-last + CUDA graph, the three arms' sweeps side by side on one GPU.
#
# Made for a machine without internet whose Python lacks Hydra/Optuna/MLflow: WHEELS holds
# their wheels (scripts/offline_wheels.sh), DATA the four Fashion-MNIST idx .gz files (e.g.
# Debian's /usr/share/datasets/fashion-mnist). Stops itself (SIGTERM) after LIMIT seconds,
# which leaves every stage resumable: run it again to continue. STATE (a tarball this
# script writes to OUT) restores the stores on a fresh machine.
#   WHEELS=.whl DATA=.gpudata/fashion-mnist OUT=/tmp/out LIMIT=540 bash scripts/gpu_verdict.sh
set -uo pipefail
WHEELS=${WHEELS:-.whl}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
OUT=${OUT:-/tmp/verdict-out}
LIMIT=${LIMIT:-540}
STATE=${STATE:-}
NAME=verdict-equal_budget-resnet20-fashion_mnist
mkdir -p "$OUT"
if [ -d "$WHEELS" ] && ! python3 -c "import hydra, optuna, mlflow" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
if [ -n "$STATE" ] && [ -f "$STATE" ] && [ ! -f "multirun/$NAME/optuna.db" ]; then
  tar xzf "$STATE"
  echo "restored the stores from $STATE"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# GPU busy share, sampled every second, for the cost report.
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 1 \
  >> "$OUT/gpu_util.csv" 2>/dev/null &
SAMPLER=$!
export PYTHONUNBUFFERED=1
start=$(date +%s)
timeout -s TERM "$LIMIT" python3 -m zsharp_sweeps.verdict \
  data=fashion_mnist "data.root=$DATA" model=resnet20 \
  hardware=cuda hardware.precision=bf16 hardware.channels_last=true hardware.cuda_graph=true \
  trainer.epochs=30 trainer.progress=false \
  'verdict.optimizers=[sgd,sam,zsharp]' verdict.reference=zsharp \
  verdict.tune.trials=16 verdict.tune.epochs=10 verdict.tune.pruner=hyperband \
  'verdict.final.seeds=[100,101,102,103,104]' "$@" 2>&1 | tr '\r' '\n' | grep -v '^verdict: ' | tee -a "$OUT/verdict.log"
rc=${PIPESTATUS[0]}
echo "verdict exit status $rc after $(( $(date +%s) - start )) s"
kill $SAMPLER 2>/dev/null
tar czf "$OUT/state.tgz" --exclude='*/checkpoints' "multirun/$NAME" mlruns 2>/dev/null
if [ -d "multirun/$NAME/verdict" ]; then
  tar czf "$OUT/verdict.tgz" -C "multirun/$NAME" verdict
fi
ls -la "$OUT"
exit 0
