"""Benchmark: cleaning + dedup + group split + leak checks over 100,000 chat rows.

Prints rows/s and the wall and CPU time of each phase (CPU time is the steadier figure on a shared
machine). Target: under 60 s on 2 CPU cores.
Uses the base model's tokenizer for the length filters when models/base exists (run
`dvc repro prepare_base` first), otherwise measures without them and says so.
Run: .venv/bin/python -m bench.bench_data [--rows 100000]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from ftpipe.paths import BASE_DIR

WORDS = ("the a to of and in is it you that he was for on are with as his they be at one have this from or had "
         "by hot word but what some we can out other were all there when up use your how said an each she which "
         "do their time if will way about many then them write would like so these her long make thing see him two "
         "has look more day could go come did number sound no most people my over know water than call first who "
         "may down side been now find any new work part take get place made live where after back little only "
         "round man year came show every good me give our under name very through just form sentence great think "
         "say help low line differ turn cause much mean before move right boy old too same tell does set three want "
         "air well also play small end put home read hand port large spell add even land here must big high such").split()


SYLLABLES = "ba ce di fo gu ha je ki lo mu na pe qi ro su ta ve wi xo yu za".split()
# Natural text is Zipfian: a head of function words and a long tail; 5,000 types in all.
VOCAB = WORDS + [a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES][: 5000 - len(WORDS)]
ZIPF = [1 / rank for rank in range(1, len(VOCAB) + 1)]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(VOCAB, weights=ZIPF, k=n))


def synthetic_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Chat-like rows with the duplication real data has: ~10% exact copies, ~5% near-copies."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        roll = rng.random()
        if rows and roll < 0.10:
            rows.append(dict(rng.choice(rows)))
        elif rows and roll < 0.15:
            src = rng.choice(rows)
            words = src["prompt"].split()
            words[rng.randrange(len(words))] = rng.choice(VOCAB)
            rows.append({"prompt": " ".join(words), "response": src["response"]})
        else:
            rows.append({"prompt": sentence(rng, rng.randint(5, 20)) + "?",
                         "response": sentence(rng, rng.randint(5, 40)) + "."})
    return rows


def timed(module, name: str, phases: dict[str, list[float]]) -> None:
    """Wrap module.name so that each call adds its wall and CPU seconds to phases[name]."""
    inner = getattr(module, name)

    def wrapper(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return inner(*args, **kwargs)
        finally:
            spent = phases.setdefault(name, [0.0, 0.0])
            spent[0] += time.perf_counter() - wall
            spent[1] += time.process_time() - cpu

    setattr(module, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()

    import ftpipe.sources
    import stages.prepare_data as stage
    from ftpipe.params import PrepareDataParams

    # run() looks these up at call time, so wrapping them times each phase without changing it.
    phases: dict[str, list[float]] = {}
    timed(ftpipe.sources, "load_records", phases)
    for name in ("clean", "length_filter", "deduplicate", "split", "gate"):
        timed(stage, name, phases)

    tokenizer = None
    if (BASE_DIR / "tokenizer_config.json").is_file():
        from ftpipe.models import load_tokenizer

        tokenizer = load_tokenizer(BASE_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.jsonl"
        raw.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(args.rows)))
        params = PrepareDataParams(source="file", path=str(raw), leak_action="warn")
        started, cpu = time.perf_counter(), time.process_time()
        report = stage.run(params=params, out_dir=Path(tmp) / "prepared", reports_dir=Path(tmp) / "reports",
                           tokenizer=tokenizer)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(f"rows in: {report.rows_in:,}  rows out: {report.rows_out:,}  "
          f"near-dup clusters: {report.near_duplicate_clusters:,}  split groups: {report.split_groups:,}")
    print("dropped:", {rule: c.get("dropped") for rule, c in report.rules.items() if c.get("dropped")})
    print(f"leaks after the group-aware split: {report.leaks.total}")
    print(f"length filters: {'base tokenizer' if tokenizer else 'skipped (no models/base)'}")
    for name, (wall, cpu_s) in phases.items():
        print(f"  {name:<14} wall {wall:6.1f} s  cpu {cpu_s:6.1f} s")
    rest = elapsed - sum(w for w, _ in phases.values()), cpu - sum(c for _, c in phases.values())
    print(f"  {'other':<14} wall {rest[0]:6.1f} s  cpu {rest[1]:6.1f} s  (checks, report, writing)")
    print(f"wall time: {elapsed:.1f} s  cpu time: {cpu:.1f} s  ({report.rows_in / elapsed:,.0f} rows/s)  "
          "target: < 60 s")


if __name__ == "__main__":
    main()
