"""Where a sweep worker computes: its own GPU (in a process of its own, the only one it
sees), or its share of the host's CPU cores.

Why a worker process sees one GPU: anything that touches the "current" device before
``set_device`` (a library's first allocation, a stream, a generator) lands on GPU 0 and
leaves a context there, and a process that starts CUDA with every card visible sets up
driver state for all of them. So a worker that runs in a process of its own sets
``CUDA_VISIBLE_DEVICES`` to its GPU's UUID before CUDA starts, computes on ``cuda:0``, and
keeps the sweep's name for the GPU (``cuda:2``) in its logs, trial attributes and MLflow
``device`` tag. Measured on 2- and 4-GPU hosts, a worker's device step then takes 0.2-0.8 s
(docs/benchmarks.md). (The 4-5 s between workers' starts seen before was the launcher's,
not CUDA's: see ``hydra_plugins/zsharp_workers_launcher``.)

UUIDs, not indices: they name the same card whatever ``CUDA_VISIBLE_DEVICES`` the sweep was
started with. Whether the restriction took is checked, not assumed: if CUDA was already
initialised in the process (the variable is then ignored), the worker finds its card by UUID
among those it sees, and says so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

VISIBLE = "CUDA_VISIBLE_DEVICES"


def gpu_uuids(labels: Sequence[str]) -> dict[str, str]:
    """``{"cuda:2": "GPU-…"}`` for each CUDA label, as the sweep's process numbers them."""
    indexed = [label for label in labels if label.startswith("cuda:")]
    if not indexed:
        return {}
    import torch

    return {label: _uuid(torch.cuda.get_device_properties(int(label[5:]))) for label in indexed}


def _uuid(props) -> str:
    text = str(props.uuid)
    return text if text.startswith("GPU-") else f"GPU-{text}"


@dataclass(frozen=True)
class Pinned:
    """Where a worker computes (``device``, a torch device string), the UUID of the card
    that device is (read back from CUDA, not assumed), and what it saw."""

    device: str
    uuid: str | None  # None: not a GPU
    isolated: bool
    note: str = ""


def pin_gpu(label: str, uuid: str | None, *, own_process: bool) -> Pinned:
    """Make ``label``'s GPU (``cuda:N``) this process's current device; returns the device
    to compute on.

    ``own_process``: the worker is alone in a process started for it (not the sweep's main
    process, whose CUDA may be initialised and whose other users must keep every GPU).
    """
    if not label.startswith("cuda:"):  # a CPU worker: nothing to pin
        return Pinned(label, None, isolated=False)
    import torch

    index, isolated, note = int(label[5:]), False, ""
    if own_process and uuid and not torch.cuda.is_initialized():
        previous = os.environ.get(VISIBLE)
        os.environ[VISIBLE] = uuid
        if _uuid(torch.cuda.get_device_properties(0)) == uuid:
            index, isolated = 0, True
        else:
            # CUDA read the variable before we set it (something initialised it early): put
            # it back and find the card among all of them.
            if previous is None:
                os.environ.pop(VISIBLE)
            else:
                os.environ[VISIBLE] = previous
            index = next((i for i in range(torch.cuda.device_count())
                          if _uuid(torch.cuda.get_device_properties(i)) == uuid), index)
            note = (f"CUDA was initialised before the worker could restrict it to {uuid}: "
                    f"computing on cuda:{index} with every GPU visible")
    torch.cuda.set_device(index)
    return Pinned(f"cuda:{index}", _uuid(torch.cuda.get_device_properties(index)), isolated,
                  note)


def share_cores(host_workers: int) -> tuple[int, int]:
    """Give this process its share of the host's cores; returns (threads, cores).

    The workers of one host split its cores: each would otherwise start a thread per core,
    and two CPU workers training at once on 2 cores ran 10x slower than one (OpenMP threads
    spinning against each other); a GPU worker's host-side work (data, augmentation draws)
    gets its share too. ``hardware.num_threads`` still wins per trial.
    """
    import torch

    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    threads = max(1, cores // max(1, host_workers))
    torch.set_num_threads(threads)
    return threads, cores
