"""Training curves in MLflow while the train and dpo stages train, from a background thread.

A LiveRun's daemon thread alone talks to MLflow (a run in `register.experiment`: the logged steps in batches,
system metrics every SAMPLE_S seconds), so a store that is down or slow never fails or slows training: the
first failure prints one warning line and the rest is dropped, and the end waits at most FLUSH_S. The run id
goes into the stage's report (null on any failure) and the register stage adopts that run.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import queue
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ftpipe import tracking

# At the end of training, the longest wait for queued values to reach the store and the run to end:
# a few seconds lose nothing on a healthy store, and a store that needs longer is one to give up on.
FLUSH_S = 5.0
SAMPLE_S = 10.0  # system metrics: MLflow's own default sampling interval
BATCH = 1000  # MLflow's limit of metrics in one log_batch request
STAGE_TAG = "ftpipe.stage"  # which stage logged a run while training ("train" or "dpo")
_END = object()  # queued by `finish`, with the status the run ends with


@dataclass(frozen=True)
class Target:
    """Where a stage's live run goes: `experiment` in the store of the project at `project_dir`."""

    project_dir: Path
    experiment: str


def target(enabled: bool, project_dir: Path = Path(".")) -> Target | None:
    """The live run's place for a stage whose `live_metrics` is `enabled`; None when it is off. The
    experiment is register's (`register.experiment`), so register finds the run and adopts it."""
    from ftpipe.params import RegisterParams, load_section

    if not enabled:
        return None
    return Target(tracking.project_root(project_dir), load_section("register", RegisterParams).experiment)


@contextlib.contextmanager
def session(where: Target | None, *, run_name: str) -> Iterator[LiveRun | None]:
    """A started LiveRun for the block (None when `where` is None), finished on the way out: its run
    ends FINISHED, or FAILED when the block raised. Its `run_id` is final after the block."""
    if where is None:
        yield None
        return
    live = LiveRun(where, run_name=run_name)
    live.start()
    failed = True
    try:
        yield live
        failed = False
    finally:
        live.finish(failed=failed)


class LiveRun:
    """One MLflow run fed from a queue by a daemon thread; every method returns at once but `finish`,
    which waits at most FLUSH_S. Nothing here raises into the caller."""

    def __init__(self, where: Target, *, run_name: str) -> None:
        self._where, self._run_name = where, run_name
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._failed = False
        self._ended = threading.Event()
        self._created_id: str | None = None
        self._uri: str | None = None  # known once the worker has resolved it
        self._closed = False

    @property
    def run_id(self) -> str | None:
        """The run's id once it ended with every value logged; None before that or after a failure."""
        return self._created_id if self._ended.is_set() and not self._failed else None

    def start(self) -> None:
        try:
            tracking.bound_http_retries()  # MLflow's own HTTP retries take minutes to give up
            threading.Thread(target=self._work, name="live-metrics", daemon=True).start()
        except Exception as exc:  # noqa: BLE001 - a logger never stops training
            self.fail(exc)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue `metrics` at `step` (timestamped now); dropped once the run failed or finished."""
        if metrics and not self._failed and not self._closed:
            self._queue.put((dict(metrics), step, int(time.time() * 1000)))

    def finish(self, *, failed: bool = False) -> None:
        """Wait at most FLUSH_S for the queued values and the end of the run (FAILED when training failed)."""
        if self._closed or self._failed:  # a failed run has nothing left to wait for
            self._closed = True
            return
        self._closed = True
        self._queue.put((_END, "FAILED" if failed else "FINISHED"))
        if not self._ended.wait(FLUSH_S):
            self.fail(TimeoutError(f"no answer within {FLUSH_S:.0f} s"))

    def fail(self, exc: BaseException) -> None:
        """Drop everything from now on; the first failure prints one line."""
        with self._lock:
            if self._failed:
                return
            self._failed = True
        store = self._uri or str(self._where.project_dir / tracking.DB_FILE)
        print(f"warning: live metrics off: MLflow tracking store {tracking.redact(store)} unreachable or failing "
              f"({_reason(exc)}); training goes on, and register logs the curves from reports/", file=sys.stderr,
              flush=True)

    # --- the worker thread: the only place that calls MLflow ---------------------------------------

    def _work(self) -> None:
        try:
            client, self._created_id = self._create()
            self._serve(client, self._created_id)
        except Exception as exc:  # noqa: BLE001 - any failure turns live logging off, never training
            self.fail(exc)
        finally:
            if self._failed:
                self._abandon()
            self._ended.set()

    def _abandon(self) -> None:
        """End a run that was created but will get nothing more (a store that answered late, or
        failed mid-run), so it does not show as running for ever; best effort, on this thread."""
        if self._created_id is None:
            return
        with contextlib.suppress(Exception):
            from mlflow import MlflowClient

            MlflowClient(self._uri).set_terminated(self._created_id, status="FAILED")

    def _create(self):
        """(client, id of a new run in the experiment): the project's store, resolved here because
        a local store is opened (and, if new, created) on first use, which takes seconds."""
        self._uri = tracking.tracking_uri(self._where.project_dir)
        from mlflow import MlflowClient
        from mlflow.tracking.context.registry import resolve_tags

        client = MlflowClient(self._uri)
        found = client.get_experiment_by_name(self._where.experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(
            self._where.experiment, artifact_location=tracking.artifact_location(self._where.project_dir))
        # The tags MLflow gives a run it starts itself (user, source, git commit), and the stage's.
        tags = resolve_tags({STAGE_TAG: self._run_name, **tracking.experiment()})
        run = client.create_run(experiment_id, run_name=self._run_name, tags=tags)
        return client, run.info.run_id

    def _serve(self, client, run_id: str) -> None:
        """Log what comes, sample the machine every SAMPLE_S, end the run at END."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # Used as a sampler (CPU, memory, disk, network; GPUs where pynvml is installed): its own
        # thread would call the store itself, outside this one's single failure path.
        # Its INFO lines ("Skip logging GPU metrics" on every machine without one) are noise in a training log.
        std_logging.getLogger(SystemMetricsMonitor.__module__).setLevel(std_logging.WARNING)
        monitor = SystemMetricsMonitor(run_id, sampling_interval=SAMPLE_S, tracking_uri=self._uri)
        _sample(monitor)  # CPU utilization is measured from one reading to the next: this is the first
        sample_step, next_sample = 0, time.monotonic() + SAMPLE_S
        while not self._failed:
            items = self._take(timeout=max(0.0, next_sample - time.monotonic()))
            end = next((item[1] for item in items if item[0] is _END), None)
            if end or time.monotonic() >= next_sample:  # and a last sample, so a short run has one too
                items.append((_sample(monitor), sample_step, int(time.time() * 1000)))
                sample_step, next_sample = sample_step + 1, time.monotonic() + SAMPLE_S
            self._send(client, run_id, [item for item in items if item[0] is not _END])
            if end:
                client.set_terminated(run_id, status=end)
                return

    def _take(self, timeout: float) -> list:
        """What is queued now, after waiting up to `timeout` for the first item."""
        try:
            items = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _send(self, client, run_id: str, items: list) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key, float(value), stamp, step) for values, step, stamp in items
                   for key, value in values.items()]
        for start in range(0, len(metrics), BATCH):
            if self._failed:
                return
            # Synchronous whatever MLFLOW_ENABLE_ASYNC_LOGGING says: a failure must surface here.
            client.log_batch(run_id, metrics=metrics[start:start + BATCH], synchronous=True)


def _sample(monitor) -> dict[str, float]:
    """One reading of the machine, named as MLflow's own monitor names it ("system/...")."""
    monitor.collect_metrics()
    values = {f"system/{key}": value for key, value in monitor.aggregate_metrics().items()}
    for each in monitor.monitors:
        each.clear_metrics()
    return values


def _reason(exc: BaseException) -> str:
    """The short cause in MLflow's long "API request to ... failed" messages (as
    ftpipe.registry.short_reason finds it; not imported, so that a registry change does not retrain)."""
    text = tracking.redact(" ".join(str(exc).split()))  # masked before it is cut: no half a secret
    found = re.search(r"\[Errno -?\d+\] ([^'\"()\]]+)|(Read timed out|timed out)", text)
    return (found.group(1) or found.group(2)).strip() if found else text[:200] or type(exc).__name__
