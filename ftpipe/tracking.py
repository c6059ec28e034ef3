"""MLflow location and lineage: where runs go, and what exactly produced a model.

Tracking defaults to a sqlite database and an artifact folder inside the project, so the pipeline
and the MLflow UI work offline; MLFLOW_TRACKING_URI overrides. Credentials that a URI may carry
are never printed or logged.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

DB_FILE = "mlruns.db"
ARTIFACT_DIR = "mlartifacts"


def tracking_uri(project_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(project_dir).resolve() / DB_FILE}"


def artifact_location(project_dir: Path) -> str:
    return (Path(project_dir).resolve() / ARTIFACT_DIR).as_uri()


def redact(uri: str) -> str:
    """The URI without any user:password part."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


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
    lock = Path(project_dir) / "dvc.lock"
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
        "data_md5": pick("prepare_data:data/prepared"),
        "base_model_md5": pick("prepare_base:models/base"),
        "adapter_md5": pick("train:models/adapter"),
        "method": method,
    }


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
