"""Benchmark: the whole pipeline on a bigger model, stage by stage, with nothing downloaded.

Builds a randomly initialised Llama-architecture model from a config (`--model 1b`: about 1.0 B
parameters, stored in bf16 as such models are published; `tiny` for a quick check; `smollm2`: the
embedded base), with the SmolLM2 tokenizer from the embedded GGUF, as a local base folder. Then runs
every stage through DVC (`dvc repro --single-item`, as the flows do) in a fresh project made from
this one (its code, dvc.yaml, params.yaml and DVC config), with few steps and examples, and prints
per stage: seconds, peak resident memory of the stage's processes, peak GPU memory (nvidia-smi,
where present), the device the stage's report says it ran on; then the disk the project holds
(models/, DVC's cache, MLflow's store; a file linked twice counted once). Targets (LoRA): no stage's
peak memory above 3x the model's bf16 size, and the project's disk at most 5x it.
`--device cpu` hides CUDA from the stages (CUDA_VISIBLE_DEVICES=""): the CPU check of the GPU path.
Run: .venv/bin/python -m bench.bench_scale --model 1b [--device auto|cpu] [--work DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from ftpipe.paths import METRICS, PARAMS, QUANTIZE_REPORT, SCORERS, TRAIN_REPORT

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("validate", "prepare_base", "prepare_data", "quantize", "prepare_prefs", "prepare_parent", "train", "dpo",
          "score_base", "evaluate", "export", "register")
# Llama shapes: 1b is SmolLM2-1.7B's width with fewer layers (about 1.0 B parameters with the 49k
# vocabulary, tied embeddings); tiny checks the benchmark itself in a minute.
SHAPES = {
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 20, "num_attention_heads": 32,
           "num_key_value_heads": 8},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2},
}
# Few steps and examples: the point is memory, disk and where each stage runs, not quality.
OVERRIDES = {
    "prepare_data": {"max_tokens": 128},
    "quantize": {"variants": [], "pruned": []},
    "train": {"method": "lora", "max_steps": 4, "batch_size": 4, "max_length": 128, "eval_steps": 4,
              "logging_steps": 2, "save_steps": 0},
    "evaluate": {"max_examples": 8, "max_new_tokens": 16, "batch_size": 8, "general_max_length": 256,
                 "general_stride": 128},
    "export": {"gguf": ["q8_0"], "prompts": 2, "max_new_tokens": 8},
    "register": {"experiment": "scale-bench", "model_name": "scale-bench"},
}


def synthetic_base(shape: str, out: Path) -> dict[str, Any]:
    """A random-weight Llama model of `shape` with the embedded SmolLM2 tokenizer, saved in bf16."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ftpipe import models

    gguf = models.embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"parameters": sum(p.numel() for p in model.parameters()), "bf16_bytes": _bytes(out, "*.safetensors")}


def make_project(proj: Path, base: Path | None) -> None:
    """This project's pipeline in `proj` (git + DVC), its params cut to the benchmark's steps."""
    proj.mkdir(parents=True)
    for name in ("ftpipe", "stages", "flows", str(SCORERS)):
        shutil.copytree(ROOT / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", proj / "dvc.yaml")
    (proj / "data" / "raw").mkdir(parents=True)
    (proj / "data" / "raw" / ".gitkeep").touch()
    params = yaml.safe_load((ROOT / PARAMS).read_text())
    for section, values in OVERRIDES.items():
        params[section].update(values)
    if base is not None:
        params["prepare_base"].update(source="local", path=str(base))
    (proj / PARAMS).write_text(yaml.safe_dump(params, sort_keys=False))
    (proj / ".gitignore").write_text("mlruns.db\nmlartifacts/\n")
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=proj, check=True)
    shutil.copy(ROOT / ".dvc" / "config", proj / ".dvc" / "config")  # the shipped cache links
    subprocess.run(git + ["add", "-A"], cwd=proj, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "scale benchmark"], cwd=proj, check=True)


class GpuMemory:
    """Peak GPU memory in use while a stage runs, polled with nvidia-smi (stages are processes of
    their own, so torch's counters in this one see nothing); None without nvidia-smi."""

    def __init__(self) -> None:
        self.available = shutil.which("nvidia-smi") is not None
        self.peak_mib: float | None = None
        self._stop = threading.Event()

    def _used(self) -> float:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return sum(float(line) for line in out.split())

    def __enter__(self) -> GpuMemory:
        if self.available:
            self.peak_mib = self._used()
            threading.Thread(target=self._poll, daemon=True).start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_mib = max(self.peak_mib or 0.0, self._used())

    def __exit__(self, *exc) -> None:
        self._stop.set()


def run_stage(proj: Path, stage: str, env: dict[str, str]) -> dict[str, Any]:
    """One stage through DVC in a child process that reports its children's peak resident memory."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    started = time.perf_counter()
    with GpuMemory() as gpu:
        result = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "dvc", "repro", "--single-item",
                                 stage], cwd=proj, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"stage {stage} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    peak_kb = next(int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    row = {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(peak_kb / 1024),
           "device": _device_of(proj, stage, result.stdout)}
    if gpu.peak_mib is not None:
        row["peak_gpu_mib"] = round(gpu.peak_mib)
    return row


def _device_of(proj: Path, stage: str, output: str) -> str:
    """Where the stage says it ran (its report or its printed line); "-" for stages without a model."""
    if stage == "evaluate":
        settings = json.loads((proj / METRICS).read_text())["settings"]
        return f"{settings['device']} {settings['precision']}"
    if stage == "train":
        report = json.loads((proj / TRAIN_REPORT).read_text())
        return f"{report.get('device', 'cpu')} {report['precision']}"
    if stage == "quantize":
        return json.loads((proj / QUANTIZE_REPORT).read_text()).get("device", "- (nothing asked)")
    for line in output.splitlines():
        if line.startswith(f"{stage}: ") and " on " in line:
            return line.rsplit(" on ", 1)[1].strip()
    return "-"


def _bytes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob(pattern) if p.is_file())


def disk(proj: Path) -> dict[str, int]:
    """Bytes under each part of the project, a file linked into several places counted once overall
    (as `du` counts), with DVC's cache and MLflow's store apart."""
    seen: set[tuple[int, int]] = set()
    parts = {"models": proj / "models", "dvc_cache": proj / ".dvc" / "cache", "mlflow": proj / "mlartifacts",
             "other": proj}
    sizes = dict.fromkeys(parts, 0)
    for name, folder in parts.items():
        for path in folder.rglob("*") if folder.is_dir() else []:
            if path.is_symlink() or not path.is_file():
                continue
            key = (path.stat().st_dev, path.stat().st_ino)
            if key not in seen:
                seen.add(key)
                sizes[name] += path.stat().st_size
    sizes["total"] = sum(sizes.values())
    return sizes


def run(*, model: str, device: str, work: Path) -> dict[str, Any]:
    from ftpipe.device import cpu_model

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    started = time.perf_counter()
    if model == "smollm2":
        base, info = None, {"parameters": 134_515_008, "bf16_bytes": 269_030_016}
    else:
        base = work / "base-model"
        info = synthetic_base(model, base)
    info["build_s"] = round(time.perf_counter() - started, 1)
    proj = work / "project"
    make_project(proj, base)
    result: dict[str, Any] = {"model": model, "device_asked": device, "machine": cpu_model(), **info, "stages": {}}
    for stage in STAGES:
        result["stages"][stage] = row = run_stage(proj, stage, env)
        row["peak_rss_x_bf16"] = round(row["peak_rss_mb"] * 2**20 / info["bf16_bytes"], 2)
        print(f"{stage:15s} {row['seconds']:7.1f} s  peak {row['peak_rss_mb']:6d} MB ({row['peak_rss_x_bf16']:.2f}x bf16)"
              f"  {row.get('peak_gpu_mib', '-')} GPU MiB  on {row['device']}", flush=True)
    result["disk_bytes"] = disk(proj)
    result["disk_x_bf16"] = round(result["disk_bytes"]["total"] / info["bf16_bytes"], 2)
    result["worst_peak_x_bf16"] = max(r["peak_rss_x_bf16"] for r in result["stages"].values())
    print(f"disk: {result['disk_bytes']} = {result['disk_x_bf16']}x bf16; worst stage peak "
          f"{result['worst_peak_x_bf16']}x bf16 (targets: disk <= 5x, peak <= 3x)", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*SHAPES, "smollm2"], default="1b")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-scale"))
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    result = run(model=args.model, device=args.device, work=args.work)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
