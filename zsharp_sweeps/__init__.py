"""zsharp-sweeps: tune and compare sharpness-aware optimizers with Hydra, Optuna and MLflow."""

__version__ = "0.1.0"
