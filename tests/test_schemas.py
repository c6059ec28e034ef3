"""The JSON reports are written and read through one typed model each (ftpipe/schemas.py)."""

from __future__ import annotations

import json

import pytest
from conftest import stage

from ftpipe import paths
from ftpipe.errors import PipelineError
from ftpipe.schemas import DataReport, MetricsReport, RegistrationReport, TrainReport

MODELS = {paths.TRAIN_REPORT: TrainReport, paths.DATA_REPORT: DataReport, paths.METRICS: MetricsReport,
          paths.REGISTRATION: RegistrationReport}


def test_every_report_of_a_run_reads_back_through_its_model(built_project):
    for path, model in MODELS.items():
        raw = json.loads((built_project / path).read_text())
        report = model.read(built_project / path)
        assert report.model_dump(mode="json") == raw, path  # every key known, none lost


@pytest.mark.parametrize("path,key", [(paths.TRAIN_REPORT, "val_loss_best"), (paths.METRICS, "finetuned"),
                                      (paths.DATA_REPORT, "splits")])
def test_a_renamed_key_stops_the_reader_with_one_line_naming_file_and_key(finished_project, path, key):
    file = finished_project / path
    report = json.loads(file.read_text())
    report[key + "_renamed"] = report.pop(key)
    file.write_text(json.dumps(report))
    with pytest.raises(PipelineError, match=rf"{path}: {key}: field required"):
        MODELS[path].read(file)
    # The stage that reads it says the same in one line, before it touches the registry.
    result = stage(finished_project, "register")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {path}: {key}: field required"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_report_written_by_other_code_is_not_half_read(tmp_path):
    file = tmp_path / "train.json"
    file.write_text(json.dumps({"steps": "six"}))
    with pytest.raises(PipelineError, match=r"train.json: .* problem\(s\)"):
        TrainReport.read(file)
    with pytest.raises(PipelineError, match="not found"):
        TrainReport.read(tmp_path / "missing.json")
