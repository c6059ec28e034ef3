"""The paths the stages read and write have one home (ftpipe/paths.py) and match dvc.yaml."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from ftpipe import paths

ROOT = Path(__file__).resolve().parents[1]
# Named by stages but deliberately not DVC-tracked: checkpoints must survive DVC deleting outs.
UNTRACKED = {paths.CHECKPOINTS, paths.DPO_CHECKPOINTS}


def declared(stage: dict) -> tuple[set[Path], set[Path]]:
    """(deps, outputs) of one dvc.yaml stage, outputs being outs, metrics and plots."""
    deps = {Path(d.split("#")[0].strip()) for d in stage.get("deps", []) if not d.startswith("${")}
    outs = set()
    for kind in ("outs", "metrics", "plots"):
        for entry in stage.get(kind, []):
            outs |= {Path(p) for p in (entry if isinstance(entry, dict) else {entry: None})}
    return deps, outs


def constants_named(module: Path) -> set[Path]:
    """Values of the ftpipe.paths constants a module names (`from ftpipe.paths import X` or `paths.X`)."""
    names = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "ftpipe.paths":
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "paths":
            names.add(node.attr)
    values = {getattr(paths, name) for name in names}
    return {v for v in values if isinstance(v, Path)}


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_path_a_stage_names_is_declared_for_it_in_dvc_yaml():
    for name, stage in dvc_stages().items():
        deps, outs = declared(stage)
        tracked = deps | outs
        for path in constants_named(ROOT / "stages" / f"{name}.py") - UNTRACKED:
            # A folder constant (reports/) stands for the declared files in it.
            ok = path in tracked or any(path in t.parents for t in tracked)
            assert ok, f"stages/{name}.py uses {path}, which dvc.yaml does not declare for {name}"


def test_every_output_dvc_yaml_declares_is_named_by_its_stage():
    for name, stage in dvc_stages().items():
        _, outs = declared(stage)
        named = constants_named(ROOT / "stages" / f"{name}.py")
        missing = outs - named
        assert not missing, f"dvc.yaml declares {sorted(map(str, missing))} for {name}; stages/{name}.py never names them"


def test_no_module_spells_a_declared_path_itself():
    tracked = set()
    for stage in dvc_stages().values():
        deps, outs = declared(stage)
        tracked |= {p for p in deps | outs if p.parts[0] not in ("stages", "ftpipe")}
    # The paths, and the file names of declared files (folders' last parts are too common a word).
    spelled = {str(p) for p in tracked} | {f"{p}/" for p in tracked} | {p.name for p in tracked if p.suffix}
    offenders = []
    for folder in ("ftpipe", "stages", "flows", "services", "bench"):
        for module in sorted((ROOT / folder).glob("*.py")):
            if module == ROOT / "ftpipe" / "paths.py":
                continue
            tree = ast.parse(module.read_text())
            docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                          if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                          and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                    if node.value in spelled:
                        offenders.append(f"{module.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not offenders, "use ftpipe.paths instead of:\n" + "\n".join(offenders)


def test_the_project_layout_exists_where_paths_says():
    assert (ROOT / paths.PARAMS).is_file() and (ROOT / paths.RAW_DIR).is_dir()
    assert {str(p) for p in paths.OUTPUT_FOLDERS} == {"models", "data", "reports"}
