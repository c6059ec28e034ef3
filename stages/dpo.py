"""Preference tuning of a LoRA adapter: direct preference optimization (ftpipe.dpo_trainer) on the
preference pairs, or with dpo.method kto TRL's KTOTrainer on rated replies (a pair: a good and a bad one).

Starts from the SFT model (`init_from: sft`, merged) or the base; those weights with the adapter off
are the reference. Validation pairs are scored every `eval_steps`, the test pairs once at the end.
Reads params.yaml `dpo`, models/base/, models/adapter/, data/preferences/; writes models/dpo/ and
reports/dpo.json (with dpo off: a manifest and report saying so).
Checkpoints every `save_steps` go to checkpoints/dpo/; a rerun after a kill resumes from the newest.
Run: python -m stages.dpo
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from ftpipe import live
from ftpipe.errors import PipelineError, run_cli
from ftpipe.io import all_or_nothing, atomic_dir, read_json, read_jsonl, remove_path, write_json
from ftpipe.models import DPO_MANIFEST
from ftpipe.params import DpoParams, load_section
from ftpipe.paths import (
    ADAPTER_DIR,
    BASE_DIR,
    DPO_CHECKPOINTS,
    DPO_DIR,
    DPO_LOSS_PLOT_NAME,
    DPO_REPORT,
    MANIFEST_NAME,
    PREFS_DIR,
    PREFS_MANIFEST_NAME,
    SPLITS,
    TRAIN_CONFIG_NAME,
    split_file,
)
from ftpipe.schedule import checkpoint_folder_key, last_checkpoint
from ftpipe.schemas import DpoReport


def run(*, params: DpoParams, base_dir: Path, adapter_dir: Path, prefs_dir: Path, out_dir: Path,
        report_path: Path, live_to: live.Target | None = None, checkpoint_root: Path = DPO_CHECKPOINTS) -> DpoReport:
    """`live_to`: where the metrics go while training (None: nowhere; register logs the curves).
    Checkpoints go to `checkpoint_root`/<key of the params and inputs>/; a rerun resumes from the newest."""
    if not params.enabled:
        report = DpoReport(enabled=False)
        with all_or_nothing(), atomic_dir(out_dir) as tmp:
            write_json(tmp / DPO_MANIFEST, {"enabled": False})
            report.write(report_path)
        return report
    from transformers import set_seed

    from ftpipe import models
    from ftpipe.schedule import use_bf16
    from ftpipe.trainer import Diverged

    models.set_threads(params.threads)
    set_seed(params.seed)
    # The run is created while the model loads, and ended before the test pairs are scored (their
    # rewards are named eval_* too, as TRL names them, which would land on the validation curves).
    with live.session(live_to, run_name="dpo") as live_run:
        tokenizer = models.load_tokenizer(base_dir)
        pairs, too_long = _setup_pairs(params, prefs_dir, tokenizer)  # kto: rated replies
        checkpoints = checkpoint_root / _checkpoint_key(params, base_dir, adapter_dir, prefs_dir)
        start, described = _start_model(params, base_dir, adapter_dir)
        before = _margin(start, tokenizer, pairs["test"], params)
        bf16 = use_bf16(params)
        trainer = _setup_trainer(params, start, tokenizer, pairs, checkpoints, bf16, live_run)
        resume = last_checkpoint(checkpoints) if checkpoints.is_dir() else None
        if resume:
            print(f"dpo: resuming from {resume}", flush=True)
        started = time.perf_counter()
        try:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except Diverged:
            remove_path(checkpoints)  # a resumed rerun would diverge the same way (same seed and params)
            raise
        runtime = time.perf_counter() - started
    test = _test_metrics(trainer, pairs, params, tokenizer)
    with all_or_nothing(), atomic_dir(out_dir) as tmp:  # the model and its report go in place together
        trainer.model.save_pretrained(tmp)  # the adapter
        report = _report(params, trainer, pairs, test, trainer.model, start=described, before=before, runtime=runtime,
                         bf16=bf16, too_long=too_long, live_run_id=live_run and live_run.run_id,
                         resumed_from_step=int(resume.name.split("-")[1]) if resume else 0)
        del trainer, start  # the training copy (frozen weights in bf16 where training was): merged from the start's own
        gc.collect()  # the fused LoRA forwards refer back to their modules: a cycle that only the collector frees
        merged = _merged(params, base_dir, adapter_dir, tmp)
        report.test_logp_margin_after = _margin(merged, tokenizer, pairs["test"], params)
        _save(params, merged, tokenizer, report, tmp)
        report.write(report_path)
    remove_path(checkpoint_root)  # the run is complete: nothing left to resume (older keys' leftovers too)
    return report


def _checkpoint_key(params: DpoParams, base_dir: Path, adapter_dir: Path, prefs_dir: Path) -> str:
    """Hash of everything a checkpoint depends on (params, base, SFT start, pairs, the training code and
    its libraries): a stale one is never resumed."""
    from ftpipe import dpo, dpo_trainer, kernels, packing, schedule, trainer
    from ftpipe.models import sha256_of

    start = adapter_dir / TRAIN_CONFIG_NAME
    inputs = {
        "params": params.model_dump(),
        # prepare_base's manifest names the base; a model folder given directly, its config.
        "base": read_json(base_dir / MANIFEST_NAME) if (base_dir / MANIFEST_NAME).is_file()
        else sha256_of(base_dir / "config.json"),
        "start": sha256_of(start) if params.init_from == "sft" and start.is_file() else None,
        "pairs": {split: sha256_of(prefs_dir / split_file(split)) for split in ("train", "val")},
    }
    code = [Path(module.__file__) for module in (dpo, dpo_trainer, kernels, packing, schedule, trainer)] + [Path(__file__)]
    return checkpoint_folder_key(inputs, code=code, libraries=("torch", "trl", "transformers"))


def _setup_pairs(params: DpoParams, prefs_dir: Path, tokenizer) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """(split -> pairs, or with method kto rated replies (a pair becomes a good and a bad one), those
    left out as over max_length)."""
    from ftpipe.dpo import fitting, unpaired

    manifest = read_json(prefs_dir / PREFS_MANIFEST_NAME)
    if not manifest.get("enabled"):
        raise PipelineError(f"{prefs_dir}: no preference pairs were built (run `dvc repro prepare_prefs`)")
    if manifest.get("kind") == "thumbs" and params.method != "kto":
        raise PipelineError(f"dpo.method: '{params.method}' needs pairs, and {prefs_dir} holds rated replies "
                            "(prepare_prefs.kind thumbs): use method kto")
    what = "rated replies" if params.method == "kto" else "pairs"
    pairs, too_long = {}, 0
    for split in SPLITS:
        rows = read_jsonl(prefs_dir / split_file(split))
        if not rows:
            raise PipelineError(f"{prefs_dir / split_file(split)}: no {what} (rerun `dvc repro prepare_prefs`)")
        # KTOTrainer reads rows in order and takes each row's KL sample from its neighbour: a seeded
        # shuffle of every split mixes good and bad replies and keeps a pair's two replies apart.
        if params.method == "kto":
            rows = unpaired(rows, seed=params.seed)
        pairs[split], dropped = fitting(rows, tokenizer, params.max_length)
        too_long += dropped
        if not pairs[split]:
            raise PipelineError(f"dpo.max_length: {params.max_length} tokens leaves no {split} {what}")
        if params.method == "kto" and len({row["label"] for row in pairs[split]}) < 2:
            raise PipelineError(f"dpo.max_length: {params.max_length} tokens leaves no "
                                f"{'bad' if pairs[split][0]['label'] else 'good'} {split} replies (KTO needs both)")
    return pairs, too_long


def _start_model(params: DpoParams, base_dir: Path, adapter_dir: Path):
    """(weights DPO starts from, which are also its reference, their description)."""
    from ftpipe import models

    if params.init_from == "base":
        return models.load_model(base_dir), "base"
    if not models.has_finetuned(adapter_dir):
        raise PipelineError(f"{adapter_dir}: no SFT model found for dpo.init_from: sft (run the train stage)")
    model = models.load_finetuned(base_dir, adapter_dir)
    if hasattr(model, "peft_config"):  # prompt-learning adapters cannot be merged (params refuse it too)
        raise PipelineError("dpo.init_from: sft needs a train method that merges into the weights (or use base)")
    config = adapter_dir / TRAIN_CONFIG_NAME
    return model, f"sft ({read_json(config)['params']['method']})" if config.is_file() else "sft"


def _margin(model, tokenizer, pairs, params: DpoParams) -> float:
    """dpo: the mean log-probability margin of chosen over rejected; kto: good replies' mean minus bad ones'."""
    from ftpipe.dpo import label_margin, logp_margin

    model.eval()
    margin = label_margin if params.method == "kto" else logp_margin
    return margin(model, tokenizer, pairs, batch_size=params.batch_size)


def _setup_trainer(params: DpoParams, start, tokenizer, pairs, checkpoints: Path, bf16: bool,
                   live_run: live.LiveRun | None):
    """dpo: the project's DPO trainer (ftpipe.dpo_trainer) on the start weights in a LoRA adapter, which
    with the adapter off are the reference; kto: TRL's KTOTrainer with the adapter as `peft_config`."""
    import torch
    from trl import KTOTrainer

    from ftpipe import dpo_trainer
    from ftpipe.callbacks import DPO_KEYS, final_step_callback, live_metrics_callback
    from ftpipe.dpo import arguments, kto_arguments, lora_config, to_kto_dataset

    callbacks = [final_step_callback()]
    if live_run:  # tokens/s from the trainer's own count of the batches' tokens
        callbacks.append(live_metrics_callback(live_run, keys=DPO_KEYS))
    cuda = torch.cuda.is_available()
    if params.method == "kto":
        return KTOTrainer(model=start, args=kto_arguments(params, output_dir=checkpoints, bf16=bf16, cuda=cuda),
                          train_dataset=to_kto_dataset(pairs["train"]), eval_dataset=to_kto_dataset(pairs["val"]),
                          processing_class=tokenizer, peft_config=lora_config(params), callbacks=callbacks)
    encoded = _encoded(tokenizer, pairs)
    return dpo_trainer.trainer_class(params)(
        model=dpo_trainer.policy_model(params, start, bf16=bf16), train_dataset=encoded["train"],
        args=arguments(params, output_dir=checkpoints, bf16=bf16, cuda=cuda),
        eval_dataset=encoded["val"], data_collator=dpo_trainer.PairCollator(tokenizer), callbacks=callbacks)


def _encoded(tokenizer, pairs) -> dict[str, list[dict[str, Any]]]:
    """The train and val pairs encoded for ftpipe.dpo_trainer, with uids unique across the splits (the
    test pairs' follow: _test_metrics)."""
    from ftpipe.dpo_trainer import encode_pairs

    return {split: encode_pairs(tokenizer, pairs[split], first_uid=_first_uid(pairs, split)) for split in ("train", "val")}


def _first_uid(pairs, split: str) -> int:
    """Where a split's pair uids start: after the splits before it (SPLITS order), so that the trainer's
    kept reference log-probabilities, keyed by uid, never mix two splits' pairs."""
    return sum(len(pairs[s]) for s in SPLITS[:SPLITS.index(split)])


def _merged(params: DpoParams, base_dir: Path, adapter_dir: Path, adapter: Path):
    """The start weights as the stage loads them with the trained adapter merged in."""
    from peft import PeftModel

    start, _ = _start_model(params, base_dir, adapter_dir)
    return PeftModel.from_pretrained(start, adapter.resolve()).merge_and_unload()


def _test_metrics(trainer, pairs, params: DpoParams, tokenizer) -> dict[str, float | None]:
    """DPO loss, reward accuracy and margin on the held-out pairs (named eval_* whatever the prefix, as
    TRL names them); kto: KTO loss and reward margin (no accuracy: its replies are not paired; no
    margin when no batch held good and bad replies)."""
    from ftpipe.dpo import REWARD_ACCURACY, REWARD_MARGIN, to_kto_dataset
    from ftpipe.dpo_trainer import encode_pairs

    kto = params.method == "kto"
    test = to_kto_dataset(pairs["test"]) if kto else \
        encode_pairs(tokenizer, pairs["test"], first_uid=_first_uid(pairs, "test"))
    found = trainer.evaluate(test, metric_key_prefix="test")
    wanted = {"loss": "test_loss", "accuracy": f"eval_{REWARD_ACCURACY}", "margin": f"eval_{REWARD_MARGIN}"}
    required = ["test_loss"] if kto else list(wanted.values())
    missing = [key for key in required if key not in found]
    if missing:
        raise PipelineError(f"dpo: the evaluation returned no {missing[0]} (keys: {', '.join(sorted(found))})")
    return {name: found.get(key) for name, key in wanted.items()}


def _report(params: DpoParams, trainer, pairs, test: dict[str, float], model, *, start: str, before: float,
            runtime: float, bf16: bool, too_long: int, live_run_id: str | None, resumed_from_step: int) -> DpoReport:
    from ftpipe import models
    from ftpipe.dpo import curves

    train_curve, val_curve = curves(trainer.state.log_history)
    total, trainable = models.count_parameters(model)
    return DpoReport(
        enabled=True, start=start, method=params.method,
        loss_type="kto" if params.method == "kto" else params.loss_type, beta=params.beta, steps=trainer.state.global_step,
        epochs=round(trainer.state.epoch or 0.0, 3), pairs={**{s: len(p) for s, p in pairs.items()},
                                                             "too_long": too_long},
        train_loss_final=train_curve[-1][1] if train_curve else None,
        val_loss_final=val_curve[-1]["loss"] if val_curve else None,
        test_loss=test["loss"], test_reward_accuracy=test["accuracy"], test_reward_margin=test["margin"],
        train_curve=[{"step": step, "loss": loss} for step, loss in train_curve], val_curve=val_curve,
        test_logp_margin_before=before,  # and after: set once the merged model is built
        runtime_s=round(runtime, 1), precision="bf16" if bf16 else "fp32", parameters=total,
        trainable_parameters=trainable, live_run_id=live_run_id, resumed_from_step=resumed_from_step,
    )


def _save(params: DpoParams, merged, tokenizer, report: DpoReport, out_dir: Path) -> None:
    """Beside the adapter: the merged model evaluate and register load, the report's loss curves as a
    PNG, and what produced them."""
    from ftpipe import models
    from ftpipe.plots import plot_losses

    merged.save_pretrained(out_dir / models.MERGED, safe_serialization=True)
    tokenizer.save_pretrained(out_dir / models.MERGED)
    plot_losses([(p["step"], p["loss"]) for p in report.train_curve], [(v["step"], v["loss"]) for v in report.val_curve],
                out_dir / DPO_LOSS_PLOT_NAME, ylabel=f"{params.method.upper()} loss")
    write_json(out_dir / TRAIN_CONFIG_NAME, {"params": params.model_dump(), "summary": report.model_dump(mode="json")})
    write_json(out_dir / DPO_MANIFEST, {"enabled": True, "start": report.start})


def main() -> None:
    params = load_section("dpo", DpoParams)
    report = run(params=params, base_dir=BASE_DIR, adapter_dir=ADAPTER_DIR, prefs_dir=PREFS_DIR, out_dir=DPO_DIR,
                 report_path=DPO_REPORT, live_to=live.target(params.live_metrics and params.enabled))
    if not report.enabled:
        print("dpo: dpo.enabled is false, nothing trained")
        return
    logp = f"{report.test_logp_margin_before:+.3f} -> {report.test_logp_margin_after:+.3f} -> {DPO_DIR}"
    if report.method == "kto":
        print(f"dpo: {report.steps} kto steps from {report.start}; test replies: loss {report.test_loss:.4f}; "
              f"log-prob margin good - bad {logp}")
        return
    print(f"dpo: {report.steps} steps from {report.start}; test pairs: reward accuracy {report.test_reward_accuracy:.3f}, "
          f"margin {report.test_reward_margin:+.4f}; log-prob margin {logp}")


if __name__ == "__main__":
    run_cli(main)
