"""The command line in-process: what a test of the entry point's edge needs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from zsharp_sweeps import train


def run_main(argv: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch,
             capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the entry point in-process in ``cwd``; its exit status and its stderr."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["zsharp_sweeps.train", *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        train.main()
    return info.value.code, capsys.readouterr().err
