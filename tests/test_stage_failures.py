"""Stages run as processes (as DVC runs them) on a broken input: exit 2 with one `error:` line that
names the file and line, no traceback, and every previous output left as it was."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import set_param, stage
from test_faults import error_lines, outputs


def broken_line(path: Path, number: int) -> None:
    """Line `number` of a JSONL file cut in half, as a crashed writer or a hand edit leaves it."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[number - 1] = lines[number - 1][: len(lines[number - 1]) // 2] + "\n"
    path.write_text("".join(lines), encoding="utf-8")


def fails_cleanly(proj: Path, name: str, pattern: str) -> None:
    before = outputs(proj)
    result = stage(proj, name)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and re.fullmatch(pattern, errors[0]), errors or result.stderr[-3000:]
    assert outputs(proj) == before  # nothing written, nothing half-written


def test_evaluate_on_a_broken_test_split(finished_project):
    broken_line(finished_project / "data" / "prepared" / "test.jsonl", 2)
    fails_cleanly(finished_project, "evaluate", r"error: data/prepared/test\.jsonl:2: invalid JSON \(.+\)")


def test_quantize_on_a_broken_validation_split(finished_project):
    broken_line(finished_project / "data" / "prepared" / "val.jsonl", 1)
    fails_cleanly(finished_project, "quantize", r"error: data/prepared/val\.jsonl:1: invalid JSON \(.+\)")


def test_export_of_a_merged_model_with_a_broken_config(finished_project):
    config = finished_project / "models" / "adapter" / "merged" / "config.json"
    config.unlink()  # DVC links outputs from its cache: write a new file, not into the cached one
    config.write_text('{"model_type": "llama", "hidden_size": ')
    fails_cleanly(finished_project, "export", r"error: .*models/adapter/merged/config\.json.*")


def test_dpo_on_a_broken_preference_file(finished_project):
    proj = finished_project
    set_param(proj, "dpo", "enabled", True)
    prefs = proj / "data" / "preferences"
    # The pairs as prepare_prefs writes them, the training file with a line cut in half.
    manifest = json.loads((prefs / "manifest.json").read_text())
    assert manifest["enabled"] is False
    (prefs / "manifest.json").unlink()
    (prefs / "manifest.json").write_text(json.dumps({**manifest, "enabled": True, "source": "file"}))
    pair = {"id": "p-0", "prompt": [{"role": "user", "content": "say red"}], "chosen": "red", "rejected": "blue"}
    for split in ("train", "val", "test"):
        (prefs / f"{split}.jsonl").write_text(json.dumps(pair) + "\n" + json.dumps({**pair, "id": "p-1"}) + "\n")
    broken_line(prefs / "train.jsonl", 2)
    fails_cleanly(proj, "dpo", r"error: data/preferences/train\.jsonl:2: invalid JSON \(.+\)")


def test_a_python_without_the_projects_packages_is_one_line_naming_the_interpreter(finished_project):
    """`dvc exp run` started outside the environment runs the stages with another `python`: here one
    whose transformers cannot be imported."""
    import subprocess
    import sys

    from conftest import stage_env

    before = outputs(finished_project)
    blocked = ("import runpy, sys; sys.modules['transformers'] = None; "
               "runpy.run_module('stages.train', run_name='__main__', alter_sys=True)")
    result = subprocess.run([sys.executable, "-c", blocked], cwd=finished_project, env=stage_env(),
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert error_lines(result.stderr) == [
        f"error: {sys.executable} cannot import transformers: run the stages in the project's environment "
        "(`. .venv/bin/activate` before `dvc`, or `make run`)"]
    assert outputs(finished_project) == before
