"""The training library of the train stage: row encoding, the response-only loss, the Trainer
subclass (packing, divergence checks, per-block learning rates), its arguments, checkpoints.

stages/train.py reads as the plan (data, model, trainer, train, write); tests and bench/ import the
pieces from here. Training on several processes: launch() starts them under torchrun, is_worker()
and rank() tell a process where it stands.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ftpipe.errors import PipelineError
from ftpipe.io import read_json
from ftpipe.params import TrainParams
from ftpipe.paths import MANIFEST_NAME, split_file
from ftpipe.schedule import checkpoint_folder_key

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
    largest matmul) is wasted work; skipping it is most of the speed-up on short chat turns. The
    model's own forward picks the positions (`logits_to_keep` as a boolean mask: the logits of the
    kept positions only, in row-major order), so its own output head runs, and a
    DistributedDataParallel wrapper, which syncs gradients only for a forward that goes through it,
    sees the whole computation. (Asking for the last position's logits and projecting the hidden
    states here instead also ran the output head once more per step, as a batched matmul over a
    broadcast copy of the 49k x 576 output matrix: the train stage ran 5-9 % slower that way.)
    With train.fused_loss the head's forward hands back the kept positions' hidden states and
    ftpipe.kernels.linear_cross_entropy does its matmul with the loss, in chunks: the head's weight
    is then used after DDP's forward, which is fine as long as DDP does not look for unused
    parameters in that forward (training_arguments: ddp_find_unused_parameters=False).
    """
    import torch

    from ftpipe import kernels
    from ftpipe.chat import IGNORE_INDEX

    inner = getattr(model, "module", model)  # the model inside a DistributedDataParallel wrapper
    mask = attention_inputs(inner, inputs)
    targets = inputs["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    positions = torch.zeros_like(inputs["labels"], dtype=torch.bool)
    positions[:, :-1] = keep  # position t predicts token t + 1
    by_mask = takes_position_mask(inner)
    head = kernels.fused_loss_head(inner) if by_mask else None
    if head is not None:  # the head's matmul and the cross-entropy as one function, in chunks (ftpipe.kernels)
        with kernels.head_skipped(head):
            hidden = model(input_ids=inputs["input_ids"], use_cache=False, logits_to_keep=positions, **mask).logits
        loss = kernels.linear_cross_entropy(hidden, head.weight, targets[keep])
    else:
        if by_mask:
            logits = model(input_ids=inputs["input_ids"], use_cache=False, logits_to_keep=positions, **mask).logits
        else:  # the hidden states after the final norm, projected here
            outputs = model(input_ids=inputs["input_ids"], use_cache=False, output_hidden_states=True,
                            logits_to_keep=1, **mask)
            logits = inner.get_output_embeddings()(outputs.hidden_states[-1][positions])
        loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    return loss / count


def attention_inputs(model, inputs: dict[str, Any]) -> dict[str, Any]:
    """The mask arguments of the model's forward for a padded or a packed batch (ftpipe.packing: each
    row sees its own tokens and the shared prefix; per-row attention blocks where the model runs
    ftpipe.kernels' packed_rows)."""
    from ftpipe import kernels, packing

    if "segments" not in inputs:
        return {"attention_mask": inputs["attention_mask"]}
    kernel = model.config._attn_implementation
    mask = {"attention_mask": packing.attention_mask(inputs["segments"], kernel=kernel),
            "position_ids": inputs["position_ids"]}
    blocks = packing.row_blocks(inputs["segments"]) if kernel == kernels.PACKED_ATTENTION else None
    if blocks is not None:  # attention per row (ftpipe.kernels); the mask serves any other path
        mask["row_blocks"] = blocks
    return mask


def takes_position_mask(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` as a boolean mask of positions: those whose
    module slices through transformers' slice_logits_to_keep (all but a few of transformers 5.23's
    model classes; the others take only a count of last positions)."""
    import sys

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # inside a peft wrapper
    # The classes above it too: FSDP2 puts a class of its own, from torch's modules, on top.
    return any(hasattr(sys.modules.get(cls.__module__), "slice_logits_to_keep") for cls in type(base).__mro__)


# Adapter methods with a frozen fp32 base. Not full (gradual unfreezing would hand bf16 weights to
# the optimizer), not qlora (prepare_model_for_kbit_training keeps its norms in fp32 on purpose),
# not the prompt-learning methods (fp32 virtual tokens are concatenated with the word embeddings).
BF16_STORAGE_METHODS = ("lora", "dora", "ia3", "bottleneck")


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

    def __init__(self, what: str, value: float, step: int, learning_rate: float, stage: str = "train"):
        super().__init__(f"{stage}: {what} is {value} at step {step} (learning_rate {learning_rate:g}): "
                         f"training diverged; lower {stage}.learning_rate")


def stop_if_diverged(trainer, loss, learning_rate: float, stage: str) -> None:
    """Diverged on a batch loss that is not finite (train's and dpo's Trainers check every batch: the
    logged loss hides a non-finite one, logging_nan_inf_filter). A training batch belongs to the step
    being taken, an evaluation batch to the last one."""
    import torch

    if not torch.isfinite(loss.detach()).all():
        what, step = ("loss", trainer.state.global_step + 1) if trainer.model.training else \
            ("validation loss", trainer.state.global_step)
        raise Diverged(what, loss.item(), step, learning_rate, stage)


def stop_if_logged_diverged(trainer, logs: dict, learning_rate: float, stage: str) -> None:
    """Diverged on a logged gradient norm or validation loss that is not finite. The gradient norm is
    seen only here (every logging_steps); a non-finite one also turns the weights non-finite, so the
    next batch's loss check stops the run in any case."""
    for key, what in (("grad_norm", "gradient norm"), ("eval_loss", "validation loss")):
        if key in logs and not math.isfinite(logs[key]):
            raise Diverged(what, logs[key], trainer.state.global_step, learning_rate, stage)


def trainer_class(params: TrainParams, bf16: bool):
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

        def _get_train_sampler(self, train_dataset=None):
            rows = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return global_length_grouped_sampler(train_dataset or self.train_dataset, self.args, rows)

        def _get_eval_sampler(self, eval_dataset):
            return global_length_grouped_sampler(eval_dataset, self.args, self.args.eval_batch_size)

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
                # Autocast here, over the forward and the vocabulary matmul after it: training_arguments
                # leaves the Trainer's own autocast (model.forward only) off for this loss.
                device = "cuda" if torch.cuda.is_available() else "cpu"
                with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                    loss = response_only_loss(model, inputs, num_items_in_batch)
                if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                    # num_items_in_batch counts every process's tokens and data parallel training
                    # averages the processes' gradients: scaled so the gradient is the whole batch's
                    # mean, as Trainer.compute_loss does for the model's own loss.
                    loss = loss * self.accelerator.num_processes
                result = (loss, {"loss": loss}) if return_outputs else loss
            # logging_nan_inf_filter's own check already syncs on each training batch's loss, so
            # this adds no sync in training.
            stop_if_diverged(self, result[0] if return_outputs else result, params.learning_rate, "train")
            return result

        def log(self, logs, *args, **kwargs):
            stop_if_logged_diverged(self, logs, params.learning_rate, "train")
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


def global_length_grouped_sampler(dataset, args, rows: int):
    """Rows grouped by length into batches of `rows` per process (one optimizer step's, or one
    evaluation batch's) times the processes, in an order drawn from the seed and the epoch only.

    accelerate deals a sampler's per-process batches out in turn (process p takes batches p, p + N,
    ...), so the N processes' batches of a step together make the step's batch of the same order
    with one process. Grouped by each process's own batch instead, or shuffled from a generator
    that accelerate seeds anew, the rows, and so the training curve, would change with the number
    of processes."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

    seed = args.data_seed if args.data_seed is not None else args.seed

    class Sampler(LengthGroupedSampler):
        epoch = 0

        def set_epoch(self, epoch: int) -> None:  # the Trainer calls it before each training epoch
            self.epoch = epoch

        def __iter__(self):
            generator = torch.Generator().manual_seed(seed + self.epoch)
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))

    # A generator of its own (unused): accelerate would otherwise seed one from the global RNG.
    return Sampler(rows * args.world_size, dataset=dataset, generator=torch.Generator())


def checkpoint_key(params: TrainParams, base_dir: Path, data_dir: Path) -> str:
    """Hash of everything a checkpoint depends on (params, base, data, the training code and its
    libraries), so a stale one is never resumed."""
    from ftpipe import bottleneck, kernels, methods, packing, schedule
    from ftpipe.models import sha256_of

    inputs = {
        "params": params.model_dump(),
        "base": read_json(base_dir / MANIFEST_NAME),
        "data": {name: sha256_of(data_dir / name) for name in (split_file("train"), split_file("val"))},
    }
    code = [Path(module.__file__) for module in (bottleneck, kernels, methods, packing, schedule)] + [Path(__file__)]
    return checkpoint_folder_key(inputs, code=code, libraries=("torch", "transformers", "peft"))


def optimizer_name(params: TrainParams, *, cuda: bool) -> str:
    if params.method == "qlora" and cuda:
        # Paged optimizer states spill to CPU memory under GPU memory pressure: a CUDA-only feature.
        return "paged_adamw_8bit"
    # On CPU torch's fused AdamW: one kernel per parameter instead of about ten operations (240 LoRA
    # tensors: 2 ms a step instead of 10). CUDA keeps the default, the path measured there.
    return "adamw_torch" if cuda else "adamw_torch_fused"


# FSDP through the Trainer (TrainingArguments.fsdp_config; these are transformers' defaults, spelled
# out): FSDP2, each decoder block sharded as a unit, weights resharded after each block's forward,
# checkpoints with the full weights so a resume or a reader needs no sharding.
FSDP_CONFIG = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
               "state_dict_type": "FULL_STATE_DICT"}


def training_arguments(params: TrainParams, *, output_dir: Path, bf16: bool, optim: str, cuda: bool):
    """The Trainer's arguments: the schedule shared with dpo (ftpipe.schedule), then the train stage's own."""
    from transformers import TrainingArguments

    from ftpipe import methods
    from ftpipe.schedule import trainer_arguments

    return trainer_arguments(
        params, TrainingArguments, output_dir=output_dir, cuda=cuda,
        bf16=bf16 and not methods.response_only_ok(params.method),  # else autocast in compute_loss
        optim=optim,  # optimizer_name: paged 8-bit AdamW for qlora on CUDA, the fused AdamW on CPU
        activation_checkpointing=params.gradient_checkpointing,
        save_steps=params.save_steps,  # checkpoints/train/<key>/, so an interrupted run resumes
        weight_decay=params.weight_decay,
        save_total_limit=1,  # plus the best one when early stopping keeps it
        load_best_model_at_end=bool(params.early_stopping_patience),
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        # Batches of similar length waste less compute on padding.
        train_sampling_strategy="group_by_length",
        remove_unused_columns=False,
        prediction_loss_only=True,
        # Several processes (DDP): every trainable weight takes part in every step's loss, so DDP need
        # not search the autograd graph for unused ones at each step. Also what lets the fused loss
        # use the output head's weight after DDP's forward (response_only_loss): a search would call
        # an untied trainable head unused there and fail when its gradient arrives.
        ddp_find_unused_parameters=False,
        fsdp=params.distributed == "fsdp",
        fsdp_config=dict(FSDP_CONFIG) if params.distributed == "fsdp" else None,
    )


def loss_curves(log_history: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, training loss) and (step, validation loss) from the Trainer's log history."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    return train, val


def curve_csv(curve: list[tuple[int, float]]) -> str:
    return "step,loss\n" + "".join(f"{step},{loss:.6f}\n" for step, loss in curve)


# torchrun's shutdown of the other processes after one failed, or after a SIGTERM: SIGTERM, then
# SIGKILL after 30 s (torch.distributed.elastic's default); the launcher waits that long and more.
STOP_TIMEOUT_S = 60


def is_worker() -> bool:
    """Whether this process is one of several started by torchrun (which sets LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def rank() -> int:
    """This process's rank among the training processes; 0 when training alone."""
    return int(os.environ.get("RANK", "0"))


def check_worker(params: TrainParams) -> None:
    """train.run trains in the calling process, which must be one of `processes` processes."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if is_worker() else 1
    if world == 1 and params.processes > 1:
        raise PipelineError(f"train.processes: {params.processes}, but train.run trains in this one process; "
                            "`python -m stages.train` launches the processes")
    if world != params.processes:
        raise PipelineError(f"train.processes: {params.processes}, but torchrun started {world} processes; "
                            "`python -m stages.train` launches them itself")


def check_machine(params: TrainParams) -> None:
    """processes and distributed against this machine, before anything starts (imports torch)."""
    import torch

    from ftpipe import models

    if torch.cuda.is_available():
        have, what = torch.cuda.device_count(), "GPUs"
    else:
        have, what = models.cpu_cores(), "CPU cores"
        if params.distributed == "fsdp":
            # accelerate 1.15 turns FSDP on for GPU-like devices only (AcceleratorState); with CPU
            # processes the Trainer's fsdp option goes unused and it trains with DDP, without a word.
            raise PipelineError("train.distributed: fsdp needs CUDA (accelerate runs FSDP on GPUs only: on CPU the "
                                "Trainer would silently train with DDP); use ddp on CPU")
    if params.processes > have:
        raise PipelineError(f"train.processes: {params.processes} is more than the {have} {what} of this machine")


def launch(params: TrainParams, *, module: str) -> None:
    """Run `python -m <module>` under torchrun as params.processes processes on this machine only
    (its rendezvous and gloo/NCCL traffic on the loopback interface) and wait for it. A SIGTERM or
    Ctrl-C here stops them all; so does this process's death (Linux: the parent-death signal)."""
    from ftpipe import models

    check_machine(params)
    threads = models.threads_per_process(params.threads, params.processes)
    env = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo", **os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(params.processes),
               "--max-restarts", "0", "-m", module]
    # A session of its own: Ctrl-C reaches this process only, which stops torchrun once, in order.
    proc = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_parent_death_signal())
    try:
        code = proc.wait()
    finally:
        if proc.poll() is None:
            _stop(proc)
    if code:
        raise PipelineError(f"train: {params.processes} training processes under torchrun failed (exit code {code}); "
                            "the failing process's error is printed above")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to torchrun, which passes it to the training processes (they remove their temporary
    outputs and exit) and kills those still running after 30 s; SIGKILL if it outlives that."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _parent_death_signal():
    """A preexec_fn asking Linux to send the child SIGTERM when this process dies (even by SIGKILL),
    so torchrun never outlives the stage; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only calls prctl
    pr_set_pdeathsig = 1
    return lambda: libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
