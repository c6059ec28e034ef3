"""The whole-project params check that runs before any stage (the validate stage, and both flows)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ftpipe.params import validate_all
from ftpipe.sources import check_data_location, check_under_raw


def check_params(params_file: Path, project_dir: Path) -> list[str]:
    """Validate every section of `params_file` and that data paths stay where DVC hashes them;
    return the sections checked. Raises PipelineError naming the file, line and key."""
    from ftpipe.choices import BUILTIN_METRICS, load_scorer
    from ftpipe.errors import PipelineError

    sections = validate_all(params_file)
    for spec in sections["evaluate"].metrics:
        if spec not in BUILTIN_METRICS:
            try:  # a scorer that cannot be imported fails here, not after the training minutes
                with _importable(project_dir):
                    load_scorer(spec)
            except PipelineError as exc:
                raise PipelineError(f"{params_file}: {exc}") from None
    check_data_location(sections["prepare_data"], project_dir)
    prefs = sections["prepare_prefs"]
    if sections["dpo"].enabled and prefs.source == "file":
        check_under_raw("prepare_prefs.path", prefs.path, project_dir)
    return sorted(sections)


@contextlib.contextmanager
def _importable(project_dir: Path):
    """The project's folder on sys.path, as it is for a stage run from it (`python -m stages...`)."""
    import sys

    entry = str(Path(project_dir).resolve())
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added:
            sys.path.remove(entry)
