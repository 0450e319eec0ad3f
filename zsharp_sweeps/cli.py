"""The command-line edge: where an exception becomes an exit status, once.

Inside, everything raises: bad input of any kind is a ``ConfigError`` (or a dataset that
cannot be had, ``DatasetUnavailableError``) naming the setting, a stop by a signal is a
``KeyboardInterrupt`` (``Terminated``, ``Stopped``). Here they become what a shell and a
scheduler read: one line on stderr and exit status 2 for bad input, 128 + the signal for a
stop, Hydra's own one-line message and status 1 for a config that does not compose.

Two ways through Hydra lead here. Hydra reports an exception that leaves its sweeper (or
any other part of the app outside a job) itself, as a traceback and status 1, unless
``HYDRA_FULL_ERROR`` is set: the edge sets it for the duration of the command so that the
exception reaches it, and restores it after. An ``Exception`` from a job's task function is
reported by Hydra's job machinery on the way out (an "Error executing job" line), so a single
run's task hands bad input on as :class:`BadInput`, which passes through untouched.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from hydra.errors import CompactHydraException
from omegaconf.errors import OmegaConfBaseException

from zsharp_sweeps.config import ConfigError
from zsharp_sweeps.training.signals import Stopped, exit_code

#: Exit status for bad input (a setting, the tracking store, a dataset that cannot be had).
BAD_INPUT = 2


def bad_input_errors() -> tuple[type[Exception], ...]:
    """What counts as bad input: a setting (``ConfigError``), a dataset that cannot be had."""
    from zsharp_sweeps.data import DatasetUnavailableError

    return ConfigError, DatasetUnavailableError


class BadInput(BaseException):  # noqa: N818  (it is not an error of the program)
    """Bad input (its ``__cause__``) on its way from a job's task function to the edge."""


@contextlib.contextmanager
def edge() -> Iterator[None]:
    """Run a command's body; turn what it raises into one line and an exit status."""
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except CompactHydraException as exc:  # composition: what Hydra itself would print
        print(exc, file=sys.stderr)
        if isinstance(exc.__cause__, OmegaConfBaseException):
            print(exc.__cause__, file=sys.stderr)
        sys.exit(1)
    except BadInput as exc:
        print(f"error: {exc.__cause__}", file=sys.stderr)
        sys.exit(BAD_INPUT)
    except Stopped as exc:
        print(exc, file=sys.stderr)
        sys.exit(exit_code(exc))
    except KeyboardInterrupt as exc:
        print(f"stopped ({exc or 'Ctrl-C'}): the run ends KILLED", file=sys.stderr)
        sys.exit(exit_code(exc))
    except Exception as exc:
        if not isinstance(exc, bad_input_errors()):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(BAD_INPUT)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
