"""Validate the whole of params.yaml before any stage runs.

Every other stage depends on this stage's output, so `dvc repro` (any target) runs it first
whenever params.yaml changes, and a bad value, a mistyped key or section, or a data path DVC
cannot track stops the run here, before DVC touches any stage's outputs. Its output holds no
values, only which sections passed, so a valid change of a value reruns nothing downstream by itself.
Reads params.yaml; writes reports/validated.json.
Run: python -m stages.validate
"""

from __future__ import annotations

from pathlib import Path

from ftpipe.checks import check_params
from ftpipe.errors import run_cli
from ftpipe.io import write_json
from ftpipe.params import PARAMS_FILE
from ftpipe.paths import VALIDATED


def run(*, params_file: Path, project_dir: Path) -> dict[str, object]:
    return {"params_file": str(params_file), "sections": check_params(params_file, project_dir)}


def main() -> None:
    write_json(VALIDATED, run(params_file=PARAMS_FILE, project_dir=Path(".")))
    print(f"validate: {PARAMS_FILE} is valid")


if __name__ == "__main__":
    run_cli(main)
