"""Fine-tuning methods: what is trainable for each `train.method`, and how its result is merged.

peft builds every adapter (LoRA, DoRA, IA3, prefix/prompt/p-tuning), ftpipe.bottleneck the adapter
layers; `full` trains the model's own
weights, optionally with frozen embeddings and lower blocks, ULMFiT gradual unfreezing and
discriminative (per-block) learning rates, all through the Trainer's optimizer and a callback.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftpipe.choices import PROMPT_METHODS
from ftpipe.errors import PipelineError
from ftpipe.params import TrainParams

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_VIRTUAL_TOKENS = 20  # peft's examples and the prompt-tuning paper's mid-range setting


def response_only_ok(method: str) -> bool:
    """Prompt-learning methods add virtual tokens inside peft's forward, which the decoder-only
    shortcut of the response-only loss would skip: they use the model's own forward and loss."""
    return method not in PROMPT_METHODS


def packs(params: TrainParams) -> bool:
    """Whether training batches are packed: `train.packing`, where auto means every method that
    trains through the response-only loss (ftpipe.packing's attention mask is applied there)."""
    return response_only_ok(params.method) if params.packing == "auto" else params.packing


def peft_config(params: TrainParams, model: PreTrainedModel):
    """The peft config for a method (None for full)."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    method, tokens = params.method, params.num_virtual_tokens or DEFAULT_VIRTUAL_TOKENS
    if method in ("lora", "qlora", "dora"):
        return LoraConfig(r=params.lora_r, lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
                          target_modules=list(params.target_modules), use_dora=method == "dora", task_type="CAUSAL_LM")
    if method == "ia3":
        return IA3Config(target_modules=params.ia3_target_modules, feedforward_modules=params.ia3_feedforward_modules,
                         task_type="CAUSAL_LM")
    if method == "prefix_tuning":
        return PrefixTuningConfig(num_virtual_tokens=tokens, task_type="CAUSAL_LM")
    if method == "prompt_tuning":
        return PromptTuningConfig(num_virtual_tokens=tokens, task_type="CAUSAL_LM")
    if method == "p_tuning":
        return PromptEncoderConfig(num_virtual_tokens=tokens, task_type="CAUSAL_LM",
                                   encoder_hidden_size=params.encoder_hidden_size or model.config.hidden_size)
    return None


EAGER_MAX_LENGTH = 512  # eager keeps (batch x heads x length^2) attention weights for the backward pass


def attention_kernel(params: TrainParams, *, cuda: bool) -> str:
    """The attn_implementation to train with: `train.attention`, or for auto on CPU when rows are
    short (torch's fused attention backward is slow there) packed_rows where batches are packed and
    eager where not, and sdpa otherwise. build() keeps eager for a model packed_rows is not made for."""
    if params.attention != "auto":
        return params.attention
    if cuda or params.max_length > EAGER_MAX_LENGTH:
        return "sdpa"
    return "packed_rows" if packs(params) else "eager"


def fuses_lora(params: TrainParams, *, cuda: bool) -> bool:
    """Whether LoRA layers run through ftpipe.kernels' LoraLinear (`train.fused_lora`; auto: on CPU)."""
    from ftpipe.choices import LORA_METHODS

    return _on(params.fused_lora, cuda=cuda) and params.method in LORA_METHODS


def fuses_loss(params: TrainParams, *, cuda: bool) -> bool:
    """Whether the response-only loss runs through ftpipe.kernels' linear_cross_entropy
    (`train.fused_loss`; auto: on CPU)."""
    return _on(params.fused_loss, cuda=cuda) and response_only_ok(params.method)


def _on(setting: bool | str, *, cuda: bool) -> bool:
    """A CPU kernel's switch: true or false as set; auto on CPU only (CUDA keeps the paths measured there)."""
    return setting if setting != "auto" else not cuda


def build(params: TrainParams, base_dir: Path, *, bf16: bool, attention: str = "sdpa",
          frozen_bf16: bool = False) -> PreTrainedModel:
    """The base model prepared for training with `params.method`, with the given attention kernel.
    `frozen_bf16`: the base loaded straight into bf16 (the frozen weights are stored so for training,
    ftpipe.trainer.frozen_weights_to_bf16), with no fp32 copy on the way: for a 1 B model that copy
    was the train stage's peak, 4 GB."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from ftpipe import kernels, models

    packed_rows = attention == kernels.PACKED_ATTENTION
    attention = "eager" if packed_rows else attention  # loaded as eager, switched once built
    if params.method == "qlora":
        from ftpipe.quantization import load_quantized

        model = load_quantized(base_dir, params.quantization, bf16=bf16, attn_implementation=attention)
        # peft enables checkpointing through transformers' deprecated `gradient_checkpointing_enable`
        # (a FutureWarning): it only casts and freezes here, and checkpointing goes by the new name.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if params.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        import torch

        model = models.load_model(base_dir, dtype=torch.bfloat16 if frozen_bf16 else None,
                                  attn_implementation=attention)
    if packed_rows:
        kernels.use_packed_attention(model)
    if params.method == "full":
        freeze_fixed(model, params)
        return model
    if params.method == "bottleneck":
        from ftpipe import bottleneck

        return bottleneck.add(model, bottleneck.config_for(
            model, reduction=params.bottleneck_reduction, placement=params.bottleneck_placement,
            activation=params.bottleneck_activation))
    key = "ia3_target_modules" if params.method == "ia3" else "target_modules"
    try:
        return get_peft_model(model, peft_config(params, model))
    except ValueError as exc:
        raise PipelineError(f"train.{key}: {str(exc).splitlines()[0]}") from None


def blocks(model) -> list:
    return list(model.get_decoder().layers)


def freeze_fixed(model, params: TrainParams) -> None:
    """full: freeze the embeddings and the first `freeze_layers` blocks for the whole run."""
    layers = blocks(model)
    if params.freeze_layers >= len(layers):
        raise PipelineError(f"train.freeze_layers: {params.freeze_layers} leaves none of the model's "
                            f"{len(layers)} blocks to train")
    if params.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    for layer in layers[: params.freeze_layers]:
        layer.requires_grad_(False)


def param_groups(model, params: TrainParams, decay_names: set[str]) -> list[dict[str, Any]]:
    """full: optimizer groups with ULMFiT discriminative rates (lr / divisor**depth below the top).

    Every parameter that may become trainable is included now, even if gradual unfreezing has it
    frozen at first: a frozen parameter has no gradient, so AdamW leaves it alone until then.
    """
    layers = blocks(model)
    depth_of: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            depth_of[id(p)] = len(layers) - 1 - i
    embedding = model.get_input_embeddings().weight
    depth_of[id(embedding)] = len(layers)  # below block 0 (with tied weights the head shares it)
    fixed = {id(p) for layer in layers[: params.freeze_layers] for p in layer.parameters()}
    if params.freeze_embeddings:
        fixed.add(id(embedding))
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if id(p) in fixed:
            continue
        depth, decay = depth_of.get(id(p), 0), name in decay_names  # final norm / untied head: top rate
        group = groups.setdefault((depth, decay), {
            "params": [], "lr": params.learning_rate / params.layer_lr_divisor**depth,
            "weight_decay": params.weight_decay if decay else 0.0})
        group["params"].append(p)
    return list(groups.values())


def unfreezing_callback(model, params: TrainParams):
    """ULMFiT gradual unfreezing as a TrainerCallback. It derives the trainable blocks from the
    global step (or epoch) alone, so a resumed run continues with exactly the same set."""
    from transformers import TrainerCallback

    layers, fixed = blocks(model), params.freeze_layers
    every = params.unfreeze_every_steps

    class GradualUnfreezing(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self._apply(state)

        def on_step_begin(self, args, state, control, **kwargs):
            self._apply(state)

        def _apply(self, state) -> None:
            stage = state.global_step // every if every else int(state.epoch or 0)
            open_from = max(fixed, len(layers) - 1 - stage)  # index of the lowest trainable block
            for i, layer in enumerate(layers[fixed:], start=fixed):
                layer.requires_grad_(i >= open_from)
            if not params.freeze_embeddings:
                # Embeddings sit below block 0: they open one stage after the lowest block.
                model.get_input_embeddings().weight.requires_grad_(stage >= len(layers) - fixed)

    return GradualUnfreezing()


def save_merged(model, params: TrainParams, *, base_dir: Path, adapter_dir: Path, tokenizer, out_dir: Path) -> None:
    """A standalone model folder (safetensors + tokenizer + chat template) that loads with plain
    AutoModelForCausalLM, in the base's own dtype (models/base is stored as its source was: a bf16
    base gives a bf16 merged model, half the disk of fp32 and what inference runs in where bf16 is
    native). peft adapters are merged into the base weights (for qlora too, so serving needs neither
    peft nor bitsandbytes): each weight becomes round(w + delta) in that dtype, which is also what a
    bf16 merge in memory gives, so evaluation scores the very model that is registered."""
    import torch

    from ftpipe import models

    if params.method in PROMPT_METHODS:
        raise PipelineError(f"train.merge: '{params.method}' cannot be merged (its virtual tokens need peft)")
    if params.method != "full":
        from peft import PeftModel

        stored = models.load_model(base_dir, dtype="auto")
        model = PeftModel.from_pretrained(stored, Path(adapter_dir).resolve()).merge_and_unload()
    else:  # the fully tuned weights themselves, in the base's stored dtype
        dtype = models.stored_dtype(base_dir)
        model = model.to(dtype) if dtype is not None and dtype != torch.float32 else model
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
