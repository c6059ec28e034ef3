"""The base model quantized with bitsandbytes, each variant measured against the fp32 base.

Per variant (LLM.int8, NF4/FP4 with and without double quantization) and per pruned variant
(ftpipe/pruning.py): memory and disk size, validation perplexity and greedy agreement relative to fp32, load
and generation time. Reads params.yaml `quantize`, models/base/, data/prepared/val.jsonl; writes
reports/quantize.json (DVC metrics) and reports/quantize.md (with no variants asked for, both say so).
Run: python -m stages.quantize
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path
from typing import Any

from ftpipe.errors import PipelineError, run_cli
from ftpipe.io import all_or_nothing, read_jsonl, write_json, write_text
from ftpipe.params import QuantizeParams, load_section
from ftpipe.paths import BASE_DIR, PREPARED_DIR, QUANTIZE_MD, QUANTIZE_REPORT, REPORTS, split_file

MB = 1e6
NOTHING_ASKED = "quantize: no variant asked for (quantize.variants and quantize.pruned are both []): nothing measured"


def saved_bytes(model) -> tuple[int | None, str | None]:
    """(bytes of the safetensors save_pretrained writes, None) or (None, why it cannot be saved)."""
    with tempfile.TemporaryDirectory(prefix="ftpipe-quantize-") as tmp:
        try:
            model.save_pretrained(tmp)
        except Exception as exc:  # transformers raises several types for "not serializable"
            return None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        return sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors")), None


def _measure(model, load_s: float, tokenizer, ppl_rows, prompts, params: QuantizeParams, name: str) -> dict[str, Any]:
    from ftpipe import metrics

    # Before any forward: on AVX-512 bf16 CPUs bitsandbytes repacks 4-bit weights at the first one.
    footprint = model.get_memory_footprint()
    started = time.perf_counter()
    outputs = metrics.generate(model, tokenizer, prompts, max_new_tokens=params.max_new_tokens,
                               batch_size=params.batch_size, progress=f"generate ({name})")
    generate_s = time.perf_counter() - started
    ppl = metrics.response_perplexity(model, tokenizer, [r["messages"] for r in ppl_rows], batch_size=params.batch_size)
    return {"footprint_bytes": footprint, "perplexity": ppl, "load_s": load_s,
            "generate_s": generate_s, "outputs": outputs}


def run(*, params: QuantizeParams, base_dir: Path, val_file: Path, reports_dir: Path,
        device: str = "cpu") -> dict[str, Any]:
    import logging

    from tqdm import tqdm

    if not params.variants and not params.pruned:
        return _nothing_asked(params, reports_dir)

    from ftpipe import models, quantization
    from ftpipe.chat import prompt_text

    # On CPU, LLM.int8 logs "inputs will be cast to float16" on every matmul.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    models.set_threads(params.threads)
    rows = read_jsonl(val_file)
    if not rows:
        raise PipelineError(f"{val_file}: no validation rows to measure quantization on")
    ppl_rows = rows[: params.max_rows]
    tokenizer = models.load_tokenizer(base_dir)
    prompts = [prompt_text(tokenizer, r["messages"]) for r in rows[: params.prompts]]

    entries: dict[str, dict[str, Any]] = {}
    for name in (bar := tqdm(["fp32", *params.variants], desc="quantize", unit="variant")):
        bar.set_postfix_str(name)
        started = time.perf_counter()
        model = (models.load_model(base_dir, device_map=device) if name == "fp32"
                 else quantization.load_quantized(base_dir, name, on=device))
        entry = _measure(model, time.perf_counter() - started, tokenizer, ppl_rows, prompts, params, name)
        if name == "fp32":
            # The reference is the stage's input itself, stored in its own dtype (bf16 for the
            # embedded base): its files scaled to 4 bytes a weight are the fp32 size on disk.
            stored = models.stored_dtype(base_dir)
            per_weight = stored.itemsize if stored is not None and stored.is_floating_point else 4
            entry["disk_bytes"], entry["not_serializable"] = sum(
                f.stat().st_size for f in Path(base_dir).glob("*.safetensors")) * 4 // per_weight, None
        else:
            entry["disk_bytes"], entry["not_serializable"] = saved_bytes(model)
        entry["total_s"] = time.perf_counter() - started  # load, generate, perplexity and the trial save
        entries[name] = entry
        del model
        gc.collect()

    ref = entries.pop("fp32")
    pruned = _pruned(params, base_dir, tokenizer, ppl_rows, prompts, device)
    result = {
        "fp32": _public(ref),
        "variants": {name: _compared(entry, ref, tokenizer) for name, entry in entries.items()},
        "pruned": {name: {"sparsity": entry.pop("sparsity"), **_compared(entry, ref, tokenizer)}
                   for name, entry in pruned.items()},
        "perplexity_rows": len(ppl_rows),
        "prompts": len(prompts),
        "device": device,
        "settings": {"decoding": "greedy", "bitsandbytes": _version("bitsandbytes"),
                     **params.model_dump(exclude={"threads"})},
    }
    with all_or_nothing():
        write_json(reports_dir / QUANTIZE_REPORT.name, result)
        write_text(reports_dir / QUANTIZE_MD.name, table(result))
    return result


def _nothing_asked(params: QuantizeParams, reports_dir: Path) -> dict[str, Any]:
    """The report of a run that measures nothing: empty tables, so readers need no special case."""
    result = {"skipped": NOTHING_ASKED, "variants": {}, "pruned": {}, "settings": params.model_dump(exclude={"threads"})}
    with all_or_nothing():
        write_json(reports_dir / QUANTIZE_REPORT.name, result)
        write_text(reports_dir / QUANTIZE_MD.name, table(result))
    return result


def _pruned(params: QuantizeParams, base_dir: Path, tokenizer, ppl_rows, prompts,
            device: str) -> dict[str, dict[str, Any]]:
    """Each pruned variant of the fp32 base, measured as the quantized ones are (kept dense: its
    memory and size on disk are the fp32 model's)."""
    from tqdm import tqdm

    from ftpipe import models, pruning

    entries: dict[str, dict[str, Any]] = {}
    for name in (bar := tqdm(params.pruned, desc="prune", unit="variant", disable=not params.pruned)):
        bar.set_postfix_str(name)
        started = time.perf_counter()
        model = models.load_model(base_dir, device_map=device)
        sparsity = pruning.prune(model, name)
        entry = _measure(model, time.perf_counter() - started, tokenizer, ppl_rows, prompts, params, name)
        entry.update(sparsity=sparsity, total_s=time.perf_counter() - started)  # not saved: dense like fp32
        entries[name] = entry
        del model
        gc.collect()
    return entries


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "outputs" and not (k == "not_serializable" and v is None)}


def _compared(entry: dict[str, Any], ref: dict[str, Any], tokenizer) -> dict[str, Any]:
    from ftpipe import metrics

    exact, tokens = metrics.agreement(tokenizer, ref["outputs"], entry["outputs"])
    out = _public(entry)
    out["footprint_ratio"] = entry["footprint_bytes"] / ref["footprint_bytes"]
    out["generate_ratio"] = entry["generate_s"] / ref["generate_s"]
    if entry.get("disk_bytes") is not None:  # None: not serializable; absent: a pruned variant
        out["disk_ratio"] = entry["disk_bytes"] / ref["disk_bytes"]
    out["perplexity_ratio"] = entry["perplexity"] / ref["perplexity"]
    out["exact_match"], out["token_agreement"] = exact, tokens
    return out


def table(result: dict[str, Any]) -> str:
    """Markdown table: fp32 first, then each variant with its ratios to fp32."""
    if "skipped" in result:
        return result["skipped"] + "\n"
    ref = result["fp32"]
    lines = ["| variant | memory MB | vs fp32 | on disk MB | perplexity | vs fp32 | exact match | token agreement "
             "| load s | generate s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| fp32 | {ref['footprint_bytes'] / MB:.1f} | 100% | {ref['disk_bytes'] / MB:.1f} | "
             f"{ref['perplexity']:.3f} | 1.000 | - | - | {ref['load_s']:.1f} | {ref['generate_s']:.1f} |"]
    for name, v in result["variants"].items():
        disk = "not serializable" if v["disk_bytes"] is None else f"{v['disk_bytes'] / MB:.1f}"
        lines.append(f"| {name} | {v['footprint_bytes'] / MB:.1f} | {v['footprint_ratio']:.1%} | {disk} | "
                     f"{v['perplexity']:.3f} | {v['perplexity_ratio']:.3f} | {v['exact_match']:.0%} | "
                     f"{v['token_agreement']:.1%} | {v['load_s']:.1f} | {v['generate_s']:.1f} |")
    s = result["settings"]
    notes = [f"Perplexity of {result['perplexity_rows']} validation responses; greedy agreement with fp32 on "
             f"{result['prompts']} validation prompts, {s['max_new_tokens']} new tokens; "
             f"device {result['device']}, bitsandbytes {s['bitsandbytes']}.",
             "Memory is `get_memory_footprint()`: it counts parameters and buffers, not the 4-bit quantization "
             "state, so double quantization (`_dq`) shows only on disk."]
    for name, v in result["variants"].items():
        if v["disk_bytes"] is None:
            notes.append(f"{name} is not serializable: {v['not_serializable']}")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n" + _pruned_table(result)


def _pruned_table(result: dict[str, Any]) -> str:
    if not result["pruned"]:
        return ""
    ref = result["fp32"]
    lines = ["", "| pruned | sparsity | perplexity | vs fp32 | exact match | token agreement | generate s | vs fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| fp32 | 0.0% | {ref['perplexity']:.3f} | 1.000 | - | - | {ref['generate_s']:.1f} | 1.00 |"]
    for name, v in result["pruned"].items():
        lines.append(f"| {name} | {v['sparsity']:.1%} | {v['perplexity']:.3f} | {v['perplexity_ratio']:.3f} | "
                     f"{v['exact_match']:.0%} | {v['token_agreement']:.1%} | {v['generate_s']:.1f} | "
                     f"{v['generate_ratio']:.2f} |")
    lines += ["", "Sparsity is the share of zeros in the decoder blocks' linear weights (embedding and norms kept). "
              "The weights stay dense tensors: torch has no CPU kernel that skips zeros (its 2:4 kernels are "
              "CUDA only), so memory is the fp32 model's and generation takes the same time; pruning here "
              "shows its cost in quality, not a saving."]
    return "\n".join(lines) + "\n"


def _version(package: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(package)


def main() -> None:
    from ftpipe import device

    params = load_section("quantize", QuantizeParams)
    if (params.variants or params.pruned) and not (BASE_DIR / "config.json").is_file():
        raise PipelineError(f"{BASE_DIR}: base model not prepared (run `dvc repro prepare_base`)")
    where = "cpu"
    if params.variants or params.pruned:  # where inference runs (bitsandbytes' kernels on CUDA there)
        where = device.inference().device
    result = run(params=params, base_dir=BASE_DIR, val_file=PREPARED_DIR / split_file("val"), reports_dir=REPORTS,
                 device=where)
    print(table(result), end="")


if __name__ == "__main__":
    run_cli(main)
