"""A bottleneck-adapter model as MLflow registers it: transformers cannot load adapter layers, so the
version is a pyfunc holding the base (safetensors), the adapters (safetensors) and this package's code,
which loads both with ftpipe.bottleneck and answers as the other methods' transformers flavour does
(chat template, greedy, `MAX_NEW_TOKENS`). register logs it; ftpipe.registry and `mlflow models serve` load it.
"""

# No `from __future__ import annotations`: MLflow reads predict's type hints as objects.
import os
from pathlib import Path

import mlflow.pyfunc

MAX_NEW_TOKENS = 64  # as register's model_config for the transformers flavour
BASE, ADAPTER = "base", "adapter"  # the artifacts' names


class BottleneckLM(mlflow.pyfunc.PythonModel):
    """`model` and `tokenizer` once loaded: ftpipe.registry hands them to the scorer as it does a
    transformers version's components."""

    def load_context(self, context) -> None:
        from ftpipe import models

        base, adapter = Path(context.artifacts[BASE]), Path(context.artifacts[ADAPTER])
        self.tokenizer = models.load_tokenizer(base)
        self.model = models.load_finetuned(base, adapter, as_stored=True)  # the dtype it was registered in
        # `mlflow models serve` says the device as for the transformers flavour (services.serve sets it).
        if os.environ.get("MLFLOW_DEFAULT_PREDICTION_DEVICE", "-1") not in ("-1", "cpu"):
            self.model = self.model.to("cuda")

    def predict(self, context, model_input: list[str], params=None) -> list[str]:  # hints: MLflow checks requests
        from ftpipe.chat import render
        from ftpipe.metrics import generate

        prompts = [render(self.tokenizer, [{"role": "user", "content": p}], generation_prompt=True)
                   for p in _texts(model_input)]
        return generate(self.model, self.tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=8)


def _texts(model_input) -> list[str]:
    """The prompts of a request: a string, a list of them, or the one column MLflow makes of a list."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "iloc"):  # a pandas DataFrame (or Series) of strings
        frame = model_input.to_frame() if hasattr(model_input, "to_frame") else model_input
        return [str(v) for v in frame.iloc[:, 0].tolist()]
    return [str(v) for v in model_input]


def log(base_dir: Path, adapter_dir: Path, *, requirements: list[str]):
    """Log the model into the active run as `model`; its ModelInfo."""
    package = Path(__file__).resolve().parent
    return mlflow.pyfunc.log_model(
        name="model", python_model=BottleneckLM(),
        artifacts={BASE: str(Path(base_dir).resolve()), ADAPTER: str(Path(adapter_dir).resolve())},
        code_paths=[str(package)], pip_requirements=requirements,
        input_example=["a prompt"],  # with the type hints, the signature (no model is loaded to write it)
    )
