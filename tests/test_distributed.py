"""train on several processes: `processes: 2` runs the stage under torchrun (DDP over gloo on CPU)
and trains exactly as one process with twice the batch; one process writes the outputs; a killed
process fails the stage quickly, a SIGTERM stops every process, and a rerun resumes."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from conftest import set_param, stage, stage_env, tiny_params

from ftpipe import models, trainer
from ftpipe.errors import EXIT_USER_ERROR, PipelineError
from ftpipe.params import PrepareBaseParams, PrepareDataParams, TrainParams, load_section
from ftpipe.paths import ADAPTER_DIR, BASE_DIR, PARAMS, PREPARED_DIR, REPORTS, TRAIN_LOSS, TRAIN_REPORT, VAL_LOSS
from ftpipe.schemas import TrainReport
from stages import train

# fp32 (pinned) on both sides; the runs differ only in summation order (the processes' gradients
# are averaged by an all-reduce; each process pads and packs its own rows), about 1e-7 relative on
# the losses and 4e-6 of a tensor's largest weight measured after 6 steps (lr 5e-3: updates up to
# about 3e-2); a wrong row order or loss scale moves the losses by 1e-3 to 0.5.
LOSS_RTOL = 1e-5
WEIGHT_RTOL, WEIGHT_ATOL = 1e-4, 1e-5
# torchrun notices a dead process within 0.1 s and stops the others (SIGTERM, SIGKILL after 30 s).
KILLED_RUN_FAILS_WITHIN_S = 60


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# The launch tests count CPU cores and use gloo: a GPU machine runs one process per GPU over NCCL.
cpu_only = pytest.mark.skipif(cuda(), reason="CPU processes (gloo); with CUDA the stage takes one process per GPU")


@pytest.fixture(scope="module")
def prepared_dirs(tmp_path_factory, tiny_model_dir, tiny_data) -> tuple[Path, Path]:
    """models/base and data/prepared for the tiny project, made once, in this process (faster)."""
    from stages import prepare_base, prepare_data

    tmp = tmp_path_factory.mktemp("distributed-inputs")
    cfg = tiny_params(tiny_model_dir, tiny_data)
    prepare_base.run(params=PrepareBaseParams(**cfg["prepare_base"]), out_dir=tmp / "base")
    prepare_data.run(params=PrepareDataParams(**cfg["prepare_data"]), out_dir=tmp / "prepared", reports_dir=tmp / "r")
    # Data parallel evaluation pads the validation rows to a multiple of processes x batch with
    # repeated rows, which one process does not count: a multiple of 4 rows compares like with like.
    val = tmp / "prepared" / "val.jsonl"
    rows = val.read_text().splitlines(keepends=True)
    val.write_text("".join(rows[: len(rows) // 4 * 4]))
    return tmp / "base", tmp / "prepared"


@pytest.fixture
def ready(project, prepared_dirs) -> Path:
    """The tiny project with its base model and data prepared: ready to train."""
    base, data = prepared_dirs
    shutil.copytree(base, project / BASE_DIR)
    shutil.copytree(data, project / PREPARED_DIR)
    return project


def set_train(project: Path, **values) -> None:
    for key, value in values.items():
        set_param(project, "train", key, value)


def curve(path: Path) -> list[tuple[int, float]]:
    return [(int(step), float(loss)) for step, loss in (row.split(",") for row in path.read_text().splitlines()[1:])]


@cpu_only
def test_two_processes_train_as_one_process_with_twice_the_batch(ready, tmp_path):
    """Through the real launch path (the stage under torchrun), against train.run in this process."""
    import torch
    from safetensors.torch import load_file

    set_train(ready, precision="fp32", max_steps=6, eval_steps=3, logging_steps=1, save_steps=0,
              processes=2, batch_size=2)
    result = stage(ready, "train")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("train: 6 steps") == 1  # process 0 alone prints
    assert not [p for p in ready.rglob("*") if ".tmp-" in p.name]
    two = TrainReport.read(ready / TRAIN_REPORT)
    assert two.steps == 6 and two.precision == "fp32" and two.packing

    params = load_section("train", TrainParams, ready / PARAMS).model_copy(update={"processes": 1, "batch_size": 4})
    one = train.run(params=params, base_dir=ready / BASE_DIR, data_dir=ready / PREPARED_DIR,
                    out_dir=tmp_path / "adapter", reports_dir=tmp_path / "reports", checkpoint_root=tmp_path / "ckpt")
    assert one.steps == 6 and one.packing
    for name in (TRAIN_LOSS.name, VAL_LOSS.name):
        apart, together = curve(tmp_path / "reports" / name), curve(ready / REPORTS / name)
        assert [step for step, _ in together] == [step for step, _ in apart], name
        print(f"{name}: max relative difference {max(abs(a / b - 1) for (_, a), (_, b) in zip(together, apart)):.1e}")
        assert [loss for _, loss in together] == pytest.approx([loss for _, loss in apart], rel=LOSS_RTOL), name
    expected = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    got = load_file(ready / ADAPTER_DIR / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    diffs = [((got[k] - w).abs().max().item(), w.abs().max().item()) for k, w in expected.items()]
    print(f"adapter weights: max difference {max(d for d, _ in diffs):.1e}, "
          f"{max(d / m for d, m in diffs):.1e} of the tensor's largest weight")
    for name, weight in expected.items():
        torch.testing.assert_close(got[name], weight, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=name)


def workers(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """The stage's training processes (torchrun's children) by rank, once all have started."""
    found = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "RANK" in child.environ() and "stages.train" in child.cmdline():
                found[int(child.environ()["RANK"])] = child
        except psutil.NoSuchProcess:
            pass
    return found


def start_until_checkpoint(project: Path) -> tuple[subprocess.Popen, dict[int, psutil.Process]]:
    """Start the 2-process stage and return once a complete checkpoint exists."""
    proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=project, env=stage_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(project.glob("checkpoints/train/*/checkpoint-*/trainer_state.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    ranks = workers(proc)
    assert sorted(ranks) == [0, 1]
    return proc, ranks


def assert_no_output_and_all_gone(project: Path, proc: subprocess.Popen, ranks: dict[int, psutil.Process]) -> None:
    _, alive = psutil.wait_procs(list(ranks.values()), timeout=10)
    assert not alive and proc.poll() is not None, f"training processes still running: {alive}"
    assert not (project / ADAPTER_DIR).exists() and not (project / TRAIN_REPORT).exists()
    assert not [p for p in project.rglob("*") if ".tmp-" in p.name]  # no temporary output left behind


@cpu_only
def test_a_killed_process_fails_the_stage_quickly_and_a_rerun_resumes(ready):
    project, steps = ready, 40
    set_train(ready, processes=2, batch_size=2, max_steps=steps, save_steps=5, eval_steps=20, logging_steps=5)
    proc, ranks = start_until_checkpoint(project)
    killed = time.monotonic()
    ranks[1].send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=KILLED_RUN_FAILS_WITHIN_S)
    elapsed = time.monotonic() - killed
    print(f"stage failed {elapsed:.1f} s after one process was killed")
    assert proc.returncode == EXIT_USER_ERROR and elapsed < KILLED_RUN_FAILS_WITHIN_S
    assert stderr.rstrip().splitlines()[-1].startswith("error: train: 2 training processes under torchrun failed")
    assert_no_output_and_all_gone(project, proc, ranks)

    rerun = stage(project, "train")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("train: resuming from checkpoints/train/") == 1
    summary = TrainReport.read(project / TRAIN_REPORT)
    assert summary.steps == steps and 5 <= summary.resumed_from_step < steps
    logged = [int(line.split(",")[0]) for line in (project / TRAIN_LOSS).read_text().splitlines()[1:]]
    assert logged == list(range(5, steps + 1, 5))
    assert (project / ADAPTER_DIR / "merged" / "model.safetensors").is_file()
    assert not (project / "checkpoints" / "train").exists()  # removed with any stale key


@cpu_only
def test_sigterm_to_the_stage_stops_every_process(ready):
    set_train(ready, processes=2, batch_size=2, max_steps=400, save_steps=2, eval_steps=200, logging_steps=5)
    proc, ranks = start_until_checkpoint(ready)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=trainer.STOP_TIMEOUT_S + 10)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    # The stage and its training processes each unwound (temporary outputs removed) and said so.
    assert stderr.count("error: terminated by SIGTERM; previous outputs kept") >= 2
    assert_no_output_and_all_gone(ready, proc, ranks)
    assert list(ready.glob("checkpoints/train/*/checkpoint-*/trainer_state.json"))  # kept for a rerun to resume


def test_rows_of_a_step_are_the_same_with_any_number_of_processes():
    """accelerate deals each process the sampler's batches in turn (BatchSamplerShard): together the
    processes' batches of a step are the one-process step's rows, in every epoch and after a resume."""
    import random

    import torch
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler
    from transformers.trainer_pt_utils import LengthGroupedSampler

    rng = random.Random(0)
    rows = [{"input_ids": [0] * rng.randint(20, 120)} for _ in range(2000)]  # about the chatterbot split's size

    def ours(processes: int, batch: int):
        args = SimpleNamespace(world_size=processes, data_seed=42, seed=42)
        return trainer.global_length_grouped_sampler(rows, args, batch)

    def per_process(processes: int, batch: int):  # the Trainer's own: grouped by one process's batch
        return LengthGroupedSampler(batch, dataset=rows, generator=torch.Generator().manual_seed(42))

    def step_rows(sampler_for, processes: int, batch: int, epoch: int = 0) -> list[list[int]]:
        sampler = sampler_for(processes, batch)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        shards = [list(BatchSamplerShard(BatchSampler(sampler, batch, drop_last=False), num_processes=processes,
                                         process_index=p)) for p in range(processes)]
        return [sorted(i for shard in shards for i in shard[step]) for step in range(len(shards[0]))]

    for epoch in (0, 1):
        one = step_rows(ours, 1, 16, epoch)
        assert step_rows(ours, 2, 8, epoch) == one and step_rows(ours, 4, 4, epoch) == one
        assert sorted(i for step in one for i in step) == list(range(len(rows)))
    assert step_rows(ours, 1, 16, 0) != step_rows(ours, 1, 16, 1)  # a new order each epoch
    assert step_rows(per_process, 2, 8) != step_rows(per_process, 1, 16)  # other mega-batches, other steps


def test_threads_share_the_cores_between_processes():
    cores = models.cpu_cores()
    assert models.threads_per_process(0, 1) == 0  # torch's default
    assert models.threads_per_process(0, 2) == max(1, cores // 2)
    assert models.threads_per_process(0, 4 * cores) == 1
    assert models.threads_per_process(3, 2) == 3  # train.threads is per process


@pytest.mark.parametrize(("values", "message"), [
    ({"processes": 0}, r"params.yaml:\d+: train\.processes: Input should be greater than or equal to 1$"),
    ({"distributed": "fsdp"}, r"params.yaml:\d+: train\.distributed: fsdp shards the model across processes"),
    ({"processes": 2, "distributed": "fsdp", "method": "qlora", "quantization": "int8"},
     r"params.yaml:\d+: train\.distributed: fsdp does not shard qlora's quantized base weights"),
    ({"processes": 2, "method": "full", "gradual_unfreezing": True}, r"params.yaml:\d+: train\.gradual_unfreezing: "),
])
def test_invalid_distributed_settings_fail_at_params_time(tmp_path, values, message):
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": values}))
    with pytest.raises(PipelineError, match=message):
        load_section("train", TrainParams, path)


@cpu_only
@pytest.mark.parametrize(("values", "error"), [
    ({"processes": models.cpu_cores() + 1},
     f"train.processes: {models.cpu_cores() + 1} is more than the {models.cpu_cores()} CPU cores of this machine"),
    ({"processes": 2, "distributed": "fsdp"}, "train.distributed: fsdp needs CUDA (accelerate runs FSDP on GPUs only: "
                                              "on CPU the Trainer would silently train with DDP); use ddp on CPU"),
])
def test_what_this_machine_cannot_run_fails_before_launching_naming_the_key(project, values, error):
    set_train(project, **values)
    result = stage(project, "train")
    assert result.returncode == EXIT_USER_ERROR
    assert result.stderr.strip().splitlines() == [f"error: {error}"]


def test_run_refuses_several_processes_outside_torchrun(tmp_path):
    params = TrainParams(processes=2)
    with pytest.raises(PipelineError, match=r"^train\.processes: 2, but train\.run trains in this one process; "):
        train.run(params=params, base_dir=tmp_path, data_dir=tmp_path, out_dir=tmp_path / "a", reports_dir=tmp_path)
