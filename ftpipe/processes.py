"""Stopping a helper server (MLflow, Prefect) started in its own session, children included."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    """Send `sig` to the process group of `proc` (started with start_new_session=True) and wait;
    kill the group if it outlives `timeout` seconds. Servers fork workers that a signal to the
    parent alone would leave running."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
