"""A run that failed for a reason one line says: no traceback where that line would do.

Why: a diverged run (``optimizer.lr=1e6``) is an outcome of its settings, not a bug of the
program, and a traceback through Hydra, the trainer and the loop said nothing its last line
did not, once per sweep trial. ``TrainingFailed``'s ``str()`` is that line: what failed,
where, and what to try. The command line prints it (``error: ...``, exit status 1:
``zsharp_sweeps/cli.py``); a sweep trial records it as its Optuna user attribute
``fail_reason`` and logs it in one line; the MLflow run ends FAILED with it in its ``error``
tag either way. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["OneLineFailure", "TrainingFailed"]


class OneLineFailure(RuntimeError):
    """A failure whose message is the whole story: the command line prints it as one line
    (``error: ...``, exit status 1), never with a traceback."""


class TrainingFailed(OneLineFailure):
    """The run failed for the reason ``str()`` says in one line (it diverged, ...)."""
