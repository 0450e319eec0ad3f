"""The command-line edge: where an exception becomes an exit status, once.

Inside, everything raises: bad input of any kind is a ``ConfigError`` (or a dataset that
cannot be had, ``DatasetUnavailableError``) naming the setting, a run that failed for a
reason one line says is a ``TrainingFailed`` (it diverged), a stop by a signal is a
``KeyboardInterrupt`` (``Terminated``, ``Stopped``). Here they become what a shell and a
scheduler read: one line on stderr and exit status 2 for bad input, one line and status 1
(``RUN_FAILED``) for a failed run, ``stopped (SIGINT)`` and 128 + the signal for a
stop. A config that does not compose (an unknown option, a misspelled key, an override
Hydra cannot parse, two commands such as ``--multirun --cfg job``) is bad input too: Hydra's
own message (its "Did you mean ...", its list of available options) flattened to one line.

Two ways through Hydra lead here. Hydra reports an exception that leaves its sweeper (or
any other part of the app outside a job) itself, as a traceback and status 1, unless
``HYDRA_FULL_ERROR`` is set: the edge sets it for the duration of the command so that the
exception reaches it, and restores it after. An ``Exception`` from a job's task function is
reported by Hydra's job machinery on the way out (an "Error executing job" line), so a single
run's task hands bad input on as :class:`BadInput` and a failed run as :class:`RunFailed`,
which pass through untouched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

from hydra.errors import CompactHydraException
from omegaconf.errors import OmegaConfBaseException

from zsharp_sweeps.config import ConfigError
from zsharp_sweeps.training.failures import OneLineFailure
from zsharp_sweeps.training.signals import Stopped, exit_code

#: Exit status for bad input (a setting, the tracking store, a dataset that cannot be had).
BAD_INPUT = 2
#: Exit status for a run that failed for a reason one line says (``TrainingFailed``: it
#: diverged); its MLflow run ends FAILED. The status a failing Python program has anyway.
RUN_FAILED = 1


def bad_input_errors() -> tuple[type[Exception], ...]:
    """What counts as bad input: a setting (``ConfigError``), a dataset that cannot be had."""
    from zsharp_sweeps.data import DatasetUnavailableError

    return ConfigError, DatasetUnavailableError


class BadInput(BaseException):  # noqa: N818  (it is not an error of the program)
    """Bad input (its ``__cause__``) on its way from a job's task function to the edge."""


class RunFailed(BaseException):  # noqa: N818  (it is not an error of the program)
    """A ``TrainingFailed`` (its ``__cause__``) on its way from a single run's task
    function to the edge, past Hydra's job machinery (which would print its traceback)."""


@contextlib.contextmanager
def edge() -> Iterator[None]:
    """Run a command's body; turn what it raises into one line and an exit status."""
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except CompactHydraException as exc:  # composition: what Hydra itself would print
        print(f"error: {hydra_message(exc)}", file=sys.stderr)
        sys.exit(BAD_INPUT)
    except BadInput as exc:
        print(f"error: {one_line(str(exc.__cause__))}", file=sys.stderr)
        sys.exit(BAD_INPUT)
    except RunFailed as exc:
        print(f"error: {one_line(str(exc.__cause__))} (the MLflow run ends FAILED)",
              file=sys.stderr)
        sys.exit(RUN_FAILED)
    except Stopped as exc:
        print(exc, file=sys.stderr)
        sys.exit(exit_code(exc))
    except KeyboardInterrupt as exc:
        code = exit_code(exc)  # the signal's name, not the exception's (empty) text
        print(f"stopped ({signal.Signals(code - 128).name}): the run ends KILLED",
              file=sys.stderr)
        sys.exit(code)
    except Exception as exc:
        if isinstance(exc, OneLineFailure):  # a sweep whose trials failed too often
            print(f"error: {one_line(str(exc))}", file=sys.stderr)
            sys.exit(RUN_FAILED)
        if isinstance(exc, ValueError) and _raised_by_hydra(exc):  # its command-line parser
            print(f"error: {one_line(str(exc))}", file=sys.stderr)
            sys.exit(BAD_INPUT)
        if not isinstance(exc, bad_input_errors()):
            raise
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(BAD_INPUT)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


# Lines of Hydra's and OmegaConf's messages that say nothing to a user of this command.
_NOISE = ("full_key:", "object_type=", "reference_type=", "See https://hydra.cc/")


def one_line(text: str) -> str:
    """A multi-line message as one line: list items (tab-indented lines, Hydra's available
    options) joined by commas after their heading, OmegaConf's ``full_key:``/``object_type=``
    lines and Hydra's config search path dropped, sentences joined."""
    text = text.split("\nConfig search path:", 1)[0]
    parts: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(_NOISE):
            continue
        if raw.startswith("\t") and parts:  # an item of the list the previous line heads
            sep = " " if parts[-1].endswith(":") else ", "
            parts[-1] = f"{parts[-1]}{sep}{line}"
        elif parts:
            sep = " " if parts[-1].endswith((".", ":", "?", "!", ";")) else ". "
            parts[-1] = f"{parts[-1]}{sep}{line}"
        else:
            parts.append(line)
    return parts[0] if parts else text.strip()


def hydra_message(exc: CompactHydraException) -> str:
    """Hydra's composition error as one line, naming the override where Hydra knows it
    (``hardware=gpu`` for a missing option ``hardware/gpu``)."""
    text = str(exc)
    if isinstance(exc.__cause__, OmegaConfBaseException):  # what was wrong, then the advice
        first, _, rest = text.partition("\n")
        text = f"{first.rstrip('.')}: {one_line(str(exc.__cause__))}\n{rest}"
    message = one_line(text)
    missing = getattr(exc, "missing_cfg_file", None)
    if getattr(exc, "options", None) and missing and "/" in missing:
        group, option = missing.rsplit("/", 1)
        message = f"{group}={option} is invalid: {message}"
    return message


def _raised_by_hydra(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by Hydra's command-line handling (``Only one of --run,
    --multirun, --cfg ...``, ``The --resolve flag can only be used ...``), not by the app it
    runs: the frame that raised it is in the module of Hydra's ``_run_hydra``. Only read,
    never called: no private Hydra API is used."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_globals.get("__name__") == "hydra._internal.utils"
