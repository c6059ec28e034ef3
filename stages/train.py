"""Supervised fine-tuning of the base model: full, or a peft method (transformers Trainer + peft).

Loss on assistant tokens only, seed fixed, validation every `eval_steps`; with `live_metrics` the curves also go
to an MLflow run (ftpipe/live.py). Checkpoints go to checkpoints/train/<hash of params, base and data>/, outside
DVC's outs, and a rerun resumes from the newest. `processes` > 1 relaunches under torchrun; process 0 writes.
Reads params.yaml `train`, models/base/ (or models/parent/), data/prepared/{train,val}.jsonl; writes models/adapter/
(merged/ inside where the method merges), reports/{train,val}_loss.csv, reports/loss.png, reports/train.json.
Run: python -m stages.train
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ftpipe import live
from ftpipe.errors import PipelineError, run_cli
from ftpipe.io import all_or_nothing, atomic_dir, read_json, read_jsonl, remove_path, write_json, write_text
from ftpipe.params import TrainParams, load_section
from ftpipe.paths import (
    ADAPTER_DIR,
    BASE_DIR,
    CHECKPOINTS,
    LOSS_PLOT,
    MANIFEST_NAME,
    PARENT_DIR,
    PREPARED_DIR,
    REPORTS,
    TRAIN_CONFIG_NAME,
    TRAIN_LOSS,
    TRAIN_REPORT,
    VAL_LOSS,
    split_file,
)
from ftpipe.schemas import TrainReport


@dataclass
class Data:
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    too_long: dict[str, int]
    tokens: int  # an epoch's tokens


@dataclass
class Setup:
    model: Any
    tokenizer: Any
    bf16: bool
    cuda: bool
    attention: str
    optim: str


def run(*, params: TrainParams, base_dir: Path, data_dir: Path, out_dir: Path, reports_dir: Path,
        checkpoint_root: Path = CHECKPOINTS, parent: str = "base", parent_version: str | None = None,
        live_to: live.Target | None = None) -> TrainReport:
    """`base_dir`: the weights training starts from (models/base, or models/parent for a continual
    fine-tune from the champion, which `parent` and `parent_version` name in the report). `live_to`:
    where the metrics go while training (None: nowhere; they reach MLflow when register runs)."""
    from transformers import set_seed

    from ftpipe import models
    from ftpipe.trainer import check_worker, checkpoint_key

    check_worker(params)
    models.set_threads(params.threads, processes=params.processes)
    set_seed(params.seed)
    with live.session(live_to, run_name="train") as live_run:  # the run is created while the model loads
        tokenizer = models.load_tokenizer(base_dir)
        data = _setup_data(params, tokenizer, data_dir)
        setup = _setup_model(params, base_dir, tokenizer)
        checkpoints = checkpoint_root / checkpoint_key(params, base_dir, data_dir)
        trainer = _setup_trainer(params, setup, data, checkpoints, live_run)
        runtime, resumed_step = _train(trainer, checkpoints)  # returns once every process has finished
    report = _report(params, trainer, setup, data, runtime=runtime, resumed_step=resumed_step, parent=parent,
                     parent_version=parent_version, live_run_id=live_run and live_run.run_id)
    setup = _unsharded(params, setup, trainer, base_dir)
    if trainer.is_world_process_zero():  # one writer; the model and its reports go in place together
        with all_or_nothing(), atomic_dir(out_dir) as tmp:
            _save_model(params, setup, base_dir=base_dir, out_dir=tmp, report=report)
            _write_reports(trainer, report, reports_dir)
        remove_path(checkpoint_root)  # the run is complete: nothing left to resume (older keys' leftovers too)
    return report


def _setup_data(params: TrainParams, tokenizer, data_dir: Path) -> Data:
    from ftpipe.trainer import encode_rows

    train, train_long = encode_rows(tokenizer, read_jsonl(data_dir / split_file("train")), params.max_length)
    val, val_long = encode_rows(tokenizer, read_jsonl(data_dir / split_file("val")), params.max_length)
    if not train or not val:
        raise PipelineError(f"train.max_length: {params.max_length} tokens leaves no train or val rows")
    return Data(train=train, val=val, too_long={"train": train_long, "val": val_long},
                tokens=sum(len(x["input_ids"]) for x in train))


def _setup_model(params: TrainParams, base_dir: Path, tokenizer) -> Setup:
    import torch

    from ftpipe import methods
    from ftpipe.kernels import use_fused_lora, use_fused_loss
    from ftpipe.schedule import use_bf16
    from ftpipe.trainer import BF16_STORAGE_METHODS, frozen_weights_to_bf16, optimizer_name, rank

    cuda = torch.cuda.is_available()
    bf16 = use_bf16(params)
    attention = methods.attention_kernel(params, cuda=cuda)
    frozen_bf16 = bf16 and params.method in BF16_STORAGE_METHODS and params.distributed != "fsdp"  # FSDP: one dtype per block
    model = methods.build(params, base_dir, bf16=bf16, attention=attention, frozen_bf16=frozen_bf16)
    if frozen_bf16:
        frozen_weights_to_bf16(model)  # frozen weights a model class keeps in fp32 when loaded in bf16
    if methods.fuses_lora(params, cuda=cuda):
        use_fused_lora(model)
    if methods.fuses_loss(params, cuda=cuda):
        use_fused_loss(model)
    attention = model.config._attn_implementation  # eager where packed_rows is not made for the model
    optim = optimizer_name(params, cuda=cuda)
    if params.method == "qlora" and rank() == 0:
        print(f"train: qlora optimizer {optim}" + ("" if cuda else " (no CUDA: paged 8-bit AdamW needs a GPU)"))
    return Setup(model=model, tokenizer=tokenizer, bf16=bf16, cuda=cuda, attention=attention, optim=optim)


def _setup_trainer(params: TrainParams, setup: Setup, data: Data, checkpoints: Path, live_run: live.LiveRun | None):
    from transformers import DataCollatorForSeq2Seq, EarlyStoppingCallback

    from ftpipe import methods, packing
    from ftpipe.callbacks import TRAIN_KEYS, final_step_callback, live_metrics_callback
    from ftpipe.chat import IGNORE_INDEX
    from ftpipe.trainer import PACK_LENGTH, trainer_class, training_arguments

    args = training_arguments(params, output_dir=checkpoints, bf16=setup.bf16, optim=setup.optim, cuda=setup.cuda)
    callbacks = [final_step_callback()]
    if params.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=params.early_stopping_patience))
    if params.gradual_unfreezing:
        callbacks.append(methods.unfreezing_callback(setup.model, params))
    if live_run:
        callbacks.append(live_metrics_callback(live_run, keys=TRAIN_KEYS, tokens_per_epoch=data.tokens))
    padding = DataCollatorForSeq2Seq(setup.tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    trainer = trainer_class(params, setup.bf16)(model=setup.model, args=args, train_dataset=data.train,
                                                eval_dataset=data.val, callbacks=callbacks, data_collator=padding)
    if methods.packs(params):
        trainer.train_collator = packing.PackedCollator(setup.tokenizer, max(params.max_length, PACK_LENGTH))
    return trainer


def _train(trainer, checkpoints: Path) -> tuple[float, int]:
    """Train (from the newest checkpoint of an interrupted run, if any); (seconds, step resumed from)."""
    from ftpipe.schedule import last_checkpoint
    from ftpipe.trainer import Diverged

    resume = last_checkpoint(checkpoints) if checkpoints.is_dir() else None
    resumed_step = int(resume.name.split("-")[1]) if resume else 0
    if resume and trainer.is_world_process_zero():
        print(f"train: resuming from {resume} (step {resumed_step})")
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        runtime = time.perf_counter() - started
        steps = trainer.state.global_step
        if not any(h.get("step") == steps and "eval_loss" in h for h in trainer.state.log_history):
            trainer.evaluate()  # the Trainer evaluates the last step itself; this covers a run that did not
    except Diverged:
        # A resumed rerun would diverge the same way (same seed and params). Any process may see it
        # first, and others may be removing the folder too.
        shutil.rmtree(checkpoints, ignore_errors=True)
        raise
    trainer.accelerator.wait_for_everyone()  # no output is written before every process is done
    return runtime, resumed_step


def _unsharded(params: TrainParams, setup: Setup, trainer, base_dir: Path) -> Setup:
    """The model to write: under FSDP each process holds a shard of the weights, so all of them gather
    the full weights (a collective) and process 0 loads them into an unsharded copy of the model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ftpipe import methods

    if not trainer.is_fsdp_enabled:
        return setup
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # on process 0, in CPU memory
    weights = get_model_state_dict(trainer.model_wrapped, options=full)
    if not trainer.is_world_process_zero():
        return setup
    model = methods.build(params, base_dir, bf16=False, attention=setup.attention)
    model.load_state_dict(weights)
    return replace(setup, model=model)


def _report(params: TrainParams, trainer, setup: Setup, data: Data, *, runtime: float, resumed_step: int,
            parent: str, parent_version: str | None, live_run_id: str | None) -> TrainReport:
    from ftpipe import methods, models, packing
    from ftpipe.trainer import loss_curves

    train_curve, val_curve = loss_curves(trainer.state.log_history)
    steps = trainer.state.global_step
    best_step, best_val = min(val_curve, key=lambda sv: sv[1])
    # With early stopping the Trainer reloads the best checkpoint: that is the model written here.
    best_checkpoint = trainer.state.best_model_checkpoint if trainer.args.load_best_model_at_end else None
    kept_step = int(Path(best_checkpoint).name.split("-")[1]) if best_checkpoint else steps
    final_val = dict(val_curve)[kept_step]
    kept_train = [loss for step, loss in train_curve if step <= kept_step]
    train_s = max(runtime - trainer.side_seconds, 1e-9)
    # Only the steps run by this process count towards its speed (a resumed run did fewer).
    tokens = data.tokens * trainer.state.epoch * (steps - resumed_step) / steps
    total, trainable = models.count_parameters(setup.model)
    packs = methods.packs(params)
    return TrainReport(
        method=params.method, parent=parent, parent_version=parent_version, steps=steps,
        epochs=round(trainer.state.epoch, 3), resumed_from_step=resumed_step,
        early_stopped=bool(params.early_stopping_patience) and steps < trainer.state.max_steps,
        train_loss_final=train_curve[-1][1] if train_curve else None,
        val_loss_final=final_val, val_loss_last_eval=val_curve[-1][1], val_loss_best=best_val, best_step=best_step,
        kept_step=kept_step, train_val_gap=(final_val - kept_train[-1]) if kept_train else None,
        runtime_s=round(runtime, 1), train_s=round(train_s, 1), tokens_per_s=round(tokens / train_s, 1),
        precision="bf16" if setup.bf16 else "fp32", device="cuda" if setup.cuda else "cpu",
        attention=setup.attention, optimizer=setup.optim,
        parameters=total, trainable_parameters=trainable, rows={"train": len(data.train), "val": len(data.val)},
        packing=packs, shared_prefix_tokens=len(packing.shared_prefix(data.train)) if packs else 0,
        dropped_too_long=data.too_long, live_run_id=live_run_id,
    )


def _save_model(params: TrainParams, setup: Setup, *, base_dir: Path, out_dir: Path, report: TrainReport) -> None:
    """The adapter (safetensors), or for full the model, plus a merged model where the method allows."""
    from ftpipe import methods, models

    if params.method == "bottleneck":
        from ftpipe import bottleneck

        bottleneck.save(setup.model, out_dir)  # the adapters only, as safetensors
    elif params.method != "full":
        setup.model.save_pretrained(out_dir)  # adapter only, as safetensors
    if params.method == "full" or params.merge:
        methods.save_merged(setup.model, params, base_dir=base_dir, adapter_dir=out_dir, tokenizer=setup.tokenizer,
                            out_dir=out_dir / models.MERGED)
    write_json(out_dir / TRAIN_CONFIG_NAME, {
        "params": params.model_dump(),
        "base_model": read_json(base_dir / MANIFEST_NAME),
        "summary": report.model_dump(mode="json"),
    })


def _write_reports(trainer, report: TrainReport, reports_dir: Path) -> None:
    from ftpipe.plots import plot_losses
    from ftpipe.trainer import curve_csv, loss_curves

    train_curve, val_curve = loss_curves(trainer.state.log_history)
    reports_dir.mkdir(parents=True, exist_ok=True)
    write_text(reports_dir / TRAIN_LOSS.name, curve_csv(train_curve))
    write_text(reports_dir / VAL_LOSS.name, curve_csv(val_curve))
    plot_losses(train_curve, val_curve, reports_dir / LOSS_PLOT.name)
    report.write(reports_dir / TRAIN_REPORT.name)


def main() -> None:
    from ftpipe import models
    from ftpipe.trainer import is_worker, launch, rank

    params = load_section("train", TrainParams)
    if params.processes > 1 and not is_worker():
        launch(params, module="stages.train")  # this stage again, once per process, under torchrun
        return
    start, parent, version = models.start_weights(params.init_from, PARENT_DIR, BASE_DIR)
    live_to = live.target(params.live_metrics) if rank() == 0 else None  # one process logs for all
    report = run(params=params, base_dir=start, data_dir=PREPARED_DIR, out_dir=ADAPTER_DIR, reports_dir=REPORTS,
                 parent=parent, parent_version=version, live_to=live_to)
    if rank() == 0:
        print(f"train: {report.steps} steps from {parent}, val loss {report.val_loss_final:.4f}, "
              f"{report.tokens_per_s} tokens/s ({report.precision}) -> {ADAPTER_DIR}")


if __name__ == "__main__":
    run_cli(main)
