"""The merged fine-tuned model as GGUF files (llama.cpp, Ollama), each checked against the merged model.

Per format in `export.gguf`, the file (ftpipe/gguf_export.py) is loaded back with transformers and its
tokenizer, teacher-forced logits and greedy replies compared on validation conversations; an Ollama Modelfile
points at the smallest file. Reads params.yaml `export`, prepare_base.source, models/adapter/merged/ (with dpo:
models/dpo/merged/), data/prepared/val.jsonl; writes models/gguf/, reports/export.json and reports/export.md.
Run: python -m stages.export
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from ftpipe.device import Placement
from ftpipe.errors import PipelineError, run_cli
from ftpipe.io import all_or_nothing, atomic_dir, read_jsonl, write_text
from ftpipe.params import DpoParams, ExportParams, PrepareBaseParams, load_section
from ftpipe.paths import ADAPTER_DIR, DPO_DIR, EXPORT_MD, EXPORT_REPORT, GGUF_DIR, PREPARED_DIR, REPORTS, split_file
from ftpipe.schemas import ExportReport, GgufFile

MB = 1e6


def run(*, params: ExportParams, merged_dir: Path, val_file: Path, out_dir: Path, reports_dir: Path,
        pre_tokenizer: str, name: str, placement: Placement | None = None) -> ExportReport:
    """`placement`: where and in what precision the checks run (ftpipe.device; None: the CPU in
    fp32). In bf16 the logit differences hold bf16's rounding besides the format's, but a broken
    file still shows at once, and no fp32 copy of the model is made (the stage's peak memory)."""
    import importlib.metadata

    from ftpipe import models

    models.set_threads(params.threads)
    if params.gguf and not (merged_dir / "config.json").is_file():
        raise PipelineError(f"{merged_dir}: no merged model to export (train.merge: true writes it)")
    with all_or_nothing():
        with atomic_dir(out_dir) as tmp:
            formats, prompts, positions, modelfile = _write_and_check(params, merged_dir, val_file, tmp, out_dir,
                                                                      pre_tokenizer, name,
                                                                      placement or Placement("cpu", "fp32"))
        report = ExportReport(model=str(merged_dir), formats=formats, modelfile=modelfile,
                              pre_tokenizer=pre_tokenizer, prompts=prompts,
                              logit_positions=positions, gguf_package=importlib.metadata.version("gguf"))
        report.write(reports_dir / EXPORT_REPORT.name)
        write_text(reports_dir / EXPORT_MD.name, table(report, merged_dir))
    return report


def _write_and_check(params: ExportParams, merged_dir: Path, val_file: Path, tmp: Path, out_dir: Path,
                     pre_tokenizer: str, name: str, placement: Placement) -> tuple[dict[str, GgufFile], int, int, str | None]:
    """(checked file per format, conversations compared, token positions compared, the Modelfile)."""
    from tqdm import tqdm

    from ftpipe import gguf_export, models

    if not params.gguf:
        return {}, 0, 0, None
    tokenizer = models.load_tokenizer(merged_dir)
    conversations = [r["messages"] for r in read_jsonl(val_file)[: params.prompts]]
    if not conversations:
        raise PipelineError(f"{val_file}: no validation rows to check the GGUF files on")
    reference = _reference(models.load_model(merged_dir, placement=placement), tokenizer, conversations, params)
    formats = {}
    for fmt in (bar := tqdm(params.gguf, desc="export", unit="file")):
        bar.set_postfix_str(fmt)
        started = time.perf_counter()
        gguf_export.write_gguf(merged_dir, tmp / gguf_export.file_name(fmt), fmt=fmt, name=name, pre=pre_tokenizer)
        written = time.perf_counter() - started
        formats[fmt] = _checked(tmp, gguf_export.file_name(fmt), out_dir, tokenizer, conversations, reference,
                                params, written, placement)
    modelfile = _write_modelfile(formats, tokenizer, reference["prompts"][0], tmp, out_dir)
    return formats, len(conversations), reference["positions"], modelfile


def _reference(model, tokenizer, conversations, params: ExportParams) -> dict:
    """The merged model's logits on each whole conversation and its greedy replies."""
    from ftpipe import metrics
    from ftpipe.chat import prompt_text, render

    texts = [render(tokenizer, c, generation_prompt=False) for c in conversations]
    ids = [tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"] for t in texts]
    prompts = [prompt_text(tokenizer, c) for c in conversations]
    return {"texts": texts, "ids": ids, "positions": sum(i.shape[1] for i in ids), "logits": _logits(model, ids),
            "prompts": prompts, "outputs": metrics.generate(model, tokenizer, prompts, max_new_tokens=params.max_new_tokens,
                                        batch_size=len(prompts))}


def _logits(model, ids) -> list:
    import torch

    with torch.inference_mode():
        return [model(input_ids=i.to(model.device)).logits[0].float().cpu() for i in ids]


def _checked(folder: Path, file: str, out_dir: Path, tokenizer, conversations, reference: dict,
             params: ExportParams, write_s: float, placement) -> GgufFile:
    """Load the file back with transformers and compare it with the merged model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftpipe import metrics, models
    from ftpipe.device import place

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=placement.dtype).eval()
    model = place(model, placement, str(out_dir / file))
    load_s = time.perf_counter() - started
    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    for text, ids in zip(reference["texts"], reference["ids"]):
        if gguf_tokenizer(text, add_special_tokens=False)["input_ids"] != ids[0].tolist():
            raise PipelineError(f"{out_dir / file}: its tokenizer encodes a validation conversation differently "
                                "from the merged model's")
    pairs = list(zip(reference["logits"], _logits(model, reference["ids"])))
    diffs = [(a - b).abs() for a, b in pairs]
    top1 = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in pairs)
    outputs = metrics.generate(model, tokenizer, reference["prompts"], max_new_tokens=params.max_new_tokens,
                               batch_size=len(reference["prompts"]))
    exact, tokens = metrics.agreement(tokenizer, reference["outputs"], outputs)
    return GgufFile(file=str(out_dir / file), bytes=(folder / file).stat().st_size,
                    sha256=models.sha256_of(folder / file), write_s=write_s, load_s=load_s,
                    max_abs_logit_diff=max(float(d.max()) for d in diffs),
                    mean_abs_logit_diff=float(sum(d.sum() for d in diffs) / sum(d.numel() for d in diffs)),
                    top1_agreement=top1 / reference["positions"], exact_match=exact, token_agreement=tokens)


def _write_modelfile(formats: dict[str, GgufFile], tokenizer, prompt: str, tmp: Path, out_dir: Path) -> str:
    """The Ollama Modelfile for the smallest file; `prompt` is a validation prompt as the model saw it."""
    from ftpipe import gguf_export

    smallest = min(formats.values(), key=lambda f: f.bytes)
    # The system turn the model was trained with: the data's own, or the template's default.
    system = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", prompt, re.S)
    text = gguf_export.modelfile(Path(smallest.file).name, tokenizer.chat_template, system and system.group(1))
    write_text(tmp / gguf_export.MODELFILE, text)
    return str(out_dir / gguf_export.MODELFILE)


def table(report: ExportReport, merged_dir: Path) -> str:
    if not report.formats:
        return "No GGUF written (`export.gguf: []`).\n"
    merged = sum(f.stat().st_size for f in merged_dir.glob("*.safetensors"))
    lines = ["| file | size MB | vs merged | max abs logit diff | mean abs logit diff | top-1 agreement "
             "| exact match | token agreement | load s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f in report.formats.values():
        lines.append(f"| {f.file} | {f.bytes / MB:.1f} | {f.bytes / merged:.1%} | {f.max_abs_logit_diff:.4f} | "
                     f"{f.mean_abs_logit_diff:.5f} | {f.top1_agreement:.2%} | {f.exact_match:.0%} | "
                     f"{f.token_agreement:.1%} | {f.load_s:.1f} |")
    notes = [f"Exported from `{report.model}`. Each file loaded back with transformers (`gguf_file=`), against "
             "that merged model (both where inference runs, `inference`): logits at "
             f"all {report.logit_positions} positions of {report.prompts} validation conversations, greedy replies "
             f"to their prompts; the GGUF's tokenizer encodes them identically. gguf {report.gguf_package}, "
             f"pre-tokenizer `{report.pre_tokenizer}`."]
    if report.pre_tokenizer == "default":
        notes.append("The base did not come from a GGUF, so its llama.cpp pre-tokenizer name is unknown here and "
                     "`default` was written: llama.cpp may split text before BPE differently from the Hugging Face "
                     "tokenizer (transformers reads the file correctly).")
    notes.append(f"Ollama: `ollama create <name> -f {report.modelfile}`; llama.cpp: "
                 f"`llama-cli -m {min(report.formats.values(), key=lambda f: f.bytes).file} -cnv`.")
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


def main() -> None:
    from ftpipe import device, gguf_export, models

    params = load_section("export", ExportParams)
    placement = device.inference()
    base = load_section("prepare_base", PrepareBaseParams)
    pre = gguf_export.pre_tokenizer_of(models.embedded_gguf()) if base.source == "embedded" else None
    dpo = models.dpo_result(DPO_DIR, enabled=load_section("dpo", DpoParams).enabled)
    merged = (dpo or ADAPTER_DIR) / models.MERGED  # the model register registers
    report = run(params=params, merged_dir=merged, val_file=PREPARED_DIR / split_file("val"), out_dir=GGUF_DIR,
                 reports_dir=REPORTS, pre_tokenizer=pre or gguf_export.DEFAULT_PRE, name="ftpipe fine-tune",
                 placement=placement)
    print(table(report, merged))
    if report.formats:
        print(f"export: checks on {placement}")


if __name__ == "__main__":
    run_cli(main)
