"""Supervised fine-tuning of the base model: full, or a peft method (transformers Trainer + peft).

Chat template applied, loss on assistant tokens only, seed fixed, validation loss every
`eval_steps`. Reads params.yaml `train`, models/base/, data/prepared/{train,val}.jsonl; writes the
adapter (or, for full, the model) and its resolved config to models/adapter/, a standalone merged
model to models/adapter/merged/ where the method can be merged, per-step losses to reports/{train,val}_loss.csv
(DVC plots), a loss-curve PNG and summary metrics to reports/train.json.
Checkpoints go every `save_steps` to checkpoints/train/<hash of params, base and data>/, outside
DVC's outs; a rerun after an interruption resumes from the newest one, and success removes them.
Run: python -m stages.train
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

from ftpipe.errors import PipelineError, run_cli
from ftpipe.io import all_or_nothing, atomic_dir, read_json, read_jsonl, remove_path, write_json, write_text
from ftpipe.params import TrainParams, load_section

BASE_DIR = Path("models/base")
DATA_DIR = Path("data/prepared")
OUT_DIR = Path("models/adapter")
REPORTS = Path("reports")
# Not a DVC out: DVC deletes a stage's outs before rerunning it, and these must survive a kill.
CHECKPOINTS = Path("checkpoints/train")
# Packed sequences hold at most max(max_length, PACK_LENGTH) tokens: a default batch of 8 chatterbot
# rows (about 270 tokens packed) fits in one, and eager attention (auto up to max_length 512) keeps no
# larger (length x length) scores than unpacked rows of 512 tokens would. Within that limit each batch
# takes the packing length with the fewest padded positions (packing.tightest_packing): a batch of
# long rows packed 512 wide paid for padding, and its steps ran up to twice as slow as unpacked.
PACK_LENGTH = 512


def encode_rows(tokenizer, rows: list[dict[str, Any]], max_length: int) -> tuple[list[dict], int]:
    """Tokenize rows; rows longer than max_length are left out (and counted), never silently cut."""
    from ftpipe.chat import encode

    encoded, too_long = [], 0
    for row in rows:
        item = encode(tokenizer, row["messages"])
        if len(item["input_ids"]) > max_length:
            too_long += 1
            continue
        item["attention_mask"] = [1] * len(item["input_ids"])
        encoded.append(item)
    return encoded, too_long


def response_only_loss(model, inputs: dict[str, Any], num_items_in_batch=None):
    """Cross-entropy over assistant tokens, computing vocabulary logits only at those positions.

    Prompt tokens carry no loss, so projecting them onto the 49k-token vocabulary (the model's
    largest matmul) is wasted work; skipping it is most of the speed-up on short chat turns.
    """
    import torch

    from ftpipe import packing
    from ftpipe.chat import IGNORE_INDEX

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "segments" in inputs:  # packed rows (ftpipe.packing): each sees its own tokens and the shared prefix
        kernel = base.config._attn_implementation
        mask = {"attention_mask": packing.attention_mask(inputs["segments"], kernel=kernel),
                "position_ids": inputs["position_ids"]}
    else:
        mask = {"attention_mask": inputs["attention_mask"]}
    hidden = base.get_decoder()(input_ids=inputs["input_ids"], use_cache=False, **mask).last_hidden_state
    targets = inputs["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    loss = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    return loss / count


# Adapter methods with a frozen fp32 base. Not full (gradual unfreezing would hand bf16 weights to
# the optimizer), not qlora (prepare_model_for_kbit_training keeps its norms in fp32 on purpose),
# not the prompt-learning methods (fp32 virtual tokens are concatenated with the word embeddings).
BF16_STORAGE_METHODS = ("lora", "dora", "ia3")


def frozen_weights_to_bf16(model) -> None:
    """Store the frozen base weights in bf16 once; trainable weights (and so the optimizer) stay fp32.

    Autocast casts fp32 weights to bf16 anew in every forward pass (its cache lasts one autocast
    region and skips frozen weights): 4 bytes read and 2 written per parameter per step. Stored in
    bf16 they are never cast and take half the memory. Quantized or integer tensors stay as they are.
    """
    import torch

    for param in model.parameters():
        if not param.requires_grad and param.dtype == torch.float32:
            param.data = param.data.to(torch.bfloat16)


class Diverged(PipelineError):
    """A non-finite loss or gradient norm: nothing after it is worth training, resuming or writing."""

    def __init__(self, what: str, value: float, step: int, learning_rate: float):
        super().__init__(f"train: {what} is {value} at step {step} (learning_rate {learning_rate:g}): "
                         "training diverged; lower train.learning_rate")


def _trainer_class(params: TrainParams, bf16: bool):
    import torch
    from transformers import Trainer

    from ftpipe import methods

    response_only = methods.response_only_ok(params.method)

    class FineTuneTrainer(Trainer):
        # Seconds spent evaluating and checkpointing inside train(), so throughput counts training only.
        side_seconds = 0.0
        # Collates training batches when set (packing); evaluation keeps data_collator's padded rows,
        # so validation loss is computed the same way with or without packing.
        train_collator = None

        def get_train_dataloader(self):
            if self.train_collator is None:
                return super().get_train_dataloader()
            padding, self.data_collator = self.data_collator, self.train_collator
            try:
                return super().get_train_dataloader()
            finally:
                self.data_collator = padding

        def evaluate(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                self.side_seconds += time.perf_counter() - started

        def _save_checkpoint(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return super()._save_checkpoint(*args, **kwargs)
            finally:
                self.side_seconds += time.perf_counter() - started

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not response_only:  # the model's own forward and loss (autocast by the Trainer)
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            else:
                # Autocast here: the loss bypasses model.forward, where Trainer would apply it.
                device = "cuda" if torch.cuda.is_available() else "cpu"
                with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                    loss = response_only_loss(model, inputs, num_items_in_batch)
                result = (loss, {"loss": loss}) if return_outputs else loss
            # Every batch: the logged loss hides a non-finite one (logging_nan_inf_filter), whose own
            # check already syncs on each training batch's loss, so this adds no sync in training.
            # A training batch belongs to the step being taken, an evaluation batch to the last one.
            loss = result[0] if return_outputs else result
            if not torch.isfinite(loss.detach()).all():
                what, step = ("loss", self.state.global_step + 1) if model.training else \
                    ("validation loss", self.state.global_step)
                raise Diverged(what, loss.item(), step, params.learning_rate)
            return result

        def log(self, logs, *args, **kwargs):
            # The gradient norm is seen only here (every logging_steps); a non-finite one also turns
            # the weights non-finite, so the next batch's loss check stops the run in any case.
            for key, what in (("grad_norm", "gradient norm"), ("eval_loss", "validation loss")):
                if key in logs and not math.isfinite(logs[key]):
                    raise Diverged(what, logs[key], self.state.global_step, params.learning_rate)
            return super().log(logs, *args, **kwargs)

        def create_optimizer(self, model=None):
            if params.method != "full" or self.optimizer is not None:
                return super().create_optimizer(model)
            # full: per-block learning rates, and every block that gradual unfreezing may open.
            optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
            decay = set(self.get_decay_parameter_names(self.model))
            self.optimizer = optimizer_cls(methods.param_groups(self.model, params, decay), **kwargs)
            return self.optimizer

    return FineTuneTrainer


def checkpoint_key(params: TrainParams, base_dir: Path, data_dir: Path) -> str:
    """Hash of everything a checkpoint depends on, so a stale one is never resumed."""
    from ftpipe.models import sha256_of

    inputs = {
        "params": params.model_dump(),
        "base": read_json(base_dir / "manifest.json"),
        "data": {name: sha256_of(data_dir / name) for name in ("train.jsonl", "val.jsonl")},
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint: the Trainer writes trainer_state.json last, so a folder
    without it was cut off mid-save (kill -9) and is skipped."""
    done = [c for c in folder.glob("checkpoint-*") if (c / "trainer_state.json").is_file()]
    return max(done, key=lambda c: int(c.name.split("-")[1]), default=None)


def run(*, params: TrainParams, base_dir: Path, data_dir: Path, out_dir: Path, reports_dir: Path,
        checkpoint_root: Path = CHECKPOINTS) -> dict[str, Any]:
    import torch
    from transformers import DataCollatorForSeq2Seq, EarlyStoppingCallback, TrainingArguments, set_seed

    from ftpipe import methods, models, packing
    from ftpipe.chat import IGNORE_INDEX
    from ftpipe.plots import plot_losses

    models.set_threads(params.threads)
    set_seed(params.seed)
    tokenizer = models.load_tokenizer(base_dir)
    train_rows, val_rows = read_jsonl(data_dir / "train.jsonl"), read_jsonl(data_dir / "val.jsonl")
    train_set, train_long = encode_rows(tokenizer, train_rows, params.max_length)
    val_set, val_long = encode_rows(tokenizer, val_rows, params.max_length)
    if not train_set or not val_set:
        raise PipelineError(f"train.max_length: {params.max_length} tokens leaves no train or val rows")
    row_tokens = sum(len(x["input_ids"]) for x in train_set)  # an epoch's tokens
    packs = methods.packs(params)

    cuda = torch.cuda.is_available()
    bf16 = params.precision == "bf16" or (params.precision == "auto" and models.bf16_supported())
    attention = methods.attention_kernel(params, cuda=cuda)
    model = methods.build(params, base_dir, bf16=bf16, attention=attention)
    if bf16 and params.method in BF16_STORAGE_METHODS:
        frozen_weights_to_bf16(model)
    total, trainable = models.count_parameters(model)
    optim = "adamw_torch"
    if params.method == "qlora":
        # Paged optimizer states spill to CPU memory under GPU memory pressure: a CUDA-only feature.
        optim = "paged_adamw_8bit" if cuda else "adamw_torch"
        print(f"train: qlora optimizer {optim}" + ("" if cuda else " (no CUDA: paged 8-bit AdamW needs a GPU)"))
    checkpoints = checkpoint_root / checkpoint_key(params, base_dir, data_dir)
    resume = last_checkpoint(checkpoints) if checkpoints.is_dir() else None
    resumed_step = int(resume.name.split("-")[1]) if resume else 0
    if resume:
        print(f"train: resuming from {resume} (step {resumed_step})")

    with all_or_nothing(), atomic_dir(out_dir) as tmp:  # the model and its reports together
        args = TrainingArguments(
            output_dir=str(checkpoints),
            per_device_train_batch_size=params.batch_size,
            per_device_eval_batch_size=params.batch_size,
            gradient_accumulation_steps=params.grad_accum,
            activation_checkpointing=params.gradient_checkpointing,
            # Non-reentrant checkpointing works when the inputs' embeddings are frozen (peft, freezing).
            activation_checkpointing_kwargs={"use_reentrant": False},
            learning_rate=params.learning_rate,
            num_train_epochs=params.epochs,
            max_steps=params.max_steps,
            lr_scheduler_type=params.lr_scheduler,
            warmup_steps=params.warmup_ratio,  # a float below 1 is a ratio of the total steps
            weight_decay=params.weight_decay,
            optim=optim,
            bf16=bf16 and not methods.response_only_ok(params.method),  # else autocast in compute_loss
            logging_steps=params.logging_steps,
            eval_strategy="steps",
            eval_steps=params.eval_steps,
            save_strategy="steps" if params.save_steps else "no",
            save_steps=params.save_steps or 500,
            save_total_limit=1,  # plus the best one when early stopping keeps it
            load_best_model_at_end=bool(params.early_stopping_patience),
            metric_for_best_model="eval_loss",
            greater_is_better=False,
            report_to="none",
            seed=params.seed,
            data_seed=params.seed,
            use_cpu=not cuda,
            # Batches of similar length waste less compute on padding.
            train_sampling_strategy="group_by_length",
            remove_unused_columns=False,
            prediction_loss_only=True,
        )
        callbacks = []
        if params.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=params.early_stopping_patience))
        if params.gradual_unfreezing:
            callbacks.append(methods.unfreezing_callback(model, params))
        trainer = _trainer_class(params, bf16)(
            model=model, args=args, train_dataset=train_set, eval_dataset=val_set, callbacks=callbacks,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX))
        if packs:
            trainer.train_collator = packing.PackedCollator(tokenizer, max(params.max_length, PACK_LENGTH))
        started = time.perf_counter()
        try:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            runtime = time.perf_counter() - started
            steps = trainer.state.global_step
            if not any(h.get("step") == steps and "eval_loss" in h for h in trainer.state.log_history):
                trainer.evaluate()  # the Trainer evaluates the last step itself; this covers a run that did not
        except Diverged:
            remove_path(checkpoints)  # a resumed rerun would diverge the same way (same seed and params)
            raise
        train_s = max(runtime - trainer.side_seconds, 1e-9)
        history = trainer.state.log_history
        train_curve = [(h["step"], h["loss"]) for h in history if "loss" in h]
        val_curve = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
        best_step, best_val = min(val_curve, key=lambda sv: sv[1])
        # With early stopping the Trainer reloads the best checkpoint: that is the model written here.
        best_checkpoint = trainer.state.best_model_checkpoint if args.load_best_model_at_end else None
        kept_step = int(Path(best_checkpoint).name.split("-")[1]) if best_checkpoint else steps
        final_val = dict(val_curve)[kept_step]
        kept_train = [loss for step, loss in train_curve if step <= kept_step]
        # Only the steps run by this process count towards its speed (a resumed run did fewer).
        tokens = row_tokens * trainer.state.epoch * (steps - resumed_step) / steps
        summary = {
            "method": params.method,
            "steps": steps,
            "epochs": round(trainer.state.epoch, 3),
            "resumed_from_step": resumed_step,
            "early_stopped": bool(params.early_stopping_patience) and steps < trainer.state.max_steps,
            "train_loss_final": train_curve[-1][1] if train_curve else None,
            "val_loss_final": final_val,  # of the model written (the best checkpoint after early stopping)
            "val_loss_last_eval": val_curve[-1][1],
            "val_loss_best": best_val,
            "best_step": best_step,
            "kept_step": kept_step,
            "train_val_gap": (final_val - kept_train[-1]) if kept_train else None,
            "runtime_s": round(runtime, 1),
            "train_s": round(train_s, 1),  # runtime less evaluation and checkpointing
            "tokens_per_s": round(tokens / train_s, 1),  # the rows' tokens, prefix included where packing shares it
            "precision": "bf16" if bf16 else "fp32",
            "attention": attention,
            "optimizer": optim,
            "parameters": total,
            "trainable_parameters": trainable,
            "rows": {"train": len(train_set), "val": len(val_set)},
            "packing": packs,
            # Tokens every training row starts with; a packed batch's rows may share more.
            "shared_prefix_tokens": len(packing.shared_prefix(train_set)) if packs else 0,
            "dropped_too_long": {"train": train_long, "val": val_long},
        }
        if params.method == "full":
            methods.save_merged(model, params, base_dir=base_dir, adapter_dir=tmp, tokenizer=tokenizer,
                                out_dir=tmp / models.MERGED)
        else:
            model.save_pretrained(tmp)  # adapter only, as safetensors
            if params.merge:
                methods.save_merged(model, params, base_dir=base_dir, adapter_dir=tmp, tokenizer=tokenizer,
                                    out_dir=tmp / models.MERGED)
        write_json(tmp / "train_config.json", {
            "params": params.model_dump(),
            "base_model": read_json(base_dir / "manifest.json"),
            "summary": summary,
        })
        reports_dir.mkdir(parents=True, exist_ok=True)
        write_text(reports_dir / "train_loss.csv", _csv(train_curve))
        write_text(reports_dir / "val_loss.csv", _csv(val_curve))
        plot_losses(train_curve, val_curve, reports_dir / "loss.png")
        write_json(reports_dir / "train.json", summary)
    remove_path(checkpoints)  # the run is complete: nothing left to resume
    return summary


def _csv(curve: list[tuple[int, float]]) -> str:
    return "step,loss\n" + "".join(f"{step},{loss:.6f}\n" for step, loss in curve)


def main() -> None:
    params = load_section("train", TrainParams)
    summary = run(params=params, base_dir=BASE_DIR, data_dir=DATA_DIR, out_dir=OUT_DIR, reports_dir=REPORTS)
    print(f"train: {summary['steps']} steps, val loss {summary['val_loss_final']:.4f}, "
          f"{summary['tokens_per_s']} tokens/s ({summary['precision']}) -> {OUT_DIR}")


if __name__ == "__main__":
    run_cli(main)
