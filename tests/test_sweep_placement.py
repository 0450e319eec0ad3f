"""Where a sweep worker computes. Alone in its process it sees only its GPU (by UUID) and
computes on cuda:0; where CUDA started before it could restrict it, it finds its card among
all; in the sweep's own process it keeps every GPU. CPU workers split the host's cores. CUDA
is faked: the logic, not the driver, is tested here (tests/gpu/multi runs it on two GPUs)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from zsharp_sweeps.sweep.placement import VISIBLE, gpu_uuids, pin_gpu, share_cores

HOST = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]


class FakeCuda:
    """What a process's CUDA would report: every host card, or only those the variable
    named when CUDA first started (``started_with``: the variable's value back then)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, started_with: str | None = "unset",
                 initialised: bool = False) -> None:
        self.started_with = started_with
        self.current: int | None = None
        self._initialised = initialised
        for name in ("get_device_properties", "device_count", "set_device", "is_initialized"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def _seen(self) -> list[str]:
        if self.started_with == "unset":  # CUDA starts now, reading the variable
            self.started_with = os.environ.get(VISIBLE)
        if self.started_with is None:
            return HOST
        return [u for u in HOST if u in self.started_with.split(",")]

    def get_device_properties(self, index: int) -> SimpleNamespace:
        return SimpleNamespace(uuid=self._seen()[index].removeprefix("GPU-"))

    def device_count(self) -> int:
        return len(self._seen())

    def set_device(self, index: int) -> None:
        self.current = index

    def is_initialized(self) -> bool:
        return self._initialised


@pytest.fixture(autouse=True)
def _no_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VISIBLE, raising=False)


def test_uuids_name_each_cuda_label_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeCuda(monkeypatch)
    assert gpu_uuids(["cuda:2", "cuda:0"]) == {"cuda:2": "GPU-cccc", "cuda:0": "GPU-aaaa"}
    assert gpu_uuids(["cpu:0", "cuda", "cpu"]) == {}


def test_a_worker_in_its_own_process_sees_only_its_card(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda(monkeypatch)
    pinned = pin_gpu("cuda:1", "GPU-bbbb", own_process=True)
    assert (pinned.device, pinned.isolated, pinned.note) == ("cuda:0", True, "")
    assert pinned.uuid == "GPU-bbbb"  # read back from the device it computes on
    assert os.environ[VISIBLE] == "GPU-bbbb"
    assert cuda.device_count() == 1 and cuda.current == 0


def test_cuda_started_early_the_worker_finds_its_card_and_restores_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(VISIBLE, "GPU-aaaa,GPU-cccc")
    cuda = FakeCuda(monkeypatch, started_with="GPU-aaaa,GPU-cccc")  # read before the worker
    pinned = pin_gpu("cuda:1", "GPU-cccc", own_process=True)
    assert pinned.device == "cuda:1" and not pinned.isolated and pinned.uuid == "GPU-cccc"
    assert "GPU-cccc" in pinned.note and "cuda:1" in pinned.note
    assert os.environ[VISIBLE] == "GPU-aaaa,GPU-cccc"
    assert cuda.current == 1


def test_the_sweeps_own_process_keeps_every_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda(monkeypatch, initialised=True)
    pinned = pin_gpu("cuda:2", "GPU-cccc", own_process=False)
    assert (pinned.device, pinned.isolated, pinned.uuid) == ("cuda:2", False, "GPU-cccc")
    assert VISIBLE not in os.environ and cuda.current == 2


def test_initialised_cuda_or_no_uuid_pins_by_index(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda(monkeypatch, initialised=True)
    assert pin_gpu("cuda:1", "GPU-bbbb", own_process=True).device == "cuda:1"
    assert pin_gpu("cuda:2", None, own_process=True).device == "cuda:2"
    assert VISIBLE not in os.environ and cuda.current == 2


def test_cpu_workers_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda(monkeypatch)
    assert pin_gpu("cpu:1", None, own_process=True).device == "cpu:1"
    assert cuda.current is None and VISIBLE not in os.environ


@pytest.mark.parametrize("host_workers", [1, 2, 64])
def test_cpu_workers_split_the_cores(host_workers: int) -> None:
    before = torch.get_num_threads()
    try:
        threads, cores = share_cores(host_workers)
        assert threads == max(1, cores // host_workers) == torch.get_num_threads()
        assert cores == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(before)


def test_the_sweeps_device_checks_never_start_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep's process checks ``hardware=cuda`` and lists the GPUs before it forks its
    workers. It used to ask ``torch.cuda.is_available()``, whose ``cudaGetDeviceCount``
    starts the CUDA driver: every forked worker then failed with "Cannot re-initialize CUDA
    in forked subprocess" (seen on an H100 with ``hardware=cuda``). NVML is asked instead."""
    from hydra_plugins.zsharp_optuna_sweeper.sweeper import ZSharpOptunaSweeper
    from zsharp_sweeps.config import ConfigError
    from zsharp_sweeps.training.device import resolve_device

    def runtime() -> int:
        raise AssertionError("the CUDA runtime was asked in the sweep's process")

    monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", runtime)
    monkeypatch.setattr(torch.cuda, "_is_compiled", lambda: True)
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"has 2 CUDA device\(s\): allowed here: cuda:0 \.\. cuda:1"):
        resolve_device("cuda:2")
    sweeper = SimpleNamespace(devices=None, app=SimpleNamespace(
        hardware=SimpleNamespace(device="cuda")))
    assert ZSharpOptunaSweeper._devices(sweeper) == ["cuda:0", "cuda:1"]
    assert not torch.cuda.is_initialized()
