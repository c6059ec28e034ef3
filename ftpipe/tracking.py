"""MLflow location and lineage: where runs go, and what exactly produced a model.

Tracking defaults to a sqlite database and an artifact folder inside the project, so the pipeline
and the MLflow UI work offline; MLFLOW_TRACKING_URI overrides. The project is the one DVC names
(DVC_ROOT): an experiment that DVC runs in a temporary workspace records in the project that queued
it, not in the throw-away folder. A store copied with its project (a second checkout, a moved
folder) is pointed at the copy's own artifact folder before use, so the copy never writes into the
original's. Credentials that a URI may carry are never printed or logged.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from ftpipe import credentials, paths

DB_FILE = "mlruns.db"
ARTIFACT_DIR = "mlartifacts"
# Retries 2 with backoff factor 1 (sleeps 0 s, 2 s, plus up to 0.5 s jitter): a refused connection
# fails in ~3 s; a silent host (3 tries x 10 s timeout) in ~33 s. The timeout also bounds the wait
# for the server's answer to an artifact upload: raise MLFLOW_HTTP_REQUEST_TIMEOUT for a slow store.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def project_root(cwd: Path = Path(".")) -> Path:
    """The project a stage records for: `cwd`, unless it is one of DVC's temporary experiment
    workspaces (<project>/.dvc/tmp/exps/...), whose project DVC names in DVC_ROOT. A DVC_ROOT that
    does not contain `cwd` that way (left in a shell, inherited from another project's run) is ignored."""
    here = Path(cwd).resolve()
    root = os.environ.get("DVC_ROOT")
    if root and (Path(root) / ".dvc").is_dir():
        root_path = Path(root).resolve()
        if here == root_path or (root_path / ".dvc" / "tmp" / "exps") in here.parents:
            return root_path
    return here


def tracking_uri(project_dir: Path) -> str:
    """The store's URI. Every reader and writer of the project's store asks here, so this is where a
    copied project's store is made its own (`own_store`)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    own_store(Path(project_dir).resolve())
    return f"sqlite:///{Path(project_dir).resolve() / DB_FILE}"


def own_store(project_dir: Path) -> None:
    """Point a local store's artifact locations at this project's folder when they name another
    project's (the store was copied or moved with its project): MLflow records absolute locations,
    so a copy would otherwise log and register into the original's folder without a word. A copy
    without its artifact folder is refused: its models would be missing."""
    from ftpipe.errors import PipelineError

    db, mine = project_dir / DB_FILE, project_dir / ARTIFACT_DIR
    if not db.is_file():
        return
    with contextlib.closing(sqlite3.connect(db)) as con:
        try:
            locations = [row[0] for row in con.execute("SELECT artifact_location FROM experiments")]
        except sqlite3.DatabaseError:
            return  # not a store MLflow has set up yet: MLflow says what is wrong when it opens it
        # Stored as Path.as_uri() wrote it (percent-encoded): compared decoded, replaced as stored.
        foreign = sorted({loc for loc in locations if loc and loc.startswith("file:///")
                          and _uri_path(loc).name == ARTIFACT_DIR and _uri_path(loc) != mine
                          and _looks_like_project(_uri_path(loc).parent)})
        if not foreign:
            return
        if not mine.is_dir():
            raise PipelineError(f"{db}: its runs' artifacts are in {_uri_path(foreign[0])}, and this project "
                                f"({project_dir}) has no {ARTIFACT_DIR}/: copy that folder here too")
        tables = [row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        with con:
            for old in foreign:
                for table in tables:
                    for column in [c[1] for c in con.execute(f'PRAGMA table_info("{table}")') if c[2].upper()
                                   in ("TEXT", "VARCHAR") or c[2].upper().startswith("VARCHAR")]:
                        for before, after in ((old, mine.as_uri()), (str(_uri_path(old)), str(mine))):
                            con.execute(f'UPDATE "{table}" SET "{column}" = ? || substr("{column}", ?) '
                                        f'WHERE substr("{column}", 1, ?) = ? AND (length("{column}") = ? OR '
                                        f'substr("{column}", ?, 1) = \'/\')',
                                        (after, len(before) + 1, len(before), before, len(before), len(before) + 1))
    print(f"warning: {db} recorded its artifacts in {', '.join(str(_uri_path(f)) for f in foreign)} (another "
          f"copy of this project): now in {mine}", file=sys.stderr)


def artifact_location(project_dir: Path) -> str | None:
    """Where a new experiment keeps its artifacts: the project's folder beside a local store; None for a
    tracking server, which decides (its --artifacts-destination, proxied: clients need no store settings)."""
    if os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):  # tracking_uri's own test,
        return None  # without opening the store a second time
    return (Path(project_dir).resolve() / ARTIFACT_DIR).as_uri()


def _uri_path(uri: str) -> Path:
    from urllib.parse import unquote, urlsplit

    return Path(unquote(urlsplit(uri).path))


def _looks_like_project(folder: Path) -> bool:
    """A folder a project's store once lived in, or that is gone (a moved project): not a shared
    artifact root that happens to be named like ours."""
    return not folder.exists() or (folder / DB_FILE).is_file() or (folder / ".dvc").is_dir()


def redact(uri: str) -> str:
    """The URI (or any text) with its credentials masked: ftpipe.credentials.redact."""
    return credentials.redact(uri)


def bound_http_retries() -> None:
    """Default MLflow's HTTP retries and timeouts to fail in about 30 s when the server is down.
    MLflow's own defaults (7 retries, backoff factor 2, 120 s timeout) take minutes to give up;
    its HTTP layer is the one place that retries registry requests (the flows do not rerun
    register), so it is bounded here. Values already in the environment win."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def ui_command(project_dir: Path) -> str:
    uri = tracking_uri(project_dir)
    if uri.startswith(("http://", "https://")):
        return f"open {redact(uri)}"
    return f".venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def git_commit(project_dir: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_dir, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project_dir,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "none"
    return out.stdout.strip() + ("-dirty" if dirty else "")


def dvc_lock_hashes(project_dir: Path) -> dict[str, str]:
    """{"<stage>:<out path>": md5} for every output recorded in dvc.lock."""
    lock = Path(project_dir) / paths.DVC_LOCK
    if not lock.is_file():
        return {}
    data = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    hashes = {}
    for stage, entry in (data.get("stages") or {}).items():
        for out in entry.get("outs") or []:
            hashes[f"{stage}:{out['path']}"] = out.get("md5", "")
    return hashes


def lineage(project_dir: Path, *, method: str) -> dict[str, str]:
    """Tags that say what produced a model: code commit, data and base model hashes, method."""
    hashes = dvc_lock_hashes(project_dir)
    pick = lambda prefix: next((v for k, v in hashes.items() if k.startswith(prefix)), "unknown")  # noqa: E731
    return {
        "git_commit": git_commit(project_dir),
        "data_md5": pick(f"prepare_data:{paths.PREPARED_DIR}"),
        "base_model_md5": pick(f"prepare_base:{paths.BASE_DIR}"),
        "adapter_md5": pick(f"train:{paths.ADAPTER_DIR}"),
        "dpo_md5": pick(f"dpo:{paths.DPO_DIR}"),
        "method": method,
    }


def experiment() -> dict[str, str]:
    """Tags naming the DVC experiment a stage runs in (`dvc exp run`, queued or not); {} outside one."""
    names = {"dvc_experiment": "DVC_EXP_NAME", "dvc_baseline_rev": "DVC_EXP_BASELINE_REV"}
    return {tag: os.environ[var] for tag, var in names.items() if os.environ.get(var)}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
