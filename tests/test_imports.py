"""The layout's import rules: the shared package imports nothing from flows/ or stages/, a stage
imports no other stage and no flow, a module in flows/ imports no stage and no flow (a module with a
Prefect @flow), nothing in ftpipe/, stages/ or flows/ imports the user commands in services/, and no module
imports or reads another's private (underscore) name. Tests and benchmarks may import anything."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("ftpipe", "stages", "flows", "services")
# The packages services/ builds on, which must not depend on it.
BELOW_SERVICES = ("ftpipe", "stages", "flows")


def imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) for every import in `path`, at any depth (the stages import inside functions)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, alias.name) for alias in node.names]
    return found


def is_flow(path: Path) -> bool:
    return path.is_file() and "@flow(" in path.read_text()


def broken_rules(path: Path) -> list[str]:
    package, own = path.parent.name, f"{path.parent.name}.{path.stem}"
    broken = []
    for module, name in imports(path):
        top = module.split(".")[0]
        if top not in PACKAGES:
            continue
        # `from flows import pipeline` names a module: count it as that module.
        target = f"{module}.{name}" if name and module in PACKAGES else module
        if top == "stages" and target != own:
            broken.append(f"{own} imports the stage {target}")
        if top == "flows" and package == "ftpipe":
            broken.append(f"{own} imports {target} from flows/")
        elif top == "flows" and target != own and is_flow(path.parents[1] / (target.replace(".", "/") + ".py")):
            broken.append(f"{own} imports the flow {target}")
        if top == "services" and package in BELOW_SERVICES:
            broken.append(f"{own} imports {target} from services/")
        if name and private(name):
            broken.append(f"{own} imports the private name {module}.{name}")
    return broken + [f"{own} reads the private name {target}" for target in private_attributes(path)]


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_attributes(path: Path) -> list[str]:
    """`module._name` where `module` is a project module this file imported (`from ftpipe import models`)."""
    tree = ast.parse(path.read_text())
    modules = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in PACKAGES:
            modules.update({alias.asname or alias.name: f"{node.module}.{alias.name}" for alias in node.names})
        elif isinstance(node, ast.Import):
            modules.update({alias.asname: alias.name for alias in node.names
                            if alias.asname and alias.name.split(".")[0] in PACKAGES})
    return [f"{modules[node.value.id]}.{node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
            and private(node.attr)]


def test_no_module_imports_a_stage_a_flow_or_a_private_name():
    broken = [line for package in PACKAGES for path in sorted((ROOT / package).glob("*.py"))
              for line in broken_rules(path)]
    assert broken == []


def test_each_rule_is_caught(tmp_path):
    """The checker itself: each kind of import it must refuse, once."""
    cases = {
        "ftpipe/helper.py": ("from flows.common import STAGES", "ftpipe.helper imports flows.common from flows/"),
        "stages/one.py": ("def run():\n    from stages import two", "stages.one imports the stage stages.two"),
        "flows/other.py": ("from flows import pipeline", "flows.other imports the flow flows.pipeline"),
        "flows/third.py": ("from ftpipe.models import _resolved",
                           "flows.third imports the private name ftpipe.models._resolved"),
        "stages/four.py": ("from ftpipe import models\nmodels._resolved('x')",
                           "stages.four reads the private name ftpipe.models._resolved"),
        "ftpipe/five.py": ("from services.proxy import HOST", "ftpipe.five imports services.proxy from services/"),
        "stages/six.py": ("def run():\n    from services import stack", "stages.six imports services.stack from services/"),
        "flows/seven.py": ("import services.serve", "flows.seven imports services.serve from services/"),
        "services/eight.py": ("from services.stack import _write", "services.eight imports the private name services.stack._write"),
    }
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "pipeline.py").write_text("@flow(name='x')\ndef pipeline(): ...\n")
    (tmp_path / "flows" / "common.py").write_text("STAGES = ()\n")
    for relative, (source, line) in cases.items():
        path = tmp_path / relative
        path.parent.mkdir(exist_ok=True)
        path.write_text(source + "\n")
        assert broken_rules(path) == [line]
    (tmp_path / "flows" / "fine.py").write_text("from flows.common import STAGES\nfrom flows import common\n")
    assert broken_rules(tmp_path / "flows" / "fine.py") == []
    (tmp_path / "services" / "fine.py").write_text("from services.proxy import HOST\nfrom ftpipe import paths\nfrom flows import common\n")
    assert broken_rules(tmp_path / "services" / "fine.py") == []
