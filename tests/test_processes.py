"""Stopping a server's whole process group."""

import signal
import subprocess
import sys
import time

from ftpipe.processes import stop_group

# A parent and the child it started, like a server and its worker: both in the parent's new session.
SERVER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def start() -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True, start_new_session=True)
    return proc, int(proc.stdout.readline())


# The tests stop servers with SIGTERM, not SIGINT: a shell starts background jobs with SIGINT
# ignored, and their children inherit that, so a SIGINT would wait out every timeout there.
def test_signal_reaches_the_forked_child_too():
    proc, child = start()
    stop_group(proc, signal.SIGTERM, timeout=10)
    assert proc.returncode is not None
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)


def test_a_group_that_ignores_the_signal_is_killed_after_the_timeout():
    ignoring = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + SERVER
    proc = subprocess.Popen([sys.executable, "-c", ignoring], stdout=subprocess.PIPE, text=True, start_new_session=True)
    proc.stdout.readline()
    started = time.monotonic()
    stop_group(proc, signal.SIGTERM, timeout=1)
    assert proc.returncode == -signal.SIGKILL and time.monotonic() - started < 10
