"""The CUDA path on a lent GPU machine: every stage of the pipeline, and the train stage's methods.

`--pipeline MODEL ...` runs the whole pipeline (bench/bench_scale.py: every stage through DVC) on
each model (`smollm2`: the embedded base; `1b`: a random-weight 1 B Llama built on the machine, since
nothing can be downloaded there; `tiny`) and records per stage the device it ran on, its seconds,
peak resident memory and peak GPU memory. `--gguf PATH` adds the train stage's CUDA path on SmolLM2:
QLoRA (NF4 + double quantization, paged 8-bit AdamW) and LoRA through `stages.train.run`, with
optimizer, precision, attention kernel, steps, real tokens/s, validation loss and peak GPU memory.
`--device cpu` hides CUDA (the same runs on the CPU): how the script is checked before a GPU is lent.
Run: python -m bench.gpu_check --out DIR [--pipeline smollm2 1b] [--device auto|cpu]
     [--gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf --data data/prepared --max-steps N --methods qlora lora]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ftpipe.paths import MANIFEST_NAME, PARAMS, PREPARED_DIR

METHODS = {
    "qlora": {"method": "qlora", "quantization": "nf4_dq"},
    "lora": {"method": "lora"},
}


def machine() -> dict[str, object]:
    import platform

    import torch

    info: dict[str, object] = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported())
    return info


def base_from_gguf(gguf: Path, out: Path) -> Path:
    """models/base as prepare_base writes it for the embedded model."""
    from ftpipe import models
    from ftpipe.io import write_json

    model, tokenizer = models.load_gguf(gguf)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_json(out / MANIFEST_NAME, {"source": {"kind": "embedded", "file": gguf.name},
                                       "parameters": models.count_parameters(model)[0]})
    return out


def train_one(name: str, *, base: Path, data: Path, work: Path, max_steps: int) -> dict[str, object]:
    import torch
    import yaml

    from ftpipe.params import TrainParams
    from stages import train

    shipped = yaml.safe_load(PARAMS.read_text())["train"]
    params = TrainParams(**{**shipped, **METHODS[name], "max_steps": max_steps, "save_steps": 0, "merge": False})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    summary = train.run(params=params, base_dir=base, data_dir=data, out_dir=work / name,
                        reports_dir=work / f"{name}-reports", checkpoint_root=work / "checkpoints")
    row = {key: getattr(summary, key) for key in ("optimizer", "precision", "attention", "steps", "tokens_per_s",
                                         "val_loss_final", "train_s", "trainable_parameters")}
    row["stage_s"] = round(time.perf_counter() - started, 1)
    if torch.cuda.is_available():
        row["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def main(argv: list[str] | None = None) -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="gpu_check.json goes here")
    parser.add_argument("--pipeline", nargs="*", default=[], choices=["smollm2", "1b", "tiny"],
                        help="models to run the whole pipeline on")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto", help="cpu: hide CUDA from every run")
    parser.add_argument("--gguf", type=Path, help="the SmolLM2 GGUF, for the train stage's methods")
    parser.add_argument("--data", type=Path, default=PREPARED_DIR)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu-check"), help="models, projects and adapters")
    parser.add_argument("--max-steps", type=int, default=-1, help="-1: one epoch, as the stage's default")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args(argv)
    if not args.pipeline and not args.gguf:
        parser.error("nothing to run: give --pipeline MODEL ... and/or --gguf PATH")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch looks for a GPU
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, object] = {"machine": machine(), "device_asked": args.device}
    print(json.dumps(result["machine"]), flush=True)
    if args.pipeline:
        from bench import bench_scale

        result["pipeline"] = {model: bench_scale.run(model=model, device=args.device, work=args.work / model)
                              for model in args.pipeline}
    if args.gguf:
        started = time.perf_counter()
        base = base_from_gguf(args.gguf, args.work / "base")
        result["base_load_s"] = round(time.perf_counter() - started, 1)
        for name in args.methods:
            result[name] = train_one(name, base=base, data=args.data, work=args.work, max_steps=args.max_steps)
            print(name, json.dumps(result[name]), flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
