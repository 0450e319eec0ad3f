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

Started before its job: a worker process that the launcher starts while the sweeper is still
setting up (``prestart``) already knows which card its job will name, so it restricts itself
to that card and starts CUDA, cuBLAS and cuDNN then (``prepin``), off the sweep's critical
path; ``pin_gpu`` then finds the card ready and checks it is the one the job names.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class Prepinned:
    """A card this process restricted itself to and started CUDA on before its job came:
    the sweep's name for it, what the process computes on, and how long the start took."""

    label: str
    pinned: Pinned
    seconds: float


#: Set by ``prepin`` in a prestarted worker process; ``pin_gpu`` uses it.
_prepinned: Prepinned | None = None


def visible_entry(label: str) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value that leaves a child of this process only the card
    this process calls ``label`` (``cuda:N``): the N-th entry of this process's own list
    (indices, UUIDs or MIG names), or N if it has none. CUDA numbers the cards it sees in
    the list's order, so this names the same card without starting CUDA here (the
    sweep's process must not: its workers are forked from it)."""
    index = int(label[5:])
    listed = os.environ.get(VISIBLE)
    if listed is None:
        return str(index)
    entries = [e.strip() for e in listed.split(",") if e.strip()]
    if index >= len(entries):
        raise ValueError(f"{label}: {VISIBLE}={listed!r} names {len(entries)} card(s)")
    return entries[index]


def prepin(label: str) -> Prepinned | None:
    """In a worker process started before its job (``prestart``), whose job will compute on
    ``label``: see only that card, start CUDA on it and load cuBLAS and cuDNN with a tiny
    matmul and convolution, while the sweeper sets up (measured 0.2-0.8 s per worker on
    2- and 4-GPU hosts, docs/benchmarks.md). Does nothing off CUDA or where CUDA has started
    in this process already; a failure leaves the process as it was (the job's own
    ``pin_gpu`` then meets the problem and reports it)."""
    global _prepinned
    if not label.startswith("cuda:"):
        return None
    import torch

    if torch.cuda.is_initialized() or _prepinned is not None:
        return None
    started = time.perf_counter()
    previous = os.environ.get(VISIBLE)
    try:
        os.environ[VISIBLE] = visible_entry(label)
        uuid = _uuid(torch.cuda.get_device_properties(0))
        torch.cuda.set_device(0)
    except Exception as exc:  # no usable card: the job's pin_gpu reports it
        if not torch.cuda.is_initialized():
            if previous is None:
                os.environ.pop(VISIBLE, None)
            else:
                os.environ[VISIBLE] = previous
        log.debug(f"{label}: CUDA not started before the job ({exc!r})")
        return None
    # CUDA runs on the job's card now: whatever happens next, the job must compute there.
    try:
        _load_libraries(torch.device("cuda", 0))
    except Exception as exc:  # the job's first steps load them, or meet the problem
        log.debug(f"{label}: cuBLAS/cuDNN not loaded before the job ({exc!r})")
    _prepinned = Prepinned(label, Pinned("cuda:0", uuid, isolated=True),
                           time.perf_counter() - started)
    return _prepinned


def prepin_slot(labels: Sequence[str], slot: int) -> None:
    """``prepin`` for the ``slot``-th prestarted process: its job is the ``slot``-th of the
    launch (the launcher's ``prestart`` contract), which computes on ``labels[slot]``."""
    if slot < len(labels):
        prepin(labels[slot])


def _load_libraries(device: torch.device) -> None:
    """One tiny matmul and convolution in float32 and bfloat16: the CUDA context, cuBLAS(Lt)
    handles and workspaces and cuDNN's handle come up now, not in the job's first step."""
    import torch
    import torch.nn.functional as F

    for dtype in (torch.float32, torch.bfloat16):
        a = torch.ones(8, 8, device=device, dtype=dtype)
        (a @ a).sum().item()
        x = torch.ones(1, 3, 8, 8, device=device, dtype=dtype)
        F.conv2d(x, torch.ones(4, 3, 3, 3, device=device, dtype=dtype)).sum().item()


def prepinned() -> Prepinned | None:
    """The card ``prepin`` started in this process, if any."""
    return _prepinned


def pin_gpu(label: str, uuid: str | None, *, own_process: bool) -> Pinned:
    """Make ``label``'s GPU (``cuda:N``) this process's current device; returns the device
    to compute on.

    ``own_process``: the worker is alone in a process started for it (not the sweep's main
    process, whose CUDA may be initialised and whose other users must keep every GPU).
    """
    if not label.startswith("cuda:"):  # a CPU worker: nothing to pin
        return Pinned(label, None, isolated=False)
    import torch

    early = _prepinned
    if early is not None:
        if early.label != label or (uuid is not None and early.pinned.uuid != uuid):
            raise RuntimeError(
                f"this worker process started CUDA on {early.label} ({early.pinned.uuid}) "
                f"before its job came, but the job computes on {label} ({uuid}): "
                f"{VISIBLE} changed in the sweep's process after it started (set it before "
                "the sweep starts), or the launcher handed jobs to other processes than "
                "it prestarted for them")
        torch.cuda.set_device(0)
        return early.pinned

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
