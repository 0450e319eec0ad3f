"""``hydra.sweeper.keep_checkpoints`` (``zsharp_sweeps/sweep/keep.py``): once a sweep is done,
only the trials it names keep their checkpoints; nothing is deleted while a trial may still
resume from one. The end-to-end check is in ``test_sweep.py`` (the grid sweep)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from zsharp_sweeps.config import ConfigError
from zsharp_sweeps.sweep.keep import check_keep, kept_trials, prune_checkpoints
from zsharp_sweeps.sweep.worker import DIR_ATTR

DIST = {"x": FloatDistribution(0.0, 1.0)}


def _study(tmp_path: Path, values: list[float | None], states: list[TrialState] | None = None,
           direction: str = "maximize") -> optuna.Study:
    """A study whose trial n has the folder ``tmp_path/n`` with one checkpoint."""
    study = optuna.create_study(direction=direction)
    states = states or [TrialState.COMPLETE] * len(values)
    for n, (value, state) in enumerate(zip(values, states)):
        folder = tmp_path / str(n)
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "epoch-0002.pt").write_bytes(b"x")
        study.add_trial(create_trial(
            state=state, value=value if state == TrialState.COMPLETE else None,
            params={"x": 0.5}, distributions=DIST, user_attrs={DIR_ATTR: str(folder)}))
    return study


def _left(tmp_path: Path) -> list[int]:
    return sorted(int(p.parent.parent.name) for p in tmp_path.glob("*/checkpoints/*.pt"))


def test_best_keeps_only_the_best_trials_checkpoints(tmp_path: Path) -> None:
    study = _study(tmp_path, [0.5, 0.9, 0.7, None],
                   [TrialState.COMPLETE] * 3 + [TrialState.FAIL])
    removed = prune_checkpoints(study, tmp_path, "best", "FINISHED")
    assert _left(tmp_path) == [1]
    assert sorted(p.parent.name for p in removed) == ["0", "2", "3"]
    assert (tmp_path / "0").is_dir()  # only the checkpoints go


@pytest.mark.parametrize(("keep", "left"), [("all", [0, 1, 2]), ("none", []), (2, [1, 2]),
                                             ("1", [1]), (0, [])])
def test_keep_settings(tmp_path: Path, keep, left: list[int]) -> None:
    study = _study(tmp_path, [0.5, 0.9, 0.7])
    prune_checkpoints(study, tmp_path, keep, "FINISHED")
    assert _left(tmp_path) == left


def test_minimised_objective_keeps_the_lowest(tmp_path: Path) -> None:
    study = _study(tmp_path, [0.5, 0.9, 0.1], direction="minimize")
    assert kept_trials(study, 2) == {0, 2}
    prune_checkpoints(study, tmp_path, "best", "FINISHED")
    assert _left(tmp_path) == [2]


def test_nothing_is_deleted_while_a_trial_may_still_resume(tmp_path: Path) -> None:
    # A stopped sweep: its interrupted trial resumes from its checkpoints on the next run.
    study = _study(tmp_path, [0.5, 0.9, None], [TrialState.COMPLETE] * 2 + [TrialState.FAIL])
    assert prune_checkpoints(study, tmp_path, "best", "KILLED") == []
    assert prune_checkpoints(study, tmp_path, "best", "FAILED") == []
    assert _left(tmp_path) == [0, 1, 2]
    # Finished here, but a retry is enqueued (WAITING) or another host's trial RUNNING.
    study.enqueue_trial({"x": 0.5})
    assert prune_checkpoints(study, tmp_path, "none", "FINISHED") == []
    assert _left(tmp_path) == [0, 1, 2]


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    for bad in ("some", -1, 1.5, "-2"):
        with pytest.raises(ValueError, match=r"hydra.sweeper.keep_checkpoints=.* allowed all, "
                                             r"best, none or a number"):
            check_keep(bad)
    from hydra_plugins.zsharp_optuna_sweeper.sweeper import ZSharpOptunaSweeper

    with pytest.raises(ConfigError, match="hydra.sweeper.keep_checkpoints='some'"):
        ZSharpOptunaSweeper(sampler=None, direction="maximize", storage=None,
                            study_name=None, n_trials=2, n_jobs=1, max_failure_rate=0.0,
                            custom_search_space=None, params=None, keep_checkpoints="some")
