"""Where a study stands: which trials count toward ``n_trials`` and when a worker is done.

``n_trials`` is the size of the study (rerunning a sweep continues it). A trial does not
count when a copy of it was retried (a worker died or was interrupted: Optuna's
``RetryHeartbeatStaleTrialCallback`` enqueued the copy, which counts instead) or when it was asked
beyond ``n_trials`` by workers racing at the end of a study (``SURPLUS_ATTR``). Everything
here reads the storage through Optuna's public API, so every worker on every host
computes the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from zsharp_sweeps.sweep.quiet import optuna_experimental

#: User attr of a trial asked after the study was full (told FAIL, never counted).
SURPLUS_ATTR = "zsharp:surplus"
#: User attr of a trial stopped by a signal; its retry counts instead.
INTERRUPTED_ATTR = "interrupted"
#: User attr of a trial whose task returned no usable objective value (NaN, not a number,
#: the wrong count): FAIL and counted, but not a failure of the task (``max_failure_rate``
#: bounds the trials whose task raised or whose worker died, as the stock sweeper does).
REJECTED_ATTR = "rejected_value"
#: User attr of a failed trial: why, in one line (``worker.failure_reason``): what
#: optuna-dashboard and the sweep report show.
FAIL_REASON_ATTR = "fail_reason"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def retried_from(trial: FrozenTrial) -> int | None:
    """The number of the trial that ``trial`` retries (Optuna's ``failed_trial`` attr)."""
    with optuna_experimental():
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of trials that have a retry copy in the study."""
    return {n for n in map(retried_from, trials) if n is not None}


def counts_toward_study(trial: FrozenTrial, retried: set[int]) -> bool:
    """Whether ``trial`` takes one of the study's ``n_trials`` places."""
    if trial.state == TrialState.WAITING:
        return False
    if trial.user_attrs.get(SURPLUS_ATTR):
        return False
    if trial.state == TrialState.FAIL and (
        trial.number in retried or trial.user_attrs.get(INTERRUPTED_ATTR)
    ):
        return False
    return True


def counted_trials(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that take the study's ``n_trials`` places."""
    retried = retried_numbers(trials)
    return [t for t in trials if counts_toward_study(t, retried)]


@dataclass(frozen=True)
class Progress:
    """Counts of the trials that count, by state; ``waiting`` are enqueued retries."""

    complete: int
    pruned: int
    failed: int
    running: int
    waiting: int
    rejected: int = 0

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed

    def done(self, n_trials: int) -> bool:
        """No work left anywhere: every place is taken by a finished trial."""
        return self.finished >= n_trials

    def has_work(self, n_trials: int) -> bool:
        """A worker that asks now gets a trial that counts."""
        return self.waiting > 0 or self.finished + self.running < n_trials

    @property
    def counted_failures(self) -> int:
        """The failures ``max_failure_rate`` bounds: failed trials whose value was not just
        rejected."""
        return self.failed - self.rejected


def progress(study: optuna.Study) -> Progress:
    trials = study.get_trials(deepcopy=False)
    counting = counted_trials(trials)
    return Progress(
        complete=sum(t.state == TrialState.COMPLETE for t in counting),
        pruned=sum(t.state == TrialState.PRUNED for t in counting),
        failed=sum(t.state == TrialState.FAIL for t in counting),
        running=sum(t.state == TrialState.RUNNING for t in counting),
        waiting=sum(t.state == TrialState.WAITING for t in trials),
        rejected=sum(t.state == TrialState.FAIL and REJECTED_ATTR in t.user_attrs
                     for t in counting),
    )


def is_surplus(study: optuna.Study, trial_number: int, n_trials: int) -> bool:
    """Whether the trial just asked lies beyond ``n_trials``: more counting trials with a
    smaller number than the study has places. Trial numbers are handed out atomically by
    the storage, so of several workers racing for the last place exactly one wins."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    ahead = sum(
        1 for t in trials if t.number < trial_number and counts_toward_study(t, retried)
    )
    return ahead >= n_trials
