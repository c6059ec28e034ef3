"""The tests that read the session's one `python -m flows.pipeline` run (conftest's `flow_run`), in one
module so that xdist gives them one worker and one run."""

from __future__ import annotations

import re

from conftest import dvc, ran

from flows.common import STAGES

# What a normal offline run must not print: a telemetry ERROR, a library FutureWarning, the
# bitsandbytes kernel-download notice.
NOISE = ("ERROR", "FutureWarning", "gemm_4bit_forward")


def test_prefect_flow_leaves_the_same_lock_as_dvc_repro(flow_run):
    project, printed = flow_run
    assert set(re.findall(r"stage ([a-z_]+) done in", printed)) == set(STAGES)
    assert "| rougeL |" in printed and "perplexity (lower is better)" in printed
    assert "Registered models:/tiny-model/1 as challenger" in printed
    assert re.search(r"Promotion gate on rougeL: [+-]\d\.\d{4} rougeL, 95 % CI \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\] "
                     r"over base; no champion yet: kept as challenger", printed), printed
    assert f"--backend-store-uri sqlite:///{project / 'mlruns.db'} --host 127.0.0.1" in printed
    lock = (project / "dvc.lock").read_text()
    status = dvc(project, "status")
    assert status.returncode == 0 and "up to date" in status.stdout
    again = dvc(project, "repro")
    assert again.returncode == 0 and ran(again.stdout) == set()
    assert (project / "dvc.lock").read_text() == lock


def test_offline_pipeline_run_prints_no_false_alarms(flow_run):
    """The whole flow (every stage runs: quantize and train included) on a machine with no internet,
    under Prefect's temporary local server (the session's `flow_run`)."""
    _, output = flow_run
    noisy = [line for line in output.splitlines() if any(word in line for word in NOISE)]
    assert not noisy, "\n".join(noisy)
