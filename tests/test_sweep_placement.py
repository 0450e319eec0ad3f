"""Where a sweep worker computes. Alone in its process it sees only its GPU (by UUID) and
computes on cuda:0; where CUDA started before it could restrict it, it finds its card among
all; in the sweep's own process it keeps every GPU. A process started before its job starts
CUDA on the job's card then (``prepin``). CPU workers split the host's cores. CUDA is faked:
the logic, not the driver, is tested here (tests/gpu/multi runs it on two GPUs)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

import zsharp_sweeps.sweep.placement as placement
from zsharp_sweeps.sweep.placement import (
    VISIBLE,
    gpu_uuids,
    pin_gpu,
    prepin,
    prepin_slot,
    prepinned,
    share_cores,
    visible_entry,
)

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
        seen = []  # entries are UUIDs or indices in the host's order, as CUDA takes them
        for entry in self.started_with.split(","):
            if entry in HOST:
                seen.append(entry)
            elif entry.isdigit() and int(entry) < len(HOST):
                seen.append(HOST[int(entry)])
        return seen

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
    monkeypatch.setattr(placement, "_prepinned", None)


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    """The devices ``prepin`` loaded cuBLAS and cuDNN on (the fake CUDA cannot run them)."""
    devices: list[torch.device] = []
    monkeypatch.setattr(placement, "_load_libraries", devices.append)
    return devices


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


@pytest.mark.parametrize(("listed", "label", "entry"), [
    (None, "cuda:2", "2"),
    ("3,1", "cuda:1", "1"),
    ("3, 1", "cuda:0", "3"),
    ("GPU-aaaa,GPU-cccc", "cuda:1", "GPU-cccc"),
    ("MIG-1234", "cuda:0", "MIG-1234"),
])
def test_the_visible_entry_is_the_cards_place_in_the_sweeps_own_list(
    monkeypatch: pytest.MonkeyPatch, listed: str | None, label: str, entry: str
) -> None:
    if listed is not None:
        monkeypatch.setenv(VISIBLE, listed)
    assert visible_entry(label) == entry


def test_a_label_beyond_the_sweeps_list_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VISIBLE, "0,1")
    with pytest.raises(ValueError, match=r"cuda:2: CUDA_VISIBLE_DEVICES='0,1' names 2 card"):
        visible_entry("cuda:2")


def test_a_prestarted_process_starts_cuda_on_its_jobs_card_before_the_job(
    monkeypatch: pytest.MonkeyPatch, loaded: list[torch.device]
) -> None:
    """The sweep sees cards aaaa and cccc; the process whose job will compute on cuda:1
    restricts itself to cccc, starts CUDA and loads the libraries, before any job; the
    job's ``pin_gpu`` then takes that card as it is."""
    monkeypatch.setenv(VISIBLE, "GPU-aaaa,GPU-cccc")
    cuda = FakeCuda(monkeypatch)
    prepin_slot(["cuda:0", "cuda:1"], 1)
    early = prepinned()
    assert early is not None and early.label == "cuda:1" and early.seconds >= 0
    assert early.pinned == placement.Pinned("cuda:0", "GPU-cccc", isolated=True)
    assert os.environ[VISIBLE] == "GPU-cccc" and cuda.device_count() == 1
    assert loaded == [torch.device("cuda", 0)] and cuda.current == 0
    cuda.current = None
    cuda._initialised = True  # as CUDA is now in that process
    assert pin_gpu("cuda:1", "GPU-cccc", own_process=True) is early.pinned
    assert pin_gpu("cuda:1", None, own_process=True) is early.pinned
    assert cuda.current == 0 and os.environ[VISIBLE] == "GPU-cccc"


@pytest.mark.parametrize(("label", "uuid"), [("cuda:0", "GPU-aaaa"), ("cuda:1", "GPU-aaaa")])
def test_a_job_for_another_card_than_the_prestarted_one_is_refused(
    monkeypatch: pytest.MonkeyPatch, loaded: list[torch.device], label: str, uuid: str
) -> None:
    """CUDA cannot move to another card once started: the worker says why it cannot run
    rather than compute on the wrong card under the job's device tag."""
    FakeCuda(monkeypatch)
    assert prepin("cuda:1") is not None
    with pytest.raises(RuntimeError, match=r"started CUDA on cuda:1 \(GPU-bbbb\) before its "
                                           rf"job came, but the job computes on {label} "
                                           rf"\({uuid}\)"):
        pin_gpu(label, uuid, own_process=True)


def test_a_prestart_that_finds_no_card_leaves_the_process_as_it_was(
    monkeypatch: pytest.MonkeyPatch, loaded: list[torch.device]
) -> None:
    FakeCuda(monkeypatch)  # three cards: cuda:5 does not exist
    assert prepin("cuda:5") is None and prepinned() is None
    assert VISIBLE not in os.environ and loaded == []
    monkeypatch.setenv(VISIBLE, "GPU-aaaa")
    assert prepin("cuda:3") is None and os.environ[VISIBLE] == "GPU-aaaa"


def test_prestart_does_nothing_off_cuda_past_the_slots_or_once_cuda_started(
    monkeypatch: pytest.MonkeyPatch, loaded: list[torch.device]
) -> None:
    cuda = FakeCuda(monkeypatch, initialised=True)
    prepin_slot(["cuda:0"], 0)  # CUDA already started here: nothing to restrict
    prepin_slot(["cuda:0"], 1)  # a process beyond the jobs
    prepin_slot(["cpu", "cpu:1"], 1)
    assert prepinned() is None and loaded == [] and cuda.current is None
    assert VISIBLE not in os.environ


def test_a_library_that_fails_to_load_still_leaves_the_process_on_its_card(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA started on the job's card before cuDNN failed to load: the job must compute on
    that card (it can no longer see another), so the pin stands."""
    def broken(device: torch.device) -> None:
        raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_INITIALIZED")

    monkeypatch.setattr(placement, "_load_libraries", broken)
    FakeCuda(monkeypatch)
    early = prepin("cuda:2")
    assert early is not None and early.pinned.uuid == "GPU-cccc"
    assert os.environ[VISIBLE] == "2"
    assert pin_gpu("cuda:2", "GPU-cccc", own_process=True) is early.pinned
