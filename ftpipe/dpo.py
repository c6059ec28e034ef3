"""The training library of the dpo stage: the DPO loop's and TRL's KTOTrainer's arguments, the rated
replies as a dataset, curves from the log history, and the policy's log-probability margin of chosen
over rejected (KTO: of the good replies over the bad ones).

For KTO, TRL's conversational format is used as is: `prompt` is the list of messages before the reply
and `completion` one assistant message, so the chat template (and its end-of-turn token) is applied
by TRL as the SFT rows were encoded. TRL wraps the start weights in the LoRA adapter (`peft_config`)
and computes the reference log-probabilities with the adapter switched off, as the DPO loop
(ftpipe/dpo_trainer.py) does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftpipe.params import DpoParams

REWARD_ACCURACY = "rewards/accuracies"  # TRL's metric names (prefixed with eval_, the test pairs' too)
REWARD_MARGIN = "rewards/margins"


def lora_config(params: DpoParams):
    from peft import LoraConfig

    return LoraConfig(r=params.lora_r, lora_alpha=params.lora_alpha, lora_dropout=0.0,
                      target_modules=list(params.target_modules), task_type="CAUSAL_LM")


def arguments(params: DpoParams, *, output_dir: Path, bf16: bool, cuda: bool):
    """The DPO loop's (ftpipe.dpo_trainer) TrainingArguments: the schedule shared with train
    (ftpipe.schedule), then DPO's own choices."""
    from transformers import TrainingArguments

    from ftpipe.schedule import trainer_arguments

    return trainer_arguments(
        params, TrainingArguments, output_dir=output_dir, cuda=cuda,
        bf16=bf16,  # the Trainer's autocast around the forward (train's response-only loss autocasts itself)
        # transformers' default optimizer (the fused AdamW with torch >= 2.8, on CPU and CUDA alike),
        # TRL's too, which the stage used before; train picks its own per method and device.
        optim=None,
        # Recomputing activations costs about a third more compute: a 135M model's activations fit,
        # and the train stage's default is off too (TRL's is on).
        activation_checkpointing=False,
        save_steps=params.save_steps,  # checkpoints/dpo/<key>/, so an interrupted run resumes
        save_total_limit=1,  # the newest checkpoint is all a resume reads
        remove_unused_columns=False,  # the pairs' uids key their kept reference log-probabilities
    )


def kto_arguments(params: DpoParams, *, output_dir: Path, bf16: bool, cuda: bool):
    """TRL's KTOConfig: the same schedule and choices as DPO's (arguments), then KTO's own arguments.
    KTOConfig's default sequential sampling stays (its KL estimate pairs neighbouring rows), so the
    rows are shuffled before (unpaired)."""
    from trl import KTOConfig

    from ftpipe.schedule import trainer_arguments

    return trainer_arguments(
        params, KTOConfig, output_dir=output_dir, cuda=cuda, bf16=bf16, optim=None, activation_checkpointing=False,
        save_steps=params.save_steps, save_total_limit=1, beta=params.beta, desirable_weight=params.desirable_weight,
        undesirable_weight=params.undesirable_weight, max_length=params.max_length,
    )


def unpaired(rows: list[dict[str, Any]], seed: int | None = None) -> list[dict[str, Any]]:
    """Rated replies {id, prompt, completion, label} for KTO: rated replies as they are, a pair as a good
    (chosen) and a bad (rejected) reply; shuffled with `seed` (None: in order)."""
    import random

    out = []
    for row in rows:
        if "chosen" in row:
            out += [{**{k: v for k, v in row.items() if k not in ("chosen", "rejected")}, "completion": row[key],
                     "label": key == "chosen", "id": f"{row['id']}/{key}"} for key in ("chosen", "rejected")]
        else:
            out.append(row)
    if seed is not None:
        random.Random(seed).shuffle(out)
    return out


def to_kto_dataset(rows: list[dict[str, Any]]):
    """Rated replies in TRL's conversational unpaired preference format."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["completion"]}],
                               "label": bool(r["label"])} for r in rows])


def to_dataset(pairs: list[dict[str, Any]]):
    """The pairs in TRL's conversational preference format (its DPOTrainer: bench_methods' baseline, tests)."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])


def fitting(pairs: list[dict[str, Any]], tokenizer, max_length: int) -> tuple[list[dict[str, Any]], int]:
    """(pairs whose prompt + longer reply, or rated replies whose prompt + reply, fit in max_length
    tokens, those left out): a reply cut to fit would be scored as if it were the reply."""
    from ftpipe.chat import encode

    kept = []
    for pair in pairs:
        replies = (pair["chosen"], pair["rejected"]) if "chosen" in pair else (pair["completion"],)
        longest = max(len(encode(tokenizer, [*pair["prompt"], {"role": "assistant", "content": reply}])["input_ids"])
                      for reply in replies)
        if longest <= max_length:
            kept.append(pair)
    return kept, len(pairs) - len(kept)


def logp_margin(model, tokenizer, pairs: list[dict[str, Any]], *, batch_size: int) -> float:
    """Mean over pairs of log p(chosen | prompt) - log p(rejected | prompt) under `model` (each reply's
    token log-probabilities summed): positive when the model prefers the chosen replies."""
    from ftpipe.metrics import response_nll

    def nll(key: str) -> list[float]:
        conversations = [[*p["prompt"], {"role": "assistant", "content": p[key]}] for p in pairs]
        return [total for total, _ in response_nll(model, tokenizer, conversations, batch_size=batch_size)]

    return sum(r - c for c, r in zip(nll("chosen"), nll("rejected"))) / len(pairs)


def label_margin(model, tokenizer, rows: list[dict[str, Any]], *, batch_size: int) -> float:
    """Mean log p(reply | prompt) of the good rated replies minus that of the bad ones under `model`
    (each reply's token log-probabilities summed): positive when the model prefers the good replies."""
    from ftpipe.metrics import response_nll

    conversations = [[*r["prompt"], {"role": "assistant", "content": r["completion"]}] for r in rows]
    logps = [-total for total, _ in response_nll(model, tokenizer, conversations, batch_size=batch_size)]
    good = [lp for lp, r in zip(logps, rows) if r["label"]]
    bad = [lp for lp, r in zip(logps, rows) if not r["label"]]
    return sum(good) / len(good) - sum(bad) / len(bad)


def curves(log_history: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[dict[str, float]]]:
    """(step, training loss) and one {step, loss, reward_accuracy, reward_margin} per evaluation."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    val = [{"step": h["step"], "loss": h["eval_loss"], "reward_accuracy": h.get(f"eval_{REWARD_ACCURACY}"),
            "reward_margin": h.get(f"eval_{REWARD_MARGIN}")} for h in log_history if "eval_loss" in h]
    # KTO logs no reward accuracy (and a margin only from batches holding good and bad replies).
    return train, [{k: v for k, v in point.items() if v is not None} for point in val]
