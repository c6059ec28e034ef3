"""The Trainer arguments of both training stages, and whether they compute in bf16, from the keys train
and dpo share (ftpipe.params._Schedule): transformers' TrainingArguments for train (ftpipe/trainer.py)
and dpo's DPO loop, TRL's KTOConfig for kto (ftpipe/dpo.py). One builder, so a shared key reaches every
trainer the same way; what differs between them on purpose is a parameter here, and each caller says
why it passes what it does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

from ftpipe.params import DpoParams, TrainParams

Args = TypeVar("Args")


def use_bf16(params: TrainParams | DpoParams) -> bool:
    """Whether the run computes in bf16: precision bf16, or auto on a device that computes it natively."""
    from ftpipe import device

    return params.precision == "bf16" or (params.precision == "auto" and device.bf16_supported())


def trainer_arguments(params: TrainParams | DpoParams, args_class: type[Args], *, output_dir: Path, cuda: bool,
                      bf16: bool, optim: str | None, activation_checkpointing: bool, save_steps: int,
                      **extra: Any) -> Args:
    """`args_class` (TrainingArguments or a subclass, e.g. trl.DPOConfig) for `params`' schedule.

    bf16: the Trainer's own autocast, around the model's forward. optim: the optimizer's name; None
    keeps args_class's default. activation_checkpointing: no default, as TRL's (on) is not
    transformers' (off). save_steps: a checkpoint every N optimizer steps; 0: none. extra: the
    trainer's own arguments, passed as they are (none may set a schedule argument twice).
    """
    args: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=params.batch_size,
        per_device_eval_batch_size=params.batch_size,
        gradient_accumulation_steps=params.grad_accum,
        learning_rate=params.learning_rate,
        num_train_epochs=params.epochs,
        max_steps=params.max_steps,
        lr_scheduler_type=params.lr_scheduler,
        warmup_steps=params.warmup_ratio,  # a float below 1 is a ratio of the total steps
        bf16=bf16,  # always given: TRL's default (None) turns bf16 on wherever fp16 is off
        activation_checkpointing=activation_checkpointing,
        # Non-reentrant checkpointing works when the inputs' embeddings are frozen (peft, freezing).
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=params.logging_steps,  # always given: TRL's default is 10, transformers' 500
        eval_strategy="steps",
        eval_steps=params.eval_steps,
        save_strategy="steps" if save_steps else "no",
        report_to="none",  # the live metrics go to MLflow through ftpipe.live's callback, not the Trainer's
        seed=params.seed,
        data_seed=params.seed,  # the training rows' order
        use_cpu=not cuda,
    )
    if save_steps:
        args["save_steps"] = save_steps
    if optim is not None:
        args["optim"] = optim
    twice = sorted(args.keys() & extra.keys())
    if twice:
        raise TypeError(f"trainer_arguments: {', '.join(twice)} set by the schedule and again by the caller")
    return args_class(**args, **extra)


def checkpoint_folder_key(inputs: dict[str, Any], *, code: list[Path], libraries: tuple[str, ...]) -> str:
    """The name of a run's checkpoint folder: a hash of everything its checkpoints depend on (train's
    and dpo's inputs differ), the training code's files and the libraries' installed versions
    included, so a checkpoint of other inputs or other code is never resumed."""
    from importlib.metadata import version  # not the packages' imports: peft's costs about a second

    from ftpipe.models import sha256_of

    inputs = {**inputs, "code": [sha256_of(Path(file)) for file in code],
              "libraries": [version(name) for name in libraries]}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder` (save_steps): the Trainer writes trainer_state.json
    last, so a folder without it was cut off mid-save (kill -9) and is skipped."""
    done = [c for c in folder.glob("checkpoint-*") if (c / "trainer_state.json").is_file()]
    return max(done, key=lambda c: int(c.name.split("-")[1]), default=None)
