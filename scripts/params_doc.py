"""Write docs/params.md, the reference of every params.yaml key, from ftpipe/params.py.

Each key's type, limits, default and description come from its field (the description is the
docstring under it), so the reference cannot drift from the code; tests check the file is current.
Run: python -m scripts.params_doc [--check]
"""

from __future__ import annotations

import argparse
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel

from ftpipe.errors import PipelineError, run_cli
from ftpipe.io import write_text
from ftpipe.params import ALSO_READS, FLOW_SECTIONS, SECTIONS
from ftpipe.paths import PARAMS, PARAMS_DOC

ROOT = Path(__file__).resolve().parents[1]  # the shipped params.yaml, wherever this runs from
HEADER = """# params.yaml reference

Generated from `ftpipe/params.py` by `python -m scripts.params_doc`; edit the descriptions there.
Every key below is in the shipped `params.yaml` with the default shown. A stage tracks its own
section as a whole, so changing any key of it reruns that stage and what follows it.
"""

_LIMITS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="), (annotated_types.Lt, "lt", "<"),
           (annotated_types.Le, "le", "<="), (annotated_types.MinLen, "min_length", "length >="),
           (annotated_types.MaxLen, "max_length", "length <="))


def type_name(annotation: Any) -> str:
    """A YAML reader's name for a field's type."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " \\| ".join(f"`{yaml.safe_dump(a, default_flow_style=True).strip().removesuffix('...').strip()}`"
                            for a in args)
    if origin in (Union, types.UnionType):
        named = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        keys = ", ".join(annotation.model_fields)
        return f"mapping ({keys})"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(annotation, str(annotation))


def limits(metadata: list[Any]) -> str:
    found = []
    for item in metadata:
        for kind, attr, sign in _LIMITS:
            if isinstance(item, kind):
                found.append(f"{sign} {getattr(item, attr)}")
    return ", ".join(found)


def default_text(field: Any) -> str:
    value = field.get_default(call_default_factory=True)
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
    return f"`{text}`"


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def section_doc(name: str, model: type[BaseModel]) -> str:
    readers = sorted(stage for stage, keys in ALSO_READS.items() if any(k.startswith(f"{name}.") for k in keys))
    if name in SECTIONS:
        who = f"Read by the `{name}` stage (`python -m stages.{name}`)"
    else:
        who = "Read by a flow, not a DVC stage"
    if readers:
        who += "; some keys also by " + ", ".join(f"`{r}`" for r in readers)
    lines = [f"## {name}", "", cell(model.__doc__ or ""), "", who + ".", "",
             "| key | type | default | description |", "|---|---|---|---|"]
    shipped = list((yaml.safe_load((ROOT / PARAMS).read_text(encoding="utf-8")) or {}).get(name) or {})
    order = {key: i for i, key in enumerate(shipped)}  # the order a user reads in params.yaml
    for key, field in sorted(model.model_fields.items(), key=lambda item: order.get(item[0], len(order))):
        if not field.description:
            raise PipelineError(f"ftpipe/params.py: {name}.{key} has no description (a docstring under the field)")
        kind = type_name(field.annotation)
        bounds = limits(field.metadata)
        lines.append(f"| `{key}` | {kind}{f' ({bounds})' if bounds else ''} | {cell(default_text(field))} | "
                     f"{cell(field.description)} |")
    return "\n".join(lines) + "\n"


def render() -> str:
    parts = [HEADER]
    parts += [section_doc(name, model) for name, model in {**SECTIONS, **FLOW_SECTIONS}.items()]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/params.md is not current")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = PARAMS_DOC.read_text(encoding="utf-8") if PARAMS_DOC.exists() else ""
        if current != text:
            raise PipelineError(f"{PARAMS_DOC}: out of date; run python -m scripts.params_doc")
        print(f"{PARAMS_DOC} is current")
        return
    write_text(PARAMS_DOC, text)
    print(f"wrote {PARAMS_DOC}")


if __name__ == "__main__":
    run_cli(main)
