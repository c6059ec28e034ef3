"""Benchmark: the scoring path of score_base and evaluate against the two-pass path it replaced.

Both score the base model's zero-shot and few-shot candidates on the test split (greedy replies and
the references' NLL, as evaluate.max_new_tokens and batch_size say):
- `one-pass` (ftpipe.scoring, today's): the shared prompt prefix once, then forwards over
  [rest of prompt | reference] score the reference and leave the prompt's KV cache, decoding goes on
  from it in place, the vocabulary projection runs only where a prediction is read, and rows that
  ended leave the batch; the prefix's keys and values are read once per layer for all rows
  (ftpipe.kvcache's prefix attention, llama and qwen architectures on the CPU);
- `one-pass-joined`: the same with the prefix copied into each row's cache, as other architectures
  and CUDA run it;
- `two-pass` (before): transformers' generate, then a forward over prompt + reference that projects
  every position onto the vocabulary.
Work is counted in matmul FLOPs from the model's shapes, the same for both: every prompt, reference
and generated token through the decoder's linear layers (2 x P_linear), attention over the pairs a
causal mask allows (2 x 2 x d per pair and layer), and the vocabulary projection where a prediction
is read (each reference token and each generated one). Prints per path and batch size: seconds,
tokens/s, GFLOP/s, % of the machine's matmul ceiling at the model's shapes (bench/ceiling.py) in the
precision used (measured just before and just after each timed run, the higher of the two: a shared
machine's speed drifts by a fifth within minutes), the same for the FLOPs computed (one-pass runs a
batch's shared prompt prefix, the system prompt and few-shot examples, once: counted once there), and
how many replies equal the two-pass path's.
Needs models/base and data/prepared (`dvc repro prepare_data`).
Run: .venv/bin/python -m bench.bench_generate [--batch-sizes 16,128] [--precision auto|fp32|bf16] [--rows 0]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ftpipe.errors import PipelineError, run_cli
from ftpipe.paths import BASE_DIR, PREPARED_DIR


def work_flops(shapes, items: list[tuple[list[int], list[int]]], new_tokens: list[int]) -> float:
    """Matmul FLOPs of scoring `items` (prompt ids, reference ids) with `new_tokens` generated per row."""
    d = shapes.hidden
    flops = 0.0
    for (prompt, reference), generated in zip(items, new_tokens):
        p, r = len(prompt), len(reference)
        tokens = p + r + max(generated - 1, 0)  # the first reply token comes from the prompt's last position
        pairs = (p + r) * (p + r + 1) // 2 + sum(p + i + 1 for i in range(max(generated - 1, 0)))
        flops += 2 * shapes.linear_params * tokens + 4 * d * shapes.layers * pairs + 2 * shapes.vocab * d * (r + generated)
    return flops


def shared_prefix_flops(shapes, items: list[tuple[list[int], list[int]]], batch_size: int) -> float:
    """FLOPs the one-pass path leaves out of work_flops by running each decoding batch's shared prompt
    prefix once (ftpipe.scoring batches rows by prompt length)."""
    from ftpipe import scoring

    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    saved = 0.0
    for start in range(0, len(order), batch_size):
        batch = [items[i][0] for i in order[start:start + batch_size]]
        length = scoring._shared_prefix(batch)
        once = 2 * shapes.linear_params * length + 4 * shapes.hidden * shapes.layers * length * (length + 1) // 2
        saved += (len(batch) - 1) * once
    return saved


def timed_path(path: str, model, tokenizer, conversations, *, batch_size: int, max_new_tokens: int):
    """(seconds, replies, generated tokens per row) of one path."""
    from ftpipe import kvcache, metrics, scoring
    from ftpipe.chat import prompt_text

    start = time.perf_counter()
    if path.startswith("one-pass"):
        apart = kvcache.reads_prefix_apart
        if path == "one-pass-joined":
            kvcache.reads_prefix_apart = lambda model: False
        try:
            replies = scoring.score(model, tokenizer, conversations, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size).outputs
        finally:
            kvcache.reads_prefix_apart = apart
    else:
        replies = metrics.generate(model, tokenizer, [prompt_text(tokenizer, c) for c in conversations],
                                   max_new_tokens=max_new_tokens, batch_size=batch_size)
        metrics.response_nll(model, tokenizer, conversations, batch_size=batch_size)
    seconds = time.perf_counter() - start
    return seconds, replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=BASE_DIR)
    parser.add_argument("--data", type=Path, default=PREPARED_DIR)
    parser.add_argument("--rows", type=int, default=0, help="test rows; 0: all (evaluate.max_examples: 0)")
    parser.add_argument("--batch-sizes", default="16,128")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="evaluate.max_new_tokens")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--paths", default="two-pass,one-pass-joined,one-pass")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: one per physical core")
    args = parser.parse_args()

    from bench.ceiling import Shapes, describe, machine, matmul_gflops
    from ftpipe import device, models, scoring
    from ftpipe.evaluation import pick_shots, with_shots
    from ftpipe.io import read_jsonl

    test = args.data / "test.jsonl"
    if not test.is_file():
        raise PipelineError(f"{test}: not found (run `dvc repro prepare_data`)")
    models.set_threads(args.threads)
    placement = device.decide(device="cpu", precision=args.precision)
    tokenizer = models.load_tokenizer(args.model)
    model = models.load_model(args.model, placement=placement)
    shapes = Shapes.of(model.config)
    info = machine(shapes)
    print(describe(info))
    rows = read_jsonl(test)[: args.rows or None]
    shots = pick_shots(read_jsonl(args.data / "train.jsonl"), k=3, seed=42)
    candidates = {"zero-shot": [r["messages"] for r in rows],
                  "few-shot": [with_shots(r["messages"], shots) for r in rows]}
    timed_path("one-pass", model, tokenizer, candidates["zero-shot"][:2], batch_size=2, max_new_tokens=4)  # warm-up
    print(f"model {args.model} ({placement}), {len(rows)} test rows, max_new_tokens {args.max_new_tokens}")
    print(f"| path | batch | candidate | s | tokens/s | GFLOP/s | {placement.precision} ceiling GFLOP/s | % of ceiling | "
          "computed GFLOP/s | computed % | replies as two-pass |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    totals: dict[tuple[str, int], float] = {}
    reference: dict[tuple[int, str], list[str]] = {}
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        for path in args.paths.split(","):
            for name, conversations in candidates.items():
                before = matmul_gflops(shapes, placement.precision)
                seconds, replies = timed_path(path, model, tokenizer, conversations, batch_size=batch_size,
                                              max_new_tokens=args.max_new_tokens)
                ceiling = max(before, matmul_gflops(shapes, placement.precision))
                items = [scoring.prompt_and_reference(tokenizer, c) for c in conversations]
                generated = [min(len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1, args.max_new_tokens)
                             for r in replies]
                flops = work_flops(shapes, items, generated)
                computed = flops - (shared_prefix_flops(shapes, items, batch_size) if path.startswith("one-pass") else 0.0)
                tokens = sum(len(p) + len(r) for p, r in items) + sum(generated)
                reference.setdefault((batch_size, name), replies)
                same = sum(a == b for a, b in zip(reference[(batch_size, name)], replies))
                totals[(path, batch_size)] = totals.get((path, batch_size), 0.0) + seconds
                print(f"| {path} | {batch_size} | {name} | {seconds:.1f} | {tokens / seconds:.0f} | "
                      f"{flops / seconds / 1e9:.0f} | {ceiling:.0f} | {100 * flops / seconds / 1e9 / ceiling:.0f} % | "
                      f"{computed / seconds / 1e9:.0f} | {100 * computed / seconds / 1e9 / ceiling:.0f} % | "
                      f"{same}/{len(replies)} |", flush=True)
    base = totals.get(("two-pass", int(args.batch_sizes.split(",")[0])))
    for (path, batch_size), seconds in totals.items():
        print(f"{path}, batch {batch_size}: {seconds:.1f} s for both candidates"
              + (f" ({base / seconds:.2f}x the two-pass path at batch {args.batch_sizes.split(',')[0]})" if base else ""))


if __name__ == "__main__":
    run_cli(main)
