"""Benchmark: batched greedy generation vs one prompt at a time, same model and settings.

Both runs go through ftpipe.metrics.generate (what the evaluate stage uses); only batch_size
differs. Prints both wall times, the speedup (target: >= 4x on SmolLM2-135M) and how many
outputs are identical between the two (greedy with left padding should agree).
Needs models/base and data/prepared/test.jsonl (`dvc repro prepare_data`).
Run: .venv/bin/python -m bench.bench_generate [--prompts 64] [--batch-size 16] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ftpipe.errors import PipelineError, run_cli
from ftpipe.paths import BASE_DIR, PREPARED_DIR


def load_prompts(tokenizer, test_file: Path, count: int) -> list[str]:
    from ftpipe.chat import prompt_text
    from ftpipe.io import read_jsonl

    if not test_file.is_file():
        raise PipelineError(f"{test_file}: not found (run `dvc repro prepare_data`)")
    rows = read_jsonl(test_file)[:count]
    if len(rows) < count:
        print(f"note: {test_file} holds {len(rows)} rows; benchmarking those")
    return [prompt_text(tokenizer, r["messages"]) for r in rows]


def timed(model, tokenizer, prompts: list[str], *, batch_size: int, max_new_tokens: int) -> tuple[float, list[str]]:
    from ftpipe.metrics import generate

    start = time.perf_counter()
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       progress=f"batch size {batch_size}")
    return time.perf_counter() - start, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=BASE_DIR)
    parser.add_argument("--test-file", type=Path, default=PREPARED_DIR / "test.jsonl")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="evaluate.batch_size in params.yaml")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="evaluate.max_new_tokens in params.yaml")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: one per physical core")
    args = parser.parse_args()

    import torch

    from ftpipe import models

    models.set_threads(args.threads)
    tokenizer, model = models.load_tokenizer(args.model), models.load_model(args.model)
    prompts = load_prompts(tokenizer, args.test_file, args.prompts)
    timed(model, tokenizer, prompts[:2], batch_size=2, max_new_tokens=4)  # warm-up: first-call overhead

    single_s, single = timed(model, tokenizer, prompts, batch_size=1, max_new_tokens=args.max_new_tokens)
    batched_s, batched = timed(model, tokenizer, prompts, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens)
    same = sum(a == b for a, b in zip(single, batched))
    print(f"model {args.model}, {len(prompts)} prompts, max_new_tokens {args.max_new_tokens}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"one at a time:  {single_s:7.1f} s  ({len(prompts) / single_s:.2f} prompts/s)")
    print(f"batch size {args.batch_size:<3}: {batched_s:7.1f} s  ({len(prompts) / batched_s:.2f} prompts/s)")
    print(f"speedup:        {single_s / batched_s:7.2f}x (target >= 4x)")
    print(f"identical outputs: {same}/{len(prompts)}")
    for i, (a, b) in enumerate(zip(single, batched)):
        if a != b:
            print(f"first difference, prompt {i}:\n  single:  {a!r}\n  batched: {b!r}")
            break


if __name__ == "__main__":
    run_cli(main)
