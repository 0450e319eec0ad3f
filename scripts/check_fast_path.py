"""Does the fast path train like the plain one? (issue 8: "accuracy does not move")

Runs ZSharp + ResNet-20 on digits with the same seed in several speed modes and prints
(1) the loss of the first 5 training steps per mode and (2) validation/test accuracy after
3 epochs. On CUDA the modes are eager fp32, eager bf16, bf16 + CUDA graph and
bf16 + compile + CUDA graph; on CPU eager fp32, channels-last and bf16.

    python scripts/check_fast_path.py [--device cuda]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from zsharp_sweeps.config import (
    DataConfig,
    HardwareConfig,
    ModelConfig,
    SharpnessConfig,
    TrainConfig,
    TrainerConfig,
    optimizer_config,
)
from zsharp_sweeps.report.tables import format_table
from zsharp_sweeps.training.build import build_parts, build_step
from zsharp_sweeps.training.engine import fit


def _parts(cfg: TrainConfig, device: torch.device):
    torch.manual_seed(cfg.seed)
    return build_parts(cfg, device)


def first_losses(cfg: TrainConfig, device: torch.device, n: int = 5) -> list[float]:
    """The loss of the first ``n`` steps, through the trainer's own step (``build_step``)."""
    data, model, optimizer = _parts(cfg, device)
    step = build_step(cfg, model, optimizer, graph_warmup=2)  # capture within the n steps
    losses = []
    for i, (x, y) in enumerate(data.train):
        if i == n:
            break
        losses.append(float(step(x, y)[0]))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    base = TrainConfig(
        data=DataConfig(name="digits", image_size=16, val_size=200, batch_size=64),
        model=ModelConfig(name="resnet20"),
        optimizer=optimizer_config(name="zsharp", lr=0.1),
        trainer=TrainerConfig(epochs=3, progress=False),
        sharpness=SharpnessConfig(sam=False),
        hardware=HardwareConfig(device=args.device),
    )
    if device.type == "cuda":
        modes = {
            "fp32": HardwareConfig(device="cuda"),
            "bf16": HardwareConfig(device="cuda", precision="bf16", channels_last=True),
            "bf16+graph": HardwareConfig(device="cuda", precision="bf16", channels_last=True,
                                         cuda_graph=True),
            "bf16+compile+graph": HardwareConfig(device="cuda", precision="bf16",
                                                 channels_last=True, compile=True,
                                                 cuda_graph=True),
        }
    else:
        modes = {
            "fp32": HardwareConfig(device="cpu"),
            "fp32+cl": HardwareConfig(device="cpu", channels_last=True),
            "bf16": HardwareConfig(device="cpu", precision="bf16"),
        }
    rows = []
    for name, hw in modes.items():
        cfg = replace(base, hardware=hw)
        losses = first_losses(cfg, device)
        data, model, optimizer = _parts(cfg, device)
        summary = fit(model, optimizer, data, cfg).summary
        rows.append({"mode": name, **{f"loss{i}": round(v, 4) for i, v in enumerate(losses)},
                     "best_val_acc": summary["best_val_acc"],
                     "final_test_acc": summary["final_test_acc"]})
    print(format_table(rows))


if __name__ == "__main__":
    main()
