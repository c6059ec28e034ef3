"""Screenshot of MLflow's compare-runs view of the latest pipeline run's candidate models.

Starts `mlflow server` on 127.0.0.1 and a free port over the project's tracking store (sqlite
mlruns.db + mlartifacts/ unless MLFLOW_TRACKING_URI says otherwise), finds the newest run tagged
role=pipeline, opens the compare view of its children tagged role=candidate (base, fewshot when
present, finetuned) in headless Chromium, waits until the metrics table is rendered, saves a PNG
and stops the server, also on error. Needs Debian's chromium (/usr/bin/chromium) and the
`playwright` package (test extra); it never downloads a browser.
Run: python -m scripts.mlflow_screenshot [--project .] [--out docs/mlflow_compare.png]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ftpipe.errors import PipelineError, run_cli
from ftpipe.processes import stop_group

CHROMIUM = "/usr/bin/chromium"
# Headless and offline: no GPU, no QUIC, no update/sync/background traffic from the browser itself.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CANDIDATE_ORDER = ("base", "fewshot", "finetuned")
# What the compare page must show before the shot is taken: the metrics the pipeline compares on.
METRICS_SHOWN = ("bleu", "rougeL", "perplexity")
SERVER_START_S = 120  # first start migrates the sqlite schema; slow on a loaded 2-core machine
PAGE_TIMEOUT_MS = 90_000
SETTLE_MS = 2_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mlflow_server(tracking_uri: str, artifacts_uri: str) -> Iterator[str]:
    """A local MLflow server over `tracking_uri`; yields its base URL, stops it on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", tracking_uri, "--default-artifact-root", artifacts_uri,
           "--artifacts-destination", artifacts_uri]
    url = f"http://127.0.0.1:{port}"
    # MLflow's job runner (GenAI judges, prompt optimization: unused here) would fork eight more
    # processes, about 1 GB and a share of the CPU together: off unless the environment turns it on.
    jobs = os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": jobs}
    # The log goes to a file, not a pipe: nobody reads it while the page runs, and a full pipe would
    # block the server. Own process group: the server forks uvicorn workers, and all must go at the end.
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        try:
            _wait_healthy(server, url, log)
            yield url
        finally:
            stop_group(server)


def _wait_healthy(server: subprocess.Popen, url: str, log) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            tail = (log.read().strip().splitlines() or ["no output"])[-1]
            raise PipelineError(f"mlflow server exited with code {server.returncode}: {tail}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise PipelineError(f"mlflow server did not answer on {url} within {SERVER_START_S} s")


def latest_candidates(tracking_uri: str, experiment: str) -> tuple[str, list[Any]]:
    """(experiment id, candidate runs of the newest pipeline run, base first and finetuned last)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise PipelineError(f"register.experiment: no MLflow experiment named '{experiment}' (run the pipeline first)")
    pipelines = client.search_runs([found.experiment_id], "tags.role = 'pipeline'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
    if not pipelines:
        raise PipelineError(f"register.experiment: experiment '{experiment}' holds no pipeline run")
    parent = pipelines[0].info.run_id
    runs = client.search_runs([found.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent}' and tags.role = 'candidate'")
    rank = {name: i for i, name in enumerate(CANDIDATE_ORDER)}
    runs.sort(key=lambda r: (rank.get(r.data.tags.get("candidate"), len(rank)), r.info.run_name))
    names = {r.data.tags.get("candidate") for r in runs}
    if not {"base", "finetuned"} <= names:
        raise PipelineError(f"pipeline run {parent}: needs base and finetuned candidate runs, found {sorted(names)}")
    return found.experiment_id, runs


def compare_url(base_url: str, experiment_id: str, run_ids: list[str]) -> str:
    # The UI's own link (Routes.getCompareRunPageRoute in mlflow 3.17's bundle): a hash route whose
    # query holds JSON lists of run and experiment ids.
    runs, experiments = json.dumps(run_ids), json.dumps([experiment_id])
    return f"{base_url}/#/compare-runs?runs={quote(runs)}&experiments={quote(experiments)}"


def screenshot(url: str, out: Path, *, width: int, height: int) -> str:
    """Open `url` in headless Chromium, wait for the metrics table, save a PNG of the view; returns the page text."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        raise PipelineError(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            # Not "networkidle": the UI keeps polling; the metric names below are what we wait for.
            page.goto(url, wait_until="load")
            for metric in METRICS_SHOWN:
                # exact: "rougeL" must not be satisfied by "rougeLsum"
                page.get_by_text(metric, exact=True).first.wait_for(state="visible")
            _make_room(page)
            page.get_by_text(METRICS_SHOWN[-1], exact=True).first.scroll_into_view_if_needed()
            page.wait_for_timeout(SETTLE_MS)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp.png")
            # The page scrolls inside its own panel, so a "full page" shot would still be one viewport.
            page.screenshot(path=str(tmp))
            tmp.replace(out)  # no half-written PNG if the browser dies mid-shot
            return page.inner_text("body")
        finally:
            browser.close()


def _make_room(page) -> None:
    """Close the assistant side panel and fold the charts, so run names and metrics share one view."""
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.count():
        close.first.click()
    charts = page.locator('[role="button"][aria-expanded="true"]', has_text="Visualizations")
    if charts.count():
        charts.first.click()
        page.locator('[role="button"][aria-expanded="false"]', has_text="Visualizations").first.wait_for()


def run(*, project_dir: Path, out: Path, experiment: str, width: int = 1600, height: int = 1200) -> dict[str, Any]:
    """Screenshot the compare view of the newest pipeline run's candidates; returns what was shown."""
    from ftpipe import tracking

    uri = tracking.tracking_uri(project_dir)
    experiment_id, runs = latest_candidates(uri, experiment)
    run_ids = [r.info.run_id for r in runs]
    if uri.startswith(("http://", "https://")):  # a running tracking server already serves the UI
        url = compare_url(uri.rstrip("/"), experiment_id, run_ids)
        text = screenshot(url, out, width=width, height=height)
    else:
        with mlflow_server(uri, tracking.artifact_location(project_dir)) as base_url:
            url = compare_url(base_url, experiment_id, run_ids)
            text = screenshot(url, out, width=width, height=height)
    return {"path": str(out), "url": url, "runs": {r.data.tags["candidate"]: r.info.run_id for r in runs},
            "metrics_shown": [m for m in METRICS_SHOWN if m in text], "text": text}


def main() -> None:
    from ftpipe.params import RegisterParams, load_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("."), help="project folder (params.yaml, mlruns.db)")
    parser.add_argument("--out", type=Path, default=Path("docs/mlflow_compare.png"))
    parser.add_argument("--experiment", help="MLflow experiment (default: register.experiment in params.yaml)")
    parser.add_argument("--width", type=int, default=1600, help="browser viewport width in pixels")
    parser.add_argument("--height", type=int, default=1200, help="browser viewport height in pixels")
    args = parser.parse_args()
    experiment = args.experiment or load_section("register", RegisterParams, args.project / "params.yaml").experiment
    result = run(project_dir=args.project, out=args.out, experiment=experiment, width=args.width, height=args.height)
    runs = ", ".join(f"{name} {run_id[:8]}" for name, run_id in result["runs"].items())
    print(f"mlflow_screenshot: {result['path']}: runs {runs}; metrics shown: {', '.join(result['metrics_shown'])}")


if __name__ == "__main__":
    run_cli(main)
