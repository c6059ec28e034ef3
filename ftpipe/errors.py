"""User-facing failures and the wrapper that turns them into a one-line error and a non-zero exit."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from types import FrameType

EXIT_USER_ERROR = 2
# Folders (relative to the project) that hold stage outputs; temporary leftovers of a killed
# writer are swept from them when a stage starts.


class PipelineError(Exception):
    """Bad input or configuration. The message is one line naming the file, line or field."""


class Terminated(SystemExit):
    """SIGTERM (a flow cancelled, `kill`): unwind like an exception so that atomic writers remove
    their temporary outputs; exit 128 + 15 as the shell reports a signal."""


def terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated(128 + signum)


def run_cli(main: Callable[[], None]) -> None:
    """Call a stage's main(); print PipelineError as `error: ...` on stderr and exit non-zero.
    The message has any credentials masked (a tracking URI may carry them)."""
    from ftpipe.credentials import redact
    from ftpipe.io import sweep_stale_tmp
    from ftpipe.paths import OUTPUT_FOLDERS

    signal.signal(signal.SIGTERM, terminate)
    sweep_stale_tmp(OUTPUT_FOLDERS)
    try:
        main()
    except PipelineError as exc:
        message = " ".join(redact(str(exc)).split())  # one line, whatever the cause embedded
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except ModuleNotFoundError as exc:
        # Mostly `dvc` started outside the environment: DVC runs each stage with the `python` first on
        # PATH, which then lacks the project's packages.
        print(f"error: {sys.executable} cannot import {exc.name}: run the stages in the project's environment "
              "(`. .venv/bin/activate` before `dvc`, or `make run`)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except Terminated:
        print("error: terminated by SIGTERM; previous outputs kept", file=sys.stderr)
        raise
    except KeyboardInterrupt:
        print("error: interrupted; previous outputs kept", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
