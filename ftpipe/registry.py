"""Reading the MLflow model registry, for the register stage and the retraining flow.

Only "no such registered model or alias" means "no champion yet". Any other failure (the server
down or failing, the champion's run deleted or garbage-collected) is a one-line PipelineError
naming the server (credentials masked) and the model: a gate that cannot read the champion must
stop, not promote past it. Requests go through MLflow's HTTP layer, whose retries are bounded by
ftpipe.tracking.bound_http_retries.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ftpipe import tracking
from ftpipe.credentials import redact
from ftpipe.errors import PipelineError

CHAMPION = "champion"
REASON_CHARS = 200
# The short cause inside MLflow's long "API request to <url> failed with exception ..." messages.
_REASONS = (r"\[Errno -?\d+\] ([^'\"()\]]+)", r"(Read timed out|timed out)", r"(too many \d+ error responses)",
            r"(error code \d+ != 200)")
# A server that did not answer (as opposed to one that answered that something is missing).
_UNREACHABLE = r"API request to .* failed|Max retries exceeded|timed out|Connection (refused|reset|aborted)"
# Error codes of a server that answered and refused (a 401/403 from an auth proxy, a bad value).
_REFUSALS = ("PERMISSION_DENIED", "UNAUTHENTICATED", "BAD_REQUEST", "INVALID_PARAMETER_VALUE",
             "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE")


class RegistryUnreachable(PipelineError):
    """The tracking server did not answer or failed (after MLflow's own HTTP retries). A caller
    whose request is idempotent (a read) may retry later; the champion's run being gone is not this."""


def connect(tracking_uri: str):
    """An MlflowClient for `tracking_uri`, with MLflow's HTTP retries bounded."""
    from mlflow import MlflowClient

    tracking.bound_http_retries()
    return MlflowClient(tracking_uri=tracking_uri)


def short_reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    for pattern in _REASONS:
        if found := re.search(pattern, text):
            return redact(found.group(1).strip())
    return redact(text)[:REASON_CHARS] or type(exc).__name__


def failure(tracking_uri: str, exc: BaseException, doing: str = "") -> str:
    reason = f"{doing}: {short_reason(exc)}" if doing else short_reason(exc)
    return f"MLflow tracking server {redact(tracking_uri)} unreachable or failing ({reason})"


@contextlib.contextmanager
def errors(tracking_uri: str, doing: str = "") -> Iterator[None]:
    """Turn MLflow and HTTP failures inside the block into one PipelineError line naming the server."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, requests.exceptions.RequestException) as exc:
        if unreachable(exc):
            raise RegistryUnreachable(failure(tracking_uri, exc, doing)) from None  # its cause quotes the raw URI
        # The store answered and said no (a bad value, a missing entity): that is not a server fault.
        raise PipelineError(f"MLflow tracking store {redact(tracking_uri)} refused "
                            f"{doing or 'the request'}: {short_reason(exc)}") from None


def unreachable(exc: BaseException) -> bool:
    """Whether a failure is the server not answering or failing (a retry may help), not a refusal."""
    import requests

    if isinstance(exc, requests.exceptions.RequestException):
        if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                            requests.exceptions.InvalidSchema)):
            return False  # a malformed URI: the user's to fix, not an outage
        response = getattr(exc, "response", None)
        return response is None or response.status_code >= 500
    code = getattr(exc, "error_code", "")
    if code in _REFUSALS:  # the server answered: no, not allowed, no such thing
        return False
    return re.search(_UNREACHABLE, str(exc)) is not None  # a request that got no answer, or a 5xx


def _not_found(exc) -> bool:
    """The registered model or its alias does not exist (the stores say the latter with
    INVALID_PARAMETER_VALUE and "Registered model alias X not found.")."""
    code = getattr(exc, "error_code", "")
    return code == "RESOURCE_DOES_NOT_EXIST" or (
        code == "INVALID_PARAMETER_VALUE" and re.search(r"alias \S+ not found", str(exc)) is not None)


def champion(client, model_name: str) -> tuple[str, dict[str, float]] | None:
    """(version, metrics of its run) of `model_name`@champion; None if the model or alias does not exist."""
    from mlflow.exceptions import MlflowException

    uri = client.tracking_uri
    with errors(uri, f"reading {model_name}@{CHAMPION}"):
        try:
            current = client.get_model_version_by_alias(model_name, CHAMPION)
        except MlflowException as exc:
            if _not_found(exc):
                return None
            raise
    return str(current.version), _run_metrics(client, model_name, current)


def _run_metrics(client, model_name: str, version) -> dict[str, float]:
    """The champion's run metrics; a run that is gone stops the gate, which would compare against nothing."""
    from mlflow.exceptions import MlflowException

    where = (f"MLflow registry {redact(client.tracking_uri)}: {model_name} {CHAMPION} v{version.version}: "
             f"its run {version.run_id or '(none)'}")
    advice = "restore the run or move the alias by hand"
    if not version.run_id:
        raise PipelineError(f"{where} is not recorded, so its metrics cannot be compared; {advice}")
    with errors(client.tracking_uri, f"reading the run of {model_name} v{version.version}"):
        try:
            run = client.get_run(version.run_id)
        except MlflowException as exc:
            if not _not_found(exc):
                raise
            raise PipelineError(f"{where} no longer exists (garbage-collected?); {advice}") from None
    if run.info.lifecycle_stage != "active":
        raise PipelineError(f"{where} is {run.info.lifecycle_stage}, so its metrics cannot be trusted; {advice}")
    return dict(run.data.metrics)


def version_tags(client, model_name: str, version: str) -> dict[str, str]:
    """The tags of `model_name` version `version` (its lineage among them)."""
    with errors(client.tracking_uri, f"reading the tags of {model_name} v{version}"):
        return dict(client.get_model_version(model_name, version).tags)


def version_run(client, model_name: str, version: str) -> str | None:
    """The run id a registered version was logged from."""
    with errors(client.tracking_uri, f"reading {model_name} v{version}"):
        return client.get_model_version(model_name, version).run_id or None


def download_run_file(client, run_id: str | None, artifact_path: str, dst: Path) -> Path | None:
    """A file logged with run `run_id` (a registered version's, `version_run`), downloaded under
    `dst`; None if there is no run or it holds no such file (registered before the file was logged)."""
    if run_id is None:
        return None
    folder = str(Path(artifact_path).parent)
    with errors(client.tracking_uri, f"downloading {artifact_path} of run {run_id}"):
        if artifact_path not in {f.path for f in client.list_artifacts(run_id, folder)}:
            return None
        return Path(client.download_artifacts(run_id, artifact_path, str(dst)))


def load_model(client, model_name: str, version: str, purpose: str = "score it again"):
    """(model, tokenizer) of a registered transformers model version, as register logged it, to score
    it again. A model that cannot be loaded stops the gate, which would otherwise compare against nothing."""
    import tempfile

    import mlflow.pyfunc
    import mlflow.transformers
    import requests
    from mlflow.exceptions import MlflowException

    uri = f"models:/{model_name}/{version}"
    where = f"MLflow registry {redact(client.tracking_uri)}: {model_name} {CHAMPION} v{version}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if "transformers" in _flavors(uri):
                components = mlflow.transformers.load_model(uri, dst_path=tmp, return_type="components")
            else:  # a bottleneck-adapter version (ftpipe.bottleneck_model): its pyfunc loads both parts
                loaded = mlflow.pyfunc.load_model(uri, dst_path=tmp).unwrap_python_model()
                components = {"model": loaded.model, "tokenizer": loaded.tokenizer}
    except (MlflowException, requests.exceptions.RequestException, OSError, ValueError, KeyError) as exc:
        if isinstance(exc, requests.exceptions.RequestException) or re.search(_UNREACHABLE, str(exc)):
            raise RegistryUnreachable(failure(client.tracking_uri, exc, f"loading {uri}")) from None
        # The registry answered (the champion was just read): its files are gone or not a transformers model.
        raise PipelineError(f"{where}: cannot load its model to {purpose} ({short_reason(exc)}); "
                            "restore it or move the alias by hand") from None
    model, tokenizer = components["model"], components.get("tokenizer")
    if tokenizer is None:
        raise PipelineError(f"{where}: its model was logged without a tokenizer, so it cannot be scored again; "
                            "move the alias by hand")
    if tokenizer.pad_token is None:  # as ftpipe.models.load_tokenizer: batched generation pads
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _flavors(uri: str) -> set[str]:
    """The flavours a version was logged with; where its MLmodel cannot be read, the transformers
    loader is tried and says what is wrong (a missing model file, an unreachable store)."""
    import mlflow.models
    from mlflow.exceptions import MlflowException

    try:
        return set(mlflow.models.get_model_info(uri).flavors)
    except (MlflowException, OSError):
        return {"transformers"}


def latest_version(client, model_name: str, tag_keys: Iterable[str]) -> dict[str, Any] | None:
    """{"version", "tags": {key: value or None}} of the highest version of `model_name`; None if none."""
    with errors(client.tracking_uri, f"listing the versions of {model_name}"):
        versions = client.search_model_versions(f"name = '{model_name}'")
    latest = max(versions, key=lambda v: int(v.version), default=None)
    if latest is None:
        return None
    return {"version": str(latest.version), "tags": {key: latest.tags.get(key) for key in tag_keys}}
