"""The tests that read the session's one `python -m flows.pipeline` run (conftest's `flow_run`, which
`built_project` is too): what it printed and the project it left, read-only."""

from __future__ import annotations

import json
import re
import subprocess

from conftest import dvc, ran

from flows.common import STAGES

# What a normal offline run must not print: a telemetry ERROR, a library FutureWarning, the
# bitsandbytes kernel-download notice.
NOISE = ("ERROR", "FutureWarning", "gemm_4bit_forward")


def test_prefect_flow_leaves_the_same_lock_as_dvc_repro(flow_run, finished_project):
    project, printed = flow_run
    assert set(re.findall(r"stage ([a-z_]+) done in", printed)) == set(STAGES)
    assert "| rougeL |" in printed and "perplexity (lower is better)" in printed
    assert "Registered models:/tiny-model/1 as challenger" in printed
    assert re.search(r"Promotion gate on rougeL: [+-]\d\.\d{4} rougeL, 95 % CI \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\] "
                     r"over base; no champion yet: kept as challenger", printed), printed
    assert f"--backend-store-uri sqlite:///{project / 'mlruns.db'} --host 127.0.0.1" in printed
    lock = (project / "dvc.lock").read_text()
    copy = finished_project  # DVC writes its state: the run is shared
    status = dvc(copy, "status")
    assert status.returncode == 0 and "up to date" in status.stdout
    again = dvc(copy, "repro")
    assert again.returncode == 0 and ran(again.stdout) == set()
    assert (copy / "dvc.lock").read_text() == lock


def test_offline_pipeline_run_prints_no_false_alarms(flow_run):
    """The whole flow (every stage runs: quantize and train included) on a machine with no internet,
    under Prefect's temporary local server (the session's `flow_run`)."""
    _, output = flow_run
    noisy = [line for line in output.splitlines() if any(word in line for word in NOISE)]
    assert not noisy, "\n".join(noisy)


def test_a_run_leaves_git_clean_registers_a_clean_commit_and_writes_its_summary(flow_run):
    """A fresh clone's first run changes no tracked file (DVC's .gitignore lines are committed), so
    the version it registers names a clean commit; its summary holds the run's own results."""
    import mlflow

    project, printed = flow_run
    # No optional locks: git would refresh the index of the shared run while another test copies it.
    porcelain = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain"], cwd=project, capture_output=True, text=True,
                               check=True).stdout.splitlines()
    # What the run adds: the lock to commit, and the reports (DVC outs with cache: false).
    assert set(porcelain) <= {"?? dvc.lock", "?? reports/"}, porcelain
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True,
                          check=True).stdout.strip()
    registration = json.loads((project / "reports" / "registration.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns.db'}")
    assert client.get_model_version("tiny-model", registration["version"]).tags["git_commit"] == head

    summary = (project / "reports" / "summary.md").read_text()
    assert f"Summary: {project / 'reports' / 'summary.md'}" in printed
    gate = re.search(r"Promotion gate on rougeL: (.+)", printed).group(1).strip()
    assert f"**Promotion gate on rougeL:** {gate}" in summary
    assert (project / "reports" / "comparison.md").read_text().split("\n\n")[0] in summary
    times = dict(re.findall(r"^\| ([a-z_]+) \| ([\d.]+) \|$", summary, flags=re.M))
    assert set(times) == {*STAGES, "total"}
    assert abs(float(times["total"]) - sum(float(times[s]) for s in STAGES)) <= 0.05 * len(STAGES)  # each rounded
    assert "torch " in summary and re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d", summary, flags=re.M)
