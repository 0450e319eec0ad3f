"""Which GPU a trial runs on when a sweep runs several trials at once."""

from __future__ import annotations


def assign_device(requested: str, slot: int | None, n_gpus: int, trials_per_gpu: int = 1) -> str:
    """Map a trial's slot in its parallel batch to a device string.

    Slot i goes to GPU ``(i // trials_per_gpu) % n_gpus``: with 8 GPUs and 2 trials per GPU,
    slots 0,1 share cuda:0, slots 2,3 share cuda:1, ... An explicit ``cuda:N`` request, a
    CPU/MPS request, or a run outside a sweep (slot None) is left as it is.
    """
    if slot is None or n_gpus == 0 or requested not in ("auto", "cuda"):
        return requested
    return f"cuda:{(slot // trials_per_gpu) % n_gpus}"
