"""The whole-project params check that runs before any stage (the validate stage, and both flows)."""

from __future__ import annotations

from pathlib import Path

from ftpipe.params import validate_all
from ftpipe.sources import check_data_location, check_under_raw


def check_params(params_file: Path, project_dir: Path) -> list[str]:
    """Validate every section of `params_file` and that data paths stay where DVC hashes them;
    return the sections checked. Raises PipelineError naming the file, line and key."""
    sections = validate_all(params_file)
    check_data_location(sections["prepare_data"], project_dir)
    prefs = sections["prepare_prefs"]
    if sections["dpo"].enabled and prefs.source == "file":
        check_under_raw("prepare_prefs.path", prefs.path, project_dir)
    return sorted(sections)
