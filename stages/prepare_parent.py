"""The model a continual fine-tune starts from: the registered champion, materialized for DVC.

`train.init_from: base` writes only models/parent/manifest.json, saying so. `champion` writes the merged weights,
tokenizer, test split and trained-on prompt digests of <register.model_name>@champion (no champion yet: the
manifest says so). The registry is outside DVC: `dvc repro -f prepare_parent` (the retraining flow forces it)
picks up a champion that moved; a registry that cannot be read stops here with one line.
Reads params.yaml train.init_from, register.model_name, the MLflow registry; writes models/parent/.
Run: python -m stages.prepare_parent
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from ftpipe.errors import PipelineError, run_cli
from ftpipe.io import atomic_dir, write_json
from ftpipe.models import TRAINED_ON_ARTIFACT
from ftpipe.params import RegisterParams, TrainParams, load_section
from ftpipe.paths import MANIFEST_NAME, PARENT_DIR, PARENT_OLD_TEST, PARENT_TRAINED_ON

# Where register logs the test split with the fine-tuned run (the run a registered version points to).
TEST_ARTIFACT = "data/test.jsonl"


def run(*, init_from: str, model_name: str, tracking_uri: str, out_dir: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = {"init_from": init_from, "model_name": model_name, "version": None}
    with atomic_dir(out_dir) as tmp:
        if init_from == "champion":
            manifest.update(_materialize(model_name, tracking_uri, tmp))
        write_json(tmp / MANIFEST_NAME, manifest)
    return manifest


def _materialize(model_name: str, tracking_uri: str, folder: Path) -> dict[str, Any]:
    import mlflow

    from ftpipe import bottleneck, registry
    from ftpipe.credentials import redact

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        # MLflow would create an empty database and answer "no champion": a wrong path or a fresh
        # clone without the registry must not silently train from the base.
        raise PipelineError(f"train.init_from: champion, but the tracking store {redact(tracking_uri)} does not exist "
                            "(set MLFLOW_TRACKING_URI to the registry that holds the champion)")
    client = registry.connect(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)  # the champion's model loads through its models:/ URI
    found = registry.champion(client, model_name)
    if found is None:
        return {"note": f"no {model_name}@champion in {redact(tracking_uri)} yet: training starts from the base model"}
    version = found[0]
    model, tokenizer = registry.load_model(client, model_name, version, purpose="continue training from it")
    if hasattr(model, "peft_config") or bottleneck.is_adapted(model):
        kind = "bottleneck adapters" if bottleneck.is_adapted(model) else "a prompt-learning adapter"
        raise PipelineError(f"{model_name} v{version} (champion) is {kind}, not merged weights: "
                            "continual fine-tuning needs a merged champion (set train.init_from: base)")
    model.save_pretrained(folder)  # safetensors
    tokenizer.save_pretrained(folder)
    tags = registry.version_tags(client, model_name, version)
    run_id = registry.version_run(client, model_name, version)
    with tempfile.TemporaryDirectory(prefix="ftpipe-parent-") as download:
        old_test = registry.download_run_file(client, run_id, TEST_ARTIFACT, Path(download))
        if old_test is not None:
            shutil.move(old_test, folder / PARENT_OLD_TEST)
        # What the parent trained on (and its own parents): the new version has learned it too.
        trained_on = registry.download_run_file(client, run_id, TRAINED_ON_ARTIFACT, Path(download))
        if trained_on is not None:
            shutil.move(trained_on, folder / PARENT_TRAINED_ON)
    return {"version": version, "run_id": run_id,
            "lineage": {k: v for k, v in tags.items() if not k.startswith(("param.", "gate.", "promotion"))},
            "old_test_split": PARENT_OLD_TEST if old_test is not None else None,
            "note": "" if old_test is not None else f"v{version}'s run holds no {TEST_ARTIFACT}: no old-task check"}


def main() -> None:
    from ftpipe import tracking

    train = load_section("train", TrainParams)
    name = load_section("register", RegisterParams).model_name
    tracking.bound_http_retries()
    manifest = run(init_from=train.init_from, model_name=name, tracking_uri=tracking.tracking_uri(tracking.project_root()),
                   out_dir=PARENT_DIR)
    if manifest.get("version"):
        print(f"prepare_parent: {name} v{manifest['version']} (champion) -> {PARENT_DIR}")
    else:
        print(f"prepare_parent: training starts from the base model ({manifest.get('note') or 'train.init_from: base'})")


if __name__ == "__main__":
    run_cli(main)
