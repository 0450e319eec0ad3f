"""zsharp-sweeps' extension of Hydra's Optuna sweeper (pruning, resume, MLflow parent runs)."""
