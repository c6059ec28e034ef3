"""Preference data for the dpo stage, built only when dpo.enabled: pairs (prompt, chosen, rejected) or, with
kind thumbs, single replies rated good or bad (prompt, reply, label; for dpo.method kto).

source self: each SFT row's reference reply as chosen, the base model's greedy reply as rejected (kept by DVC:
a DPO hyperparameter change does not generate them again); source file: a .jsonl of pairs (or rated replies)
under data/raw/. They follow the SFT split and are cleaned and leak-checked with prepare_data's settings.
Reads params.yaml `prepare_prefs`, dpo.enabled, prepare_data's keys, models/base/, data/prepared/; writes
data/preferences/ (the splits and manifest.json) and reports/preferences.json (with dpo off: both say so).
Run: python -m stages.prepare_prefs
"""

from __future__ import annotations

import time
from pathlib import Path

from ftpipe.device import Placement
from ftpipe.errors import PipelineError, run_cli
from ftpipe.io import all_or_nothing, atomic_dir, dumps_jsonl, read_jsonl, write_json, write_text
from ftpipe.params import DpoParams, PrepareDataParams, PreparePrefsParams, load_section
from ftpipe.paths import BASE_DIR, MANIFEST_NAME, PREFS_DIR, PREFS_REPORT, PREPARED_DIR, SPLITS, split_file
from ftpipe.schemas import PrefsReport


def run(*, params: PreparePrefsParams, data: PrepareDataParams, enabled: bool, base_dir: Path, prepared_dir: Path,
        out_dir: Path, report_path: Path, project_dir: Path = Path("."), placement: Placement | None = None
        ) -> PrefsReport:
    """`placement`: where the base model generates the rejected replies (ftpipe.device); None: CPU fp32."""
    from ftpipe import preferences

    if not enabled:
        report = PrefsReport(enabled=False)
        _write(out_dir, report_path, report, {})
        return report
    started, generated, dropped = time.perf_counter(), 0, {}
    if params.source == "self":
        sft = _sft_rows(prepared_dir)
        if params.max_train_pairs:
            sft["train"] = sft["train"][: params.max_train_pairs]  # the split is shuffled: a random draw
        splits, dropped = _self_pairs(params, sft, base_dir, placement or Placement("cpu", "fp32"))
        generated = sum(len(rows) for rows in sft.values())
        extra_eval = {}  # the pairs' splits are the SFT splits themselves
    else:  # the file is checked before anything else is read
        read = preferences.read_thumbs if params.kind == "thumbs" else preferences.read_file
        pairs, dropped = read(_data_file(params.path, project_dir), params, data)
        sft = _sft_rows(prepared_dir)
        splits = preferences.cap_train(preferences.assign_splits(pairs, sft, data), params.max_train_pairs, data.seed)
        extra_eval = {"sft_val": sft["val"], "sft_test": sft["test"]}
    kept, leaks = preferences.check_leaks(splits, extra_eval, data)
    what = "rated replies" if params.kind == "thumbs" else "pairs"
    empty = [split for split in SPLITS if not kept[split]]
    if empty:  # DPO needs pairs to train on, to validate on and to report on
        raise PipelineError(f"prepare_prefs: no {empty[0]} {what} left ({what} per split: "
                            f"{ {s: len(p) for s, p in kept.items()} }; left out: {dropped})")
    one_sided = [split for split in SPLITS if params.kind == "thumbs" and not preferences.has_both_labels(kept[split])]
    if one_sided:  # KTO's loss weighs good against bad replies, and the test margin compares them
        split = one_sided[0]
        missing = "bad" if kept[split][0]["label"] else "good"
        raise PipelineError(f"prepare_prefs: the {split} split has no {missing} replies ({len(kept[split])} rated "
                            f"replies, all {'good' if missing == 'bad' else 'bad'}): KTO needs both in every split")
    from ftpipe.leaks import count_by_kind

    report = PrefsReport(
        enabled=True, kind=params.kind, source=params.source if params.source == "self" else f"file {params.path}",
        pairs={s: len(p) for s, p in kept.items()}, dropped=dropped,
        leaks={**count_by_kind(leaks), "total": len(leaks)}, leak_action=data.leak_action,
        train_pairs_dropped_for_leaks=len(splits["train"]) - len(kept["train"]),
        generated=generated, generate_s=round(time.perf_counter() - started, 1) if generated else 0.0,
        good={s: sum(row["label"] for row in p) for s, p in kept.items()} if params.kind == "thumbs" else {},
    )
    _write(out_dir, report_path, report, kept)
    return report


def _sft_rows(prepared_dir: Path) -> dict[str, list]:
    return {split: read_jsonl(prepared_dir / split_file(split)) for split in SPLITS}


def _self_pairs(params: PreparePrefsParams, sft, base_dir: Path, placement: Placement):
    from ftpipe import models, preferences

    models.set_threads(params.threads)
    model, tokenizer = models.load_model(base_dir, placement=placement), models.load_tokenizer(base_dir)
    return preferences.self_pairs(sft, model, tokenizer, max_new_tokens=params.max_new_tokens,
                                  batch_size=params.batch_size)


def _data_file(given: str, project_dir: Path) -> Path:
    """The pairs file, which must be under data/raw/ (symlinks followed): DVC hashes that folder."""
    from ftpipe.sources import check_under_raw

    check_under_raw("prepare_prefs.path", given, project_dir)
    return project_dir / given


def _write(out_dir: Path, report_path: Path, report: PrefsReport, splits) -> None:
    with all_or_nothing(), atomic_dir(out_dir) as tmp:  # the pairs and their report go in place together
        for split, pairs in splits.items():
            write_text(tmp / split_file(split), dumps_jsonl(pairs))
        manifest = {"enabled": report.enabled, "source": report.source, "pairs": report.pairs}
        if report.enabled:
            manifest["kind"] = report.kind  # pairs | thumbs (rated replies, for KTO)
        write_json(tmp / MANIFEST_NAME, manifest)
        report.write(report_path)


def main() -> None:
    from ftpipe import device

    params = load_section("prepare_prefs", PreparePrefsParams)
    enabled = load_section("dpo", DpoParams).enabled
    data = load_section("prepare_data", PrepareDataParams)
    placement = device.inference() if enabled and params.source == "self" else None
    report = run(params=params, data=data, enabled=enabled, base_dir=BASE_DIR, prepared_dir=PREPARED_DIR,
                 out_dir=PREFS_DIR, report_path=PREFS_REPORT, placement=placement)
    if not report.enabled:
        print("prepare_prefs: dpo.enabled is false, no pairs built")
        return
    what = "rated replies" if report.kind == "thumbs" else "pairs"
    print(f"prepare_prefs: {report.pairs} {what} ({report.source}; left out {report.dropped}; "
          f"leaks {report.leaks['total']}, {report.leak_action}) -> {PREFS_DIR}")


if __name__ == "__main__":
    run_cli(main)
