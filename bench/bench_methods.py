"""Benchmark: every training method against plain LoRA baselines, same model, data and steps.

Each run trains the base model (models/base) on data/prepared for N optimizer steps in its own
process, so peak memory is that run's alone, and reports trainable parameters, real tokens per
second of training (the rows' own tokens, padding not counted; a packed batch counts each row's
tokens, its share of the shared prefix included, as the same rows unpacked would; steady state:
timed from the end of the first WARMUP_STEPS steps to the end of the last, evaluation excluded),
peak resident memory and the validation loss after N steps, each with its ratio to the baseline
(for speed with --repeat, the median of the ratios within a round). The methods run through
`stages.train.run` with params.yaml's `train` section (method, max_steps and eval_steps
overridden); a method that TrainParams does not accept is skipped with a note.
Two baselines, both the same LoRA adapter (rank, alpha, dropout, modules, learning rate) on the
same token ids, batch size and steps, in fp32 with random batches padded to the longest row:
`baseline` is a default TRL `SFTTrainer` (its defaults: gradient checkpointing, loss and token
metrics over every position); `baseline-trainer` is a transformers `Trainer` with the model's own
loss on assistant tokens (vocabulary logits still at every position). Ratios are against the first
one measured; `baseline-bf16` is the TRL one with `bf16=True` (only where the CPU has bf16), the peer
at its best. Validation loss is the same for all rows: mean assistant-token cross-entropy on
data/prepared/val.jsonl. The run starts with the machine (bench/ceiling.py: CPU, bf16 / AMX, the
matmul GFLOP/s at the model's shapes in fp32 and bf16); each row shows the matmul GFLOP/s it
sustained and its share of that ceiling in the row's precision. Targets on 2 CPU cores: with bf16
or AMX, LoRA at 800 real tokens/s or more and 7.5x the TRL defaults; without bf16, 60 % of the fp32
ceiling.
`--footprint` adds the 4-bit (NF4, double quantization) base weight footprint against fp32
(target <= 35 %).
Needs `python -m stages.prepare_base` and `python -m stages.prepare_data` first.
`--dpo` adds the dpo stage (ftpipe.dpo_trainer, from the base on data/preferences) and TRL's
DPOTrainer at its defaults on the same pairs, LoRA adapter and schedule, in a table of their own: real
tokens/s counting each pair's prompt once and both replies (TRL's batches counted the same way), the
paired ratio to TRL and to the SFT lora row of the same run, matmul GFLOP/s with the reference forward
counted, and the validation reward accuracy after the same steps. Targets: at least half the SFT lora
row's tokens/s and 4x TRL's.
Run: .venv/bin/python -m bench.bench_methods [--steps 30] [--methods lora,qlora] [--baselines baseline]
     [--repeat 3] [--footprint] [--dpo] [--write bench/results_methods.md]
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

from ftpipe.paths import ADAPTER_DIR, BASE_DIR, DPO_DIR, DPO_REPORT, PREFS_DIR
from ftpipe.paths import PREPARED_DIR as DATA_DIR

METHODS = ("full", "lora", "lora_unpacked", "qlora", "dora", "ia3", "bottleneck", "prefix_tuning", "prompt_tuning",
           "p_tuning")
BASELINE, BF16_BASELINE, TRAINER_BASELINE = "baseline", "baseline-bf16", "baseline-trainer"
BASELINES = (BASELINE, BF16_BASELINE, TRAINER_BASELINE)
DPO, DPO_BASELINE = "dpo", "dpo-baseline"  # --dpo: the dpo stage against TRL's DPOTrainer defaults
WARMUP_STEPS = 3  # untimed steps at the start of every run
IGNORE = -100  # labels without a loss
RESULT = "BENCH_RESULT "  # prefix of the child's one result line on stdout
FOOTPRINT = "footprint:"  # child name prefix: load the base weights as this variant and report their bytes


# What each method needs beyond params.yaml's train section to be a valid, sensible run.
METHOD_SETTINGS = {
    "full": {"learning_rate": 2e-5},  # the adapters' 1e-3 makes full fine-tuning diverge
    "qlora": {"quantization": "nf4_dq"},
    # LoRA on padded rows (packing off): what packing and the shared prefix are worth.
    "lora_unpacked": {"method": "lora", "packing": False},
}


def train_params(method: str, steps: int):
    """params.yaml's train section for `method`, stopping after `steps` and evaluating once, at the
    end (stages.train leaves evaluation and checkpointing out of its training time)."""
    from ftpipe.params import TrainParams, load_section

    base = load_section("train", TrainParams).model_dump()
    # No merged copy: it is not training, and loading a second model would set the peak memory.
    return TrainParams(**{**base, "merge": False, "method": method, **METHOD_SETTINGS.get(method, {}),
                          "max_steps": steps, "eval_steps": steps + 1})


class StepMeter:
    """Real (non-padding) tokens, matmul FLOPs (bench.ceiling.step_flops) and wall time at the end of
    every optimizer step, whatever Trainer subclass runs it (Trainer, TRL's SFTTrainer,
    stages.train's), so all rows are timed and counted alike."""

    def __init__(self, *, full: bool = False, reference: bool = False) -> None:
        from transformers import AutoConfig, Trainer
        from transformers.trainer_callback import CallbackHandler

        from bench.ceiling import Shapes, step_flops

        shapes = Shapes.of(AutoConfig.from_pretrained(BASE_DIR))
        self.tokens, self.flops, self.marks = 0, 0.0, []  # marks: (seconds, tokens, flops so far) after each step
        training_step, step_end = Trainer.training_step, CallbackHandler.on_step_end
        meter = self

        def counting_step(trainer, model, inputs, *args, **kwargs):
            counted = as_packed_pairs(inputs) if "completion_mask" in inputs else inputs  # TRL's DPO batch
            mask = counted.get("attention_mask")
            if "real_tokens" in counted:  # packed rows: their own tokens (ftpipe.packing.PackedCollator)
                meter.tokens += int(counted["real_tokens"])
            else:
                meter.tokens += int(mask.sum()) if mask is not None else counted["input_ids"].numel()
            meter.flops += step_flops(shapes, counted, full=full, reference=reference)
            return training_step(trainer, model, inputs, *args, **kwargs)

        def marking_step_end(handler, *args, **kwargs):
            meter.marks.append((time.perf_counter(), meter.tokens, meter.flops))
            return step_end(handler, *args, **kwargs)

        Trainer.training_step, CallbackHandler.on_step_end = counting_step, marking_step_end

    def result(self) -> dict[str, Any]:
        """Steady-state throughput: from the end of the warm-up steps to the end of the last step
        (the first steps also pay for set-up: optimizer state, kernel selection, allocations)."""
        if len(self.marks) <= WARMUP_STEPS:
            raise SystemExit(f"only {len(self.marks)} steps ran: need more than the {WARMUP_STEPS} warm-up steps")
        (t0, n0, f0), (t1, n1, f1) = self.marks[WARMUP_STEPS - 1], self.marks[-1]
        return {"tokens": n1 - n0, "gflop": (f1 - f0) / 1e9, "train_s": round(t1 - t0, 2),
                "timed_steps": len(self.marks) - WARMUP_STEPS}


def as_packed_pairs(inputs: dict[str, Any]) -> dict[str, Any]:
    """TRL's DPO batch (chosen rows, then rejected rows, each prompt + reply) counted as the work the
    pairs need, the way ftpipe.dpo_trainer lays them out: segments with each prompt once (its last
    token with each reply), labels on the reply tokens, real_tokens those sequences' lengths."""
    import torch

    mask, completion = inputs["attention_mask"].bool(), inputs["completion_mask"].bool()
    pairs = mask.shape[0] // 2
    rows, labels, real = [], [], 0
    for i in range(pairs):
        prompt = int((mask[i] & ~completion[i]).sum())
        chosen, rejected = int(completion[i].sum()), int(completion[pairs + i].sum())
        rows.append([0] * (prompt - 1) + [1] * (chosen + 1) + [2] * (rejected + 1))
        labels.append([IGNORE] * prompt + [1] * chosen + [IGNORE] + [1] * rejected)
        real += len(rows[-1])  # as PairCollator counts: the packed sequence's length
    width = max(map(len, rows))
    return {"segments": torch.tensor([r + [-1] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([r + [IGNORE] * (width - len(r)) for r in labels]),
            "real_tokens": torch.tensor(real)}


def dpo_params(steps: int):
    """params.yaml's dpo section, on, from the base, stopping after `steps` and evaluating then."""
    from ftpipe.params import DpoParams, load_section

    base = load_section("dpo", DpoParams).model_dump()
    return DpoParams(**{**base, "enabled": True, "init_from": "base", "max_steps": steps, "eval_steps": steps,
                        "save_steps": 0, "live_metrics": False})


def run_dpo(steps: int) -> dict[str, Any]:
    """The dpo stage (ftpipe.dpo_trainer) from the base on data/preferences."""
    from stages import dpo

    meter = StepMeter(reference=True)
    with tempfile.TemporaryDirectory() as tmp:
        report = dpo.run(params=dpo_params(steps), base_dir=BASE_DIR, adapter_dir=ADAPTER_DIR, prefs_dir=PREFS_DIR,
                         out_dir=Path(tmp) / DPO_DIR.name, report_path=Path(tmp) / DPO_REPORT.name,
                         checkpoint_root=Path(tmp) / "checkpoints")
    last = report.val_curve[-1]
    return {"trainable": report.trainable_parameters, **meter.result(), "val_loss": last["loss"],
            "val_reward_accuracy": last["reward_accuracy"], "steps": report.steps, "precision": report.precision}


def run_dpo_baseline(steps: int) -> dict[str, Any]:
    """TRL's DPOTrainer at its defaults (its precision, activation checkpointing, the reference model
    run every step, chosen and rejected as padded rows) with the same LoRA adapter, pairs and schedule."""
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    from ftpipe import models
    from ftpipe.dpo import fitting, lora_config, to_dataset
    from ftpipe.io import read_jsonl

    params = dpo_params(steps)
    set_seed(params.seed)
    tokenizer = models.load_tokenizer(BASE_DIR)
    train, val = (fitting(read_jsonl(PREFS_DIR / f"{split}.jsonl"), tokenizer, params.max_length)[0]
                  for split in ("train", "val"))
    meter = StepMeter(reference=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=params.batch_size,
                         per_device_eval_batch_size=params.batch_size, learning_rate=params.learning_rate,
                         max_steps=steps, lr_scheduler_type=params.lr_scheduler, warmup_steps=params.warmup_ratio,
                         save_strategy="no", report_to="none", seed=params.seed, data_seed=params.seed, use_cpu=True,
                         beta=params.beta, loss_type=[params.loss_type], max_length=params.max_length)
        trainer = DPOTrainer(model=models.load_model(BASE_DIR), args=args, train_dataset=to_dataset(train),
                             processing_class=tokenizer, peft_config=lora_config(params))
        trainer.train()
        found = trainer.evaluate(to_dataset(val))
    return {"trainable": models.count_parameters(trainer.model)[1], **meter.result(), "val_loss": found["eval_loss"],
            "val_reward_accuracy": found["eval_rewards/accuracies"], "steps": trainer.state.global_step,
            "precision": "bf16" if args.bf16 else "fp32"}


def run_method(method: str, steps: int) -> dict[str, Any]:
    from stages import train

    meter = StepMeter(full=method == "full")
    with tempfile.TemporaryDirectory() as tmp:
        summary = train.run(params=train_params(method, steps), base_dir=BASE_DIR, data_dir=DATA_DIR,
                            out_dir=Path(tmp) / "adapter", reports_dir=Path(tmp) / "reports")
    return {"trainable": summary.trainable_parameters, **meter.result(),
            "val_loss": summary.val_loss_final, "steps": summary.steps, "precision": summary.precision}


def lora_baseline_model(params):
    from peft import LoraConfig, get_peft_model

    from ftpipe import models

    return get_peft_model(models.load_model(BASE_DIR), LoraConfig(
        r=params.lora_r, lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
        target_modules=list(params.target_modules), task_type="CAUSAL_LM"))


def val_loss(model, tokenizer, val_set, params, tmp: str) -> float:
    """Mean assistant-token loss on the validation rows, the way stages.train evaluates."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    args = TrainingArguments(output_dir=tmp, per_device_eval_batch_size=params.batch_size, report_to="none",
                             use_cpu=True, remove_unused_columns=False, prediction_loss_only=True)
    trainer = Trainer(model=model, args=args, eval_dataset=val_set,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    return trainer.evaluate()["eval_loss"]


def run_baseline(name: str, steps: int) -> dict[str, Any]:
    """A default LoRA fine-tuning set-up (TRL SFTTrainer, or transformers Trainer): fp32, random
    batches padded to the longest row, vocabulary logits at every position."""
    from transformers import set_seed

    from ftpipe import models
    from ftpipe.io import read_jsonl
    from ftpipe.trainer import encode_rows

    params = train_params("lora", steps)
    meter = StepMeter()
    set_seed(params.seed)
    tokenizer = models.load_tokenizer(BASE_DIR)
    train_set, _ = encode_rows(tokenizer, read_jsonl(DATA_DIR / "train.jsonl"), params.max_length)
    val_set, _ = encode_rows(tokenizer, read_jsonl(DATA_DIR / "val.jsonl"), params.max_length)
    model = lora_baseline_model(params)
    common = dict(per_device_train_batch_size=params.batch_size, learning_rate=params.learning_rate, max_steps=steps,
                  lr_scheduler_type=params.lr_scheduler, warmup_steps=params.warmup_ratio,
                  weight_decay=params.weight_decay, save_strategy="no", report_to="none", seed=params.seed,
                  data_seed=params.seed, use_cpu=True)
    with tempfile.TemporaryDirectory() as tmp:
        if name in (BASELINE, BF16_BASELINE):
            from datasets import Dataset
            from trl import SFTConfig, SFTTrainer

            # Token ids only: TRL's default for a dataset without labels is a loss at every position.
            data = Dataset.from_list([{"input_ids": row["input_ids"]} for row in train_set])
            bf16 = name == BF16_BASELINE  # the peer at its best where the CPU has bf16
            trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=tmp, bf16=bf16, **common),
                                 train_dataset=data, processing_class=tokenizer)
        else:
            from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

            args = TrainingArguments(output_dir=tmp, remove_unused_columns=False, **common)
            trainer = Trainer(model=model, args=args, train_dataset=train_set,
                              data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
        trainer.train()
        loss = val_loss(model, tokenizer, val_set, params, tmp)
    return {"trainable": models.count_parameters(model)[1], **meter.result(),
            "val_loss": loss, "steps": trainer.state.global_step, "precision": "bf16" if name == BF16_BASELINE else "fp32"}


def child(name: str, steps: int) -> None:
    if name.startswith(FOOTPRINT):
        from ftpipe import models, quantization

        variant = name[len(FOOTPRINT):]
        model = models.load_model(BASE_DIR) if variant == "fp32" else quantization.load_quantized(BASE_DIR, variant)
        print(RESULT + json.dumps(model.get_memory_footprint()), flush=True)
        return
    runs = {**dict.fromkeys(BASELINES, run_baseline), DPO: lambda _, n: run_dpo(n),
            DPO_BASELINE: lambda _, n: run_dpo_baseline(n)}
    result = runs.get(name, run_method)(name, steps)
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


def summarize(runs: list[dict[str, Any]], baselines: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The run with the median tokens/s, the range of all, and per baseline the median of the paired
    speed ratios (run i against that baseline's run i of the same round, so slow spells of a shared
    machine, which vary runs by 15 % or more, hit both sides of a ratio)."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    median = dict(ordered[len(ordered) // 2])
    median["range"] = (ordered[0]["tokens_per_s"], ordered[-1]["tokens_per_s"])
    median["paired"] = {}
    for name, baseline_runs in baselines.items():
        ratios = sorted(r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(runs, baseline_runs))
        median["paired"][name] = ratios[len(ratios) // 2]
    return median


def rejected(method: str, steps: int) -> str | None:
    """Why the current TrainParams refuses `method`, or None when it accepts it."""
    from pydantic import ValidationError

    try:
        train_params(method, steps)
    except ValidationError as exc:
        return exc.errors()[0]["msg"]
    return None


LABELS = {BASELINE: "baseline (TRL SFTTrainer defaults, fp32)",
          BF16_BASELINE: "baseline-bf16 (TRL SFTTrainer, bf16=True)",
          TRAINER_BASELINE: "baseline-trainer (transformers Trainer, fp32, full logits)"}


def table(results: dict[str, dict[str, Any] | str], steps: int, ceiling: dict[str, float]) -> str:
    """Markdown: per row real tokens/s, its paired ratio to each TRL baseline measured, the matmul
    GFLOP/s it sustained and its share of the machine's ceiling in the row's precision."""
    trl = [name for name in (BASELINE, BF16_BASELINE) if isinstance(results.get(name), dict)]
    base = next((r for name, r in results.items() if name in BASELINES and isinstance(r, dict)), None)
    lines = [f"| method ({steps} steps) | trainable params | real tokens/s | "
             + "".join(f"x {name} | " for name in trl)
             + "GFLOP/s | % of ceiling | peak RSS MB | x | val loss | x |",
             "|---|---:|---:|" + "---:|" * len(trl) + "---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        if isinstance(r, str):
            lines.append(f"| {name} | {r} |" + "|" * (len(trl) + 8))
            continue

        def ratio(key: str, r: dict = r) -> str:
            return f"{r[key] / base[key]:.2f}" if isinstance(base, dict) else "-"

        label = LABELS.get(name, f"{name} ({r['precision']})")
        spread = f" ({r['range'][0]:.0f}-{r['range'][1]:.0f})" if r["range"][0] != r["range"][1] else ""
        speed = "".join(f"{1.0 if b == name else r['paired'].get(b, float('nan')):.2f} | " for b in trl)
        gflops = r["gflop"] / r["train_s"]
        lines.append(f"| {label} | {r['trainable']:,} | {r['tokens_per_s']:.1f}{spread} | {speed}"
                     f"{gflops:.0f} | {gflops / ceiling[r['precision']]:.0%} | "
                     f"{r['peak_rss_mb']:.0f} | {ratio('peak_rss_mb')} | {r['val_loss']:.4f} | {ratio('val_loss')} |")
    return "\n".join(lines) + "\n"


def dpo_table(rows: dict[str, dict[str, Any] | str], lora: dict[str, Any] | str | None, steps: int,
              ceiling: dict[str, float]) -> str:
    """Markdown: the dpo stage against TRL's DPOTrainer defaults, real tokens/s counting each prompt once
    and both replies, with the paired ratios to TRL and to the SFT lora row of the same run."""
    lines = [f"| DPO ({steps} steps, pairs of params.yaml dpo) | real tokens/s | x TRL DPOTrainer defaults | "
             "x SFT lora | GFLOP/s | % of ceiling | peak RSS MB | val reward accuracy | val DPO loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    labels = {DPO_BASELINE: "TRL DPOTrainer defaults", DPO: "dpo stage (ftpipe.dpo_trainer)"}
    for name, r in rows.items():
        if isinstance(r, str):
            lines.append(f"| {labels[name]} | {r} |" + "|" * 7)
            continue
        paired = [1.0 if name == DPO_BASELINE else r["paired"].get(DPO_BASELINE), r["paired"].get("lora")]
        ratios = " | ".join("-" if x is None else f"{x:.2f}" for x in paired)
        gflops = r["gflop"] / r["train_s"]
        lines.append(f"| {labels[name]} ({r['precision']}) | {r['tokens_per_s']:.1f} | {ratios} | {gflops:.0f} | "
                     f"{gflops / ceiling[r['precision']]:.0%} | {r['peak_rss_mb']:.0f} | "
                     f"{r['val_reward_accuracy']:.3f} | {r['val_loss']:.4f} |")
    if isinstance(lora, dict):
        lines.append(f"\nSFT lora in the same run: {lora['tokens_per_s']:.1f} real tokens/s ({lora['precision']}).")
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
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help="comma-separated baselines to measure first (empty: none); ratios are against the first")
    parser.add_argument("--footprint", action="store_true", help="also measure the 4-bit weight footprint")
    parser.add_argument("--dpo", action="store_true",
                        help="also the dpo stage and TRL's DPOTrainer defaults, in a table of their own (needs "
                             "data/preferences: `python -m stages.prepare_prefs` with dpo.enabled)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of one run per row; the table shows the median, the range and the median "
                             "paired ratio to the baseline's run of the same round")
    parser.add_argument("--write", type=Path, help="also write the markdown table to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be more than the {WARMUP_STEPS} untimed warm-up steps")
    if args.child:
        return child(args.child, args.steps)
    if not (BASE_DIR / "config.json").is_file() or not (DATA_DIR / "train.jsonl").is_file():
        sys.exit("run `python -m stages.prepare_base` and `python -m stages.prepare_data` first")
    if args.dpo and not (PREFS_DIR / "train.jsonl").is_file():
        sys.exit("--dpo: run `python -m stages.prepare_prefs` with dpo.enabled: true first")

    from transformers import AutoConfig

    from bench.ceiling import Shapes, describe, machine

    info = machine(Shapes.of(AutoConfig.from_pretrained(BASE_DIR)))
    machine_line = describe(info)
    print(machine_line, flush=True)
    baselines = [b for b in args.baselines.split(",") if b]
    if BF16_BASELINE in baselines and not info["bf16_used"]:
        print(f"skip {BF16_BASELINE}: this CPU has no bf16 instructions (bf16 would be emulated, slower than fp32)")
        baselines.remove(BF16_BASELINE)
    if set(baselines) - set(BASELINES):
        sys.exit(f"--baselines: unknown {sorted(set(baselines) - set(BASELINES))}; choose from {', '.join(BASELINES)}")
    results: dict[str, dict[str, Any] | str] = {}
    names = []
    for name in baselines + [m for m in args.methods.split(",") if m]:
        why = None if name in BASELINES else rejected(name, args.steps)
        if why:
            print(f"skip {name}: TrainParams rejects it ({why})", flush=True)
            results[name] = f"skipped: not accepted by TrainParams ({why})"
        else:
            names.append(name)
    if args.dpo:
        names += [DPO_BASELINE, DPO]
    # Rounds of one run per row (not all runs of one row, then the next): a slow spell of the
    # machine then lands on every row of a round, and the paired ratios cancel it.
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for round_ in range(1, args.repeat + 1):
        for name in [n for n in names if not isinstance(results.get(n), str)]:
            print(f"-- {name}: {args.steps} steps" + (f", round {round_}/{args.repeat}" if args.repeat > 1 else ""),
                  flush=True)
            result = measure(name, args.steps)
            if isinstance(result, str):
                results[name] = result
                continue
            runs[name].append(result)
            print(f"   {result['tokens_per_s']:.1f} real tokens/s, {result['gflop'] / result['train_s']:.0f} GFLOP/s, "
                  f"{result['peak_rss_mb']:.0f} MB peak, "
                  f"val loss {result['val_loss']:.4f}", flush=True)
    trl = {n: runs[n] for n in (BASELINE, BF16_BASELINE) if n in names and n not in results and runs[n]}
    dpo = {DPO_BASELINE: runs.get(DPO_BASELINE), "lora": runs.get("lora")}  # a DPO row's references
    for name in names:
        if name not in results:
            against = {b: r for b, r in (dpo if name in (DPO, DPO_BASELINE) else trl).items() if r and b != name}
            results[name] = summarize(runs[name], against)
    dpo_rows = {name: results.pop(name) for name in (DPO_BASELINE, DPO) if name in results}
    report = machine_line + "\n\n" + table(results, args.steps, info["gflops"])
    if dpo_rows:
        report += "\n" + dpo_table(dpo_rows, results.get("lora"), args.steps, info["gflops"])
    if args.footprint:
        report += "\n" + footprint()
    print("\n" + report)
    if args.write:
        from ftpipe.io import write_text

        write_text(args.write, report)


if __name__ == "__main__":
    main()
