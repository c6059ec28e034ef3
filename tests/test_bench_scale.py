"""The scale benchmark and the GPU check's whole-pipeline run, checked on the CPU with a small
random-weight model (`--device cpu`), so that they are known to work before a GPU is lent."""

from __future__ import annotations

import json

import pytest

from bench import gpu_check
from bench.bench_scale import STAGES


@pytest.mark.slow  # a whole pipeline run
def test_the_gpu_checks_pipeline_run_works_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the check sets it; undone after the test
    gpu_check.main(["--out", str(tmp_path / "out"), "--pipeline", "tiny", "--device", "cpu",
                    "--work", str(tmp_path / "work")])
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    run = result["pipeline"]["tiny"]
    assert list(run["stages"]) == list(STAGES)
    for stage, row in run["stages"].items():
        assert row["seconds"] > 0 and row["peak_rss_mb"] > 0, stage
    # Where each model-running stage says it ran: the CPU, as asked.
    assert run["stages"]["train"]["device"].startswith("cpu ")
    assert run["stages"]["evaluate"]["device"].startswith("cpu ")
    assert run["stages"]["export"]["device"].startswith("cpu ")
    disk = run["disk_bytes"]
    assert disk["models"] > run["bf16_bytes"] and disk["mlflow"] > 0
    # DVC's cache links the outputs: the models are not held a second time there.
    assert disk["dvc_cache"] < run["bf16_bytes"] / 2
    assert run["disk_x_bf16"] == round(disk["total"] / run["bf16_bytes"], 2)
