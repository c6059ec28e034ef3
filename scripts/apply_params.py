"""Apply a params overlay (a partial params.yaml, such as configs/smollm2-1.7b-qlora-gpu.yaml) to params.yaml.

Each key of the overlay replaces that key's value in params.yaml; the file's comments, order and layout
stay (ruamel's round trip, as DVC edits the file). The result is checked as every pipeline run checks it
(ftpipe.checks.check_params) and put in place only if it passes. A section or key the pipeline does not
know fails with one line naming the overlay file, its line and the key, and params.yaml stays as it was.
Run: python -m scripts.apply_params configs/smollm2-1.7b-qlora-gpu.yaml [--params params.yaml]
Then `make run` (CUDA=1 on a GPU) or `dvc exp run`; `git checkout params.yaml` undoes it.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path
from typing import Any

import yaml

from ftpipe.errors import PipelineError, run_cli
from ftpipe.io import TMP_MARK, remove_path
from ftpipe.params import FLOW_SECTIONS, PARAMS_FILE, SECTIONS, _line_of


def apply_overlay(overlay: Path, params_file: Path = PARAMS_FILE) -> list[str]:
    """Merge `overlay` into `params_file`, validate the result and write it; return the dotted keys
    whose value changed. Raises PipelineError (params_file untouched) on an unknown key or a result
    that does not validate."""
    from ftpipe.checks import check_params

    changes = _read_overlay(overlay)
    rt = _round_trip_yaml()
    data = rt.load(params_file.read_text(encoding="utf-8"))
    changed = []
    for section, values in changes.items():
        if data.get(section) is None:
            data[section] = {}
        for key, value in values.items():
            if data[section].get(key, object()) != value:
                data[section][key] = _flow_lists(value)
                changed.append(f"{section}.{key}")
    out = io.StringIO()
    rt.dump(data, out)
    # Validated where it will live (relative paths in it resolve against the project), then renamed over
    # params.yaml: a reader never sees a half-written or invalid file. ftpipe.io's temporary-file name.
    tmp = params_file.parent / f".{params_file.name}{TMP_MARK}{os.getpid()}"
    try:
        tmp.write_text(out.getvalue(), encoding="utf-8")
        try:
            check_params(tmp, params_file.parent)
        except PipelineError as exc:
            raise PipelineError(f"{str(exc).replace(str(tmp), str(params_file))} "
                                f"(with {overlay} applied; {params_file} left unchanged)") from None
        os.replace(tmp, params_file)
    finally:
        remove_path(tmp)
    return changed


def _read_overlay(overlay: Path) -> dict[str, dict[str, Any]]:
    """The overlay's {section: {key: value}}, every section and key one that params.yaml's models define."""
    try:
        text = overlay.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{overlay}: file not found") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise PipelineError(f"{overlay}:{mark.line + 1 if mark else 1}: invalid YAML") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{overlay}: expected a mapping of params.yaml sections")
    known = {**SECTIONS, **FLOW_SECTIONS}
    for section, values in data.items():
        where = f"{overlay}:{_line_of(text, [str(section)])}"
        if section not in known:
            raise PipelineError(f"{where}: {section}: unknown section (known: {', '.join(known)})")
        if not isinstance(values, dict):
            raise PipelineError(f"{where}: {section}: expected a mapping of keys")
        for key in values:
            if key not in known[section].model_fields:
                raise PipelineError(f"{overlay}:{_line_of(text, [section, str(key)])}: {section}.{key}: unknown key")
    return data


def _round_trip_yaml():
    from ruamel.yaml import YAML
    from ruamel.yaml.representer import RoundTripRepresenter

    class Representer(RoundTripRepresenter):
        """Writes None as `null` (ruamel writes nothing), as params.yaml spells it."""

    Representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    rt = YAML()  # round trip: comments, key order and quoting kept
    rt.Representer = Representer
    rt.preserve_quotes = True
    rt.width = 4096  # never fold a long line (a list of target modules, a comment)
    return rt


def _flow_lists(value: Any) -> Any:
    """Lists written inline, `[q_proj, v_proj]`, as params.yaml writes them."""
    from ruamel.yaml.comments import CommentedSeq

    if not isinstance(value, list):
        return value
    seq = CommentedSeq(_flow_lists(v) for v in value)
    seq.fa.set_flow_style()
    return seq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overlay", type=Path, help="a partial params.yaml, e.g. configs/smollm2-1.7b-qlora-gpu.yaml")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="the file to change (default: params.yaml)")
    args = parser.parse_args()
    changed = apply_overlay(args.overlay, args.params)
    print(f"{args.params}: {len(changed)} keys set from {args.overlay}" + (f": {', '.join(changed)}" if changed else ""))


if __name__ == "__main__":
    run_cli(main)
