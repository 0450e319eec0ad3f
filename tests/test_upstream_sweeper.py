"""hydra-optuna-sweeper's own tests on ``zsharp_optuna``, as on the stock sweeper; and the
version of it whose private search-space parser we use.

Here the upstream tests that sweep (an in-process multirun through the sweeper: the ones that
can tell two sweepers apart; the others test the stock parser and sampler configs, which ours
uses as they are), on both sweepers; ``make test-upstream`` (run by CI too) runs all 93 on
both and compares (``python -m tests.upstream``). The sdist is downloaded once
(``tests/upstream.py``).
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest

from .upstream import VERSION, compare

#: hydra-optuna-sweeper versions whose ``_impl.create_params_from_overrides`` (the one private
#: name zsharp_sweeps/sweep/sampling.py uses) was read and run here: its signature
#: ``(list[str]) -> (distributions, fixed params, deletions)`` and its meaning of choice,
#: range, interval and tag(log). Widen with pyproject's pin, after re-checking both.
PARSER_CHECKED = ("1.4.0rc3",)


def test_hydra_optuna_sweeper_is_a_version_whose_parser_was_checked() -> None:
    installed = version("hydra-optuna-sweeper")
    assert installed in PARSER_CHECKED and VERSION in PARSER_CHECKED, (
        f"hydra-optuna-sweeper {installed} is not one of {PARSER_CHECKED}, the versions whose "
        "private _impl.create_params_from_overrides zsharp_sweeps/sweep/sampling.py was checked "
        "against: re-check its signature and distributions, then widen PARSER_CHECKED, "
        "tests/upstream.py's VERSION and pyproject's pin together."
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_upstream_tests_that_sweep_pass_on_zsharp_optuna_as_on_the_stock_sweeper(
    tmp_path: Path,
) -> None:
    stock, ours = compare(tmp_path, "-k", "launch_jobs or rejected_result")
    assert set(stock) == {"test_launch_jobs", "test_rejected_result_marks_trial_failed[nan]",
                          "test_rejected_result_marks_trial_failed[wrong-number-of-values]"}
    assert all(stock.values()), stock
    assert ours == stock
