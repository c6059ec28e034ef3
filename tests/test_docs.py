"""The README and docs/ agree with the code: generated parts are current, cited keys and files exist."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from ftpipe.params import FLOW_SECTIONS, SECTIONS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SUMMARY_BLOCK = re.compile(r"<!-- summary: (?P<source>\S+) -->\n(?P<quoted>.*?)<!-- /summary -->", re.S)


def test_the_params_reference_is_generated_from_the_code_and_current():
    from scripts.params_doc import render

    assert (ROOT / "docs" / "params.md").read_text(encoding="utf-8") == render(), \
        "docs/params.md is out of date: python -m scripts.params_doc"


def test_the_params_reference_describes_every_key():
    from scripts.params_doc import render

    text = render()
    for section, model in {**SECTIONS, **FLOW_SECTIONS}.items():
        assert f"\n## {section}\n" in text
        for key, field in model.model_fields.items():
            assert field.description and len(field.description.split()) >= 3, f"{section}.{key}"
            assert f"| `{key}` |" in text


def test_the_readme_quotes_a_run_summary_exactly_as_the_run_wrote_it():
    text = README.read_text(encoding="utf-8")
    blocks = list(SUMMARY_BLOCK.finditer(text))
    assert len(blocks) == 1
    source = ROOT / blocks[0]["source"]
    written = source.read_text(encoding="utf-8")
    assert written.startswith("# Run summary\n") and "**Promotion gate on " in written
    # Quoted one level down (its title becomes a sub-heading), otherwise as written.
    assert blocks[0]["quoted"] == written.replace("# Run summary\n", "### Run summary\n", 1)


def test_the_readme_is_a_guide_not_a_notebook():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, len(lines)
    commands = [line for line in lines if re.fullmatch(r"\s*make (run|test)\s*", line)]
    assert sorted(set(c.strip() for c in commands)) == ["make run", "make test"]


def cited_keys(text: str) -> set[str]:
    sections = "|".join({*SECTIONS, *FLOW_SECTIONS})
    found = re.findall(rf"(?<![\w./-])((?:{sections})\.[a-z_0-9]+)(?![\w/-])", text)
    return {key for key in found if key.split(".")[1] not in {"py", "yaml", "md", "json", "jsonl", "csv"}}


def test_every_param_key_the_readme_and_configs_cite_exists():
    models = {**SECTIONS, **FLOW_SECTIONS}
    for doc in (README, ROOT / "params.yaml", ROOT / "dvc.yaml", *sorted((ROOT / "configs").glob("*.yaml"))):
        for key in cited_keys(doc.read_text(encoding="utf-8")):
            section, field = key.split(".")
            assert field in models[section].model_fields, f"{doc.name}: {key}"


def test_every_project_file_the_readme_and_dvc_yaml_cite_exists():
    pattern = re.compile(r"(?<![\w/.-])((?:ftpipe|stages|flows|services|scripts|scorers|tests|bench|docs|configs)"
                         r"/[\w/.-]+\.(?:py|md|yaml|png|json|txt))")
    for doc in (README, ROOT / "dvc.yaml", ROOT / "params.yaml", ROOT / "Makefile"):
        for cited in pattern.findall(doc.read_text(encoding="utf-8")):
            assert (ROOT / cited).exists(), f"{doc.name} cites {cited}, which does not exist"


def test_module_docstrings_say_what_and_why_briefly():
    long = []
    for folder in ("ftpipe", "stages", "flows", "services", "scripts"):
        for path in sorted((ROOT / folder).glob("*.py")):
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            if len(doc.splitlines()) >= 10:
                long.append(f"{path.relative_to(ROOT)} ({len(doc.splitlines())} lines)")
    assert not long, long


def test_the_readmes_stage_list_is_dvc_yamls_order_and_cites_no_params_lines():
    from flows.common import STAGES

    text = README.read_text(encoding="utf-8")
    block = text[text.index("```\nvalidate "):]
    listed = [line.split()[0] for line in block[4:block.index("```", 4)].splitlines() if line.strip()]
    assert listed == list(STAGES)
    assert not re.search(r"params\.yaml:\d+", text)  # line numbers drift; docs/params.md names keys


def test_editing_a_description_in_the_params_module_reruns_no_stage_but_the_check(finished_project):
    from conftest import dvc

    module = finished_project / "ftpipe" / "params.py"
    module.write_text(module.read_text(encoding="utf-8").replace(
        '"""Seed of the shuffle before the split."""', '"""Seed of the shuffle that comes before the split."""', 1))
    status = dvc(finished_project, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert set(json.loads(status.stdout)) == {"validate"}, status.stdout
