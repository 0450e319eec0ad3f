"""Upstream hydra-optuna-sweeper's own tests, run on the stock sweeper and on ``zsharp_optuna``.

The tests come from the package itself, not from this repository: its sdist, fetched once
with pip (``pip download --no-deps --no-binary :all:``) into a cache directory
(``$ZSHARP_UPSTREAM_CACHE``, else ``~/.cache/zsharp-sweeps/upstream``). The copy run against
``zsharp_optuna`` differs from the original in one thing: where a test sweeps with
``hydra/sweeper=optuna`` it sweeps with ``hydra/sweeper=zsharp_optuna``.

The sdist ships ``tests/test_optuna_sweeper_plugin.py`` but not the ``example/`` apps and
``tests/conf/`` of the repository, so the tests that run those fail on either sweeper (20 of
93 with 1.4.0rc3); what is compared is that every test that passes on the stock sweeper
passes on ours.

    python -m tests.upstream            # both runs, the comparison; exit 1 if ours lost any
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

#: The version pyproject.toml pins; its tests are the contract.
VERSION = "1.4.0rc3"
PACKAGE = "hydra-optuna-sweeper"
TEST_FILE = Path("tests") / "test_optuna_sweeper_plugin.py"
REPO = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    return Path(os.environ.get("ZSHARP_UPSTREAM_CACHE")
                or Path.home() / ".cache" / "zsharp-sweeps" / "upstream")


def sdist(cache: Path | None = None) -> Path:
    """The unpacked sdist of hydra-optuna-sweeper ``VERSION`` (downloaded once)."""
    cache = cache or cache_dir()
    root = cache / f"hydra_optuna_sweeper-{VERSION}"
    if (root / TEST_FILE).is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"hydra_optuna_sweeper-{VERSION}.tar.gz"
    if not archive.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
             ":all:", f"{PACKAGE}=={VERSION}", "-d", str(cache)],
            check=True, timeout=300,
        )
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    return root


def swapped(root: Path, dest: Path) -> Path:
    """A copy of the sdist whose tests sweep with ``zsharp_optuna`` instead of ``optuna``."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(root, dest)
    test = dest / TEST_FILE
    text = test.read_text()
    assert "hydra/sweeper=optuna" in text, "the upstream tests no longer name the sweeper"
    test.write_text(text.replace('"hydra/sweeper=optuna"', '"hydra/sweeper=zsharp_optuna"'))
    return dest


def run(root: Path, report: Path, *pytest_args: str) -> dict[str, bool]:
    """Run the tests of ``root`` in a fresh interpreter; ``{test id: passed}``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("PYTEST_XDIST_WORKER", None)
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "-o", "addopts=", f"--junitxml={report}", str(TEST_FILE), *pytest_args],
        cwd=root, env=env, capture_output=True, text=True, timeout=1200,
    )
    outcome: dict[str, bool] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        failed = any(child.tag in ("failure", "error") for child in case)
        skipped = any(child.tag == "skipped" for child in case)
        if not skipped:
            outcome[case.get("name", "")] = not failed
    return outcome


def compare(work: Path, *pytest_args: str) -> tuple[dict[str, bool], dict[str, bool]]:
    """(stock, zsharp_optuna) outcomes of the same upstream tests."""
    root = sdist()
    work.mkdir(parents=True, exist_ok=True)
    stock = run(root, work / "stock.xml", *pytest_args)
    ours = run(swapped(root, work / "zsharp"), work / "zsharp.xml", *pytest_args)
    return stock, ours


def main() -> int:
    import tempfile

    # One process: two of the upstream tests sweep into the same relative folder ("None",
    # the test runner's default sweep dir) and delete it when they end, so in parallel one
    # deletes the other's study.
    with tempfile.TemporaryDirectory() as tmp:
        stock, ours = compare(Path(tmp))
    lost = sorted(name for name, ok in stock.items() if ok and not ours.get(name))
    print(f"hydra-optuna-sweeper {VERSION} tests from its sdist: stock sweeper "
          f"{sum(stock.values())}/{len(stock)} passed, zsharp_optuna "
          f"{sum(ours.values())}/{len(ours)} passed")
    for name in lost:
        print(f"  passes on the stock sweeper, fails on zsharp_optuna: {name}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
