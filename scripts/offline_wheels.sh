#!/usr/bin/env bash
# Download, into DIR, the wheels that a GPU image with PyTorch, numpy, pandas, matplotlib,
# scipy and scikit-learn but no internet lacks to run sweeps (Hydra, Optuna, MLflow and what
# they import), for CPython 3.12 on x86-64 Linux. Versions are those of this repo's .venv.
# Install there with:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
# (used for docs/benchmarks.md's GPU sweeps; 35 MB in all)
set -euo pipefail
dir=${1:?usage: scripts/offline_wheels.sh DIR [PYTHON_VERSION]}
pyver=${2:-3.12}
pip=${PIP:-.venv/bin/python -m pip}
mkdir -p "$dir"
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
for name in hydra-core omegaconf hydra-joblib-launcher hydra-optuna-sweeper optuna alembic Mako \
    SQLAlchemy greenlet colorlog mlflow mlflow-skinny mlflow-tracing cachetools databricks-sdk \
    GitPython gitdb smmap importlib_metadata opentelemetry-api opentelemetry-proto \
    opentelemetry-sdk opentelemetry-semantic-conventions pydantic pydantic_core annotated-types \
    typing-inspection python-dotenv sqlparse fastapi starlette uvicorn google-auth pyasn1 \
    pyasn1_modules prettytable wcwidth cryptography cffi pycparser; do
  spec=$name
  v=$(version "$name" 2>/dev/null) && spec="$name==$v"
  $pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dir" "$spec"
done
ls "$dir" | wc -l
