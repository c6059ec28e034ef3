"""User-facing failures and the wrapper that turns them into a one-line error and a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2


class PipelineError(Exception):
    """Bad input or configuration. The message is one line naming the file, line or field."""


def run_cli(main: Callable[[], None]) -> None:
    """Call a stage's main(); print PipelineError as `error: ...` on stderr and exit non-zero."""
    try:
        main()
    except PipelineError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the cause embedded
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
