"""Benchmark: every training method against a plain transformers LoRA baseline, same data and steps.

Each run trains the base model (models/base) on data/prepared for N optimizer steps in its own
process, so peak memory is that run's alone, and reports trainable parameters, real (non-padding)
tokens per second of training, peak resident memory and the validation loss after N steps, each
with its ratio to the baseline. The methods run through `stages.train.run` with params.yaml's
`train` section (method, max_steps and eval_steps overridden); a method that TrainParams does not
accept is skipped with a note. The baseline is what a default set-up does: a transformers
`Trainer` with the same LoRA adapter in fp32, random batches padded to the longest row, and the
model's own loss (vocabulary logits at every position). Target: LoRA >= 6x the baseline's real
tokens/s on 2 CPU cores. `--footprint` adds the 4-bit (NF4, double quantization) base weight
footprint against fp32 (target <= 35 %).
Needs `python -m stages.prepare_base` and `python -m stages.prepare_data` first.
Run: .venv/bin/python -m bench.bench_methods [--steps 30] [--methods lora,qlora] [--footprint]
     [--write bench/results_methods.md]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METHODS = ("full", "lora", "qlora", "dora", "ia3", "prefix_tuning", "prompt_tuning", "p_tuning")
BASELINE = "baseline"
BASE_DIR, DATA_DIR = Path("models/base"), Path("data/prepared")
RESULT = "BENCH_RESULT "  # prefix of the child's one result line on stdout
FOOTPRINT = "footprint:"  # child name prefix: load the base weights as this variant and report their bytes


# What each method needs beyond params.yaml's train section to be a valid, sensible run.
METHOD_SETTINGS = {
    "full": {"learning_rate": 2e-5},  # the adapters' 1e-3 makes full fine-tuning diverge
    "qlora": {"quantization": "nf4_dq"},
    **{m: {"merge": False} for m in ("prefix_tuning", "prompt_tuning", "p_tuning")},  # cannot be merged
}


def train_params(method: str, steps: int):
    """params.yaml's train section for `method`, stopping after `steps` and evaluating once, after
    the timed training (an evaluation inside it would count as training time)."""
    from ftpipe.params import TrainParams, load_section

    base = load_section("train", TrainParams).model_dump()
    return TrainParams(**{**base, **METHOD_SETTINGS.get(method, {}), "method": method, "max_steps": steps,
                          "eval_steps": steps + 1})


def count_real_tokens() -> list[int]:
    """Count the non-padding tokens of every training batch, whatever Trainer subclass runs it."""
    from transformers import Trainer

    seen = [0]
    training_step = Trainer.training_step

    def counting_step(self, model, inputs, *args, **kwargs):
        mask = inputs.get("attention_mask")
        seen[0] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        return training_step(self, model, inputs, *args, **kwargs)

    Trainer.training_step = counting_step
    return seen


def run_method(method: str, steps: int) -> dict[str, Any]:
    from stages import train

    seen = count_real_tokens()
    with tempfile.TemporaryDirectory() as tmp:
        summary = train.run(params=train_params(method, steps), base_dir=BASE_DIR, data_dir=DATA_DIR,
                            out_dir=Path(tmp) / "adapter", reports_dir=Path(tmp) / "reports")
    return {"trainable": summary["trainable_parameters"], "tokens": seen[0], "train_s": summary["runtime_s"],
            "val_loss": summary["val_loss_final"], "steps": summary["steps"], "precision": summary["precision"]}


def run_baseline(steps: int) -> dict[str, Any]:
    """Default transformers LoRA fine-tuning: fp32, random batches padded to the longest, full logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from ftpipe import models
    from ftpipe.io import read_jsonl
    from stages.train import encode_rows

    params = train_params("lora", steps)
    seen = count_real_tokens()
    set_seed(params.seed)
    tokenizer = models.load_tokenizer(BASE_DIR)
    train_set, _ = encode_rows(tokenizer, read_jsonl(DATA_DIR / "train.jsonl"), params.max_length)
    val_set, _ = encode_rows(tokenizer, read_jsonl(DATA_DIR / "val.jsonl"), params.max_length)
    model = get_peft_model(models.load_model(BASE_DIR), LoraConfig(
        r=params.lora_r, lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
        target_modules=list(params.target_modules), task_type="CAUSAL_LM"))
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=params.batch_size, per_device_eval_batch_size=params.batch_size,
            learning_rate=params.learning_rate, max_steps=steps, lr_scheduler_type=params.lr_scheduler,
            warmup_steps=params.warmup_ratio, weight_decay=params.weight_decay, logging_steps=params.logging_steps,
            save_strategy="no", report_to="none", seed=params.seed, data_seed=params.seed, use_cpu=True,
            remove_unused_columns=False, prediction_loss_only=True)
        trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
        started = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - started
        val_loss = trainer.evaluate()["eval_loss"]
    return {"trainable": models.count_parameters(model)[1], "tokens": seen[0], "train_s": round(train_s, 1),
            "val_loss": val_loss, "steps": trainer.state.global_step, "precision": "fp32"}


def child(name: str, steps: int) -> None:
    if name.startswith(FOOTPRINT):
        from ftpipe import models, quantization

        variant = name[len(FOOTPRINT):]
        model = models.load_model(BASE_DIR) if variant == "fp32" else quantization.load_quantized(BASE_DIR, variant)
        print(RESULT + json.dumps(model.get_memory_footprint()), flush=True)
        return
    result = run_baseline(steps) if name == BASELINE else run_method(name, steps)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(RESULT + json.dumps(result), flush=True)


def measure(name: str, steps: int) -> dict[str, Any] | str:
    """One run in a fresh interpreter; its result, or why it has none."""
    proc = subprocess.run([sys.executable, "-m", "bench.bench_methods", "--child", name, "--steps", str(steps)],
                          stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not lines:
        return f"failed (exit {proc.returncode}; its error is printed above)"
    result = json.loads(lines[-1][len(RESULT):])
    result["tokens_per_s"] = result["tokens"] / result["train_s"]
    return result


def rejected(method: str, steps: int) -> str | None:
    """Why the current TrainParams refuses `method`, or None when it accepts it."""
    from pydantic import ValidationError

    try:
        train_params(method, steps)
    except ValidationError as exc:
        return exc.errors()[0]["msg"]
    return None


def table(results: dict[str, dict[str, Any] | str], steps: int) -> str:
    base = results.get(BASELINE)
    lines = [f"| method ({steps} steps) | trainable params | real tokens/s | x | peak RSS MB | x | val loss | x |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        if isinstance(r, str):
            lines.append(f"| {name} | {r} |||||||")
            continue

        def ratio(key: str) -> str:
            return f"{r[key] / base[key]:.2f}" if isinstance(base, dict) else "-"

        label = f"{name} (transformers Trainer, fp32, padded, full logits)" if name == BASELINE else name
        lines.append(f"| {label} | {r['trainable']:,} | {r['tokens_per_s']:.1f} | {ratio('tokens_per_s')} | "
                     f"{r['peak_rss_mb']:.0f} | {ratio('peak_rss_mb')} | {r['val_loss']:.4f} | {ratio('val_loss')} |")
    return "\n".join(lines) + "\n"


def footprint() -> str:
    """4-bit (NF4 + double quantization) base weights against fp32, each loaded in a fresh process."""
    sizes = {}
    for variant in ("fp32", "nf4_dq"):
        proc = subprocess.run([sys.executable, "-m", "bench.bench_methods", "--child", FOOTPRINT + variant],
                              stdout=subprocess.PIPE, text=True, check=True)
        sizes[variant] = json.loads(proc.stdout.splitlines()[-1][len(RESULT):])
    return (f"base weights: fp32 {sizes['fp32'] / 2**20:.0f} MiB, nf4_dq {sizes['nf4_dq'] / 2**20:.0f} MiB "
            f"= {sizes['nf4_dq'] / sizes['fp32']:.1%} of fp32 (target <= 35 %)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, in this order")
    parser.add_argument("--no-baseline", action="store_true", help="skip the (slow) plain baseline")
    parser.add_argument("--footprint", action="store_true", help="also measure the 4-bit weight footprint")
    parser.add_argument("--write", type=Path, help="also write the markdown table to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps)
    if not (BASE_DIR / "config.json").is_file() or not (DATA_DIR / "train.jsonl").is_file():
        sys.exit("run `python -m stages.prepare_base` and `python -m stages.prepare_data` first")

    results: dict[str, dict[str, Any] | str] = {}
    for name in ([] if args.no_baseline else [BASELINE]) + args.methods.split(","):
        why = None if name == BASELINE else rejected(name, args.steps)
        if why:
            print(f"skip {name}: TrainParams rejects it ({why})", flush=True)
            results[name] = f"skipped: not accepted by TrainParams ({why})"
            continue
        print(f"-- {name}: {args.steps} steps", flush=True)
        results[name] = measure(name, args.steps)
        if isinstance(results[name], dict):
            print(f"   {results[name]['tokens_per_s']:.1f} real tokens/s, {results[name]['peak_rss_mb']:.0f} MB peak, "
                  f"val loss {results[name]['val_loss']:.4f}", flush=True)
    report = table(results, args.steps)
    if args.footprint:
        report += "\n" + footprint()
    print("\n" + report)
    if args.write:
        from ftpipe.io import write_text

        write_text(args.write, report)


if __name__ == "__main__":
    main()
