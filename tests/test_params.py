"""params.yaml and dvc.yaml agree with the code, and bad params fail naming the key and line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from ftpipe.errors import PipelineError
from ftpipe.params import ALSO_READS, FLOW_SECTIONS, SECTIONS, TrainParams, load_section, load_stage_params

ROOT = Path(__file__).resolve().parents[1]


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_shipped_params_validate_for_every_stage():
    for stage in SECTIONS:
        load_stage_params(stage, ROOT / "params.yaml")
    for section, model in FLOW_SECTIONS.items():
        load_section(section, model, ROOT / "params.yaml")


def test_dvc_yaml_lists_exactly_the_keys_each_stage_reads():
    stages = dvc_stages()
    # Every stage but validate reads its own section, or (prepare_parent) only keys of others.
    assert [s for s in stages if s in SECTIONS] == list(SECTIONS)
    assert set(stages) == {"validate", *SECTIONS, *ALSO_READS}
    # validate reads the whole file, so that any edit (a mistyped key too) reruns the check, and
    # every other stage depends on its output, so that `dvc repro <any stage>` runs it first.
    assert "params.yaml" in stages["validate"]["deps"] and "params" not in stages["validate"]
    assert [next(iter(out)) for out in stages["validate"]["outs"]] == ["reports/validated.json"]
    for stage in set(stages) - {"validate"}:
        model = SECTIONS.get(stage)
        listed = stages[stage].get("params", [])
        # Its own section as a whole (every key of it is read), then single keys of other sections.
        own = [stage] if model else []
        assert listed[:len(own)] == own and len(set(listed)) == len(listed), stage
        assert set(listed) == {*own, *ALSO_READS.get(stage, ())}, stage
        assert stages[stage]["cmd"] == f"python -m stages.{stage}"
        assert f"stages/{stage}.py" in stages[stage]["deps"]
        assert "reports/validated.json" in stages[stage]["deps"], stage


def test_keys_read_from_another_section_exist_there():
    for stage, keys in ALSO_READS.items():
        assert stage in dvc_stages()
        for key in keys:
            section, field = key.split(".")
            assert section != stage and field in {**SECTIONS, **FLOW_SECTIONS}[section].model_fields, key


def test_every_output_persists_so_a_failed_run_keeps_the_previous_results():
    for stage, spec in dvc_stages().items():
        for kind in ("outs", "metrics", "plots"):
            for out in spec.get(kind, []):
                path, options = (out, {}) if isinstance(out, str) else next(iter(out.items()))
                assert options.get("persist") is True, (stage, path)


def test_params_yaml_spells_out_every_key():
    # DVC refuses to track a params key that is missing from params.yaml.
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(params) == set(SECTIONS) | set(FLOW_SECTIONS)
    for stage, model in {**SECTIONS, **FLOW_SECTIONS}.items():
        assert set(params[stage]) == set(model.model_fields), stage


def ftpipe_imports(path: Path) -> set[str]:
    """ftpipe modules a file imports, at any depth of the file (imports inside functions count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "ftpipe":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ftpipe."):
            found.add(node.module.split(".")[1])
    return found


def test_dvc_deps_cover_the_shared_modules_each_stage_imports():
    stages = dvc_stages()
    for stage in stages:
        closure, todo = set(), ftpipe_imports(ROOT / "stages" / f"{stage}.py")
        while todo:
            name = todo.pop()
            if name not in closure:
                closure.add(name)
                todo |= ftpipe_imports(ROOT / "ftpipe" / f"{name}.py")
        assert closure, stage
        # The params module reaches a stage as values, which DVC tracks in params.yaml; as a dep it
        # would rerun every stage when a description in it changes. validate runs its checks.
        needed = closure - {"params"} if stage != "validate" else closure
        deps = set(stages[stage]["deps"])
        missing = {f"ftpipe/{name}.py" for name in needed} - deps
        assert not missing, (stage, missing)
        assert stage == "validate" or "ftpipe/params.py" not in deps, stage


def test_flow_runs_the_dvc_stages_in_order():
    from flows.common import STAGES

    assert list(STAGES) == list(dvc_stages())


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_file_line_and_key(tmp_path):
    path = write(tmp_path, "train:\n  seed: 1\n  learning_rat: 0.1\n")
    with pytest.raises(PipelineError) as err:
        load_section("train", TrainParams, path)
    assert str(err.value) == f"{path}:3: train.learning_rat: unknown key"


def test_mistyped_value_names_key(tmp_path):
    path = write(tmp_path, "train:\n  learning_rate: fast\n")
    with pytest.raises(PipelineError, match=r"params.yaml:2: train.learning_rate: Input should be a valid number"):
        load_section("train", TrainParams, path)


def test_invalid_choice_names_key_and_value(tmp_path):
    path = write(tmp_path, "train:\n  lr_scheduler: zigzag\n")
    with pytest.raises(PipelineError, match=r":2: train.lr_scheduler: .*'zigzag'"):
        load_section("train", TrainParams, path)


def test_a_negative_retry_delay_names_the_key_and_entry(tmp_path):
    from ftpipe.params import RetrainParams

    path = write(tmp_path, "retrain:\n  registry_retry_delays_s: [5, -1]\n")
    with pytest.raises(PipelineError, match=r":2: retrain.registry_retry_delays_s.1: .*greater than or equal to 0"):
        load_section("retrain", RetrainParams, path)
    assert load_section("retrain", RetrainParams, write(tmp_path, "retrain:\n  registry_retry_delays_s: []\n")) \
        .registry_retry_delays_s == []


def test_cross_field_check_names_the_field(tmp_path):
    path = write(tmp_path, "prepare_base:\n  source: local\n  path: null\n")
    with pytest.raises(PipelineError, match=r":3: prepare_base.path: required when source is 'local'"):
        load_stage_params("prepare_base", path)


def test_missing_section_and_file(tmp_path):
    with pytest.raises(PipelineError, match="missing section 'evaluate'"):
        load_stage_params("evaluate", write(tmp_path, "train: {}\n"))
    with pytest.raises(PipelineError, match="file not found"):
        load_stage_params("evaluate", tmp_path / "absent.yaml")


def test_invalid_yaml_names_line(tmp_path):
    with pytest.raises(PipelineError, match=r"params.yaml:3: invalid YAML"):
        load_stage_params("train", write(tmp_path, "train:\n  seed: 1\n   bad: [\n"))


def test_yaml_float_without_dot_is_accepted(tmp_path):
    # PyYAML reads 2e-4 as a string; it must still validate as a number.
    params = load_section("train", TrainParams, write(tmp_path, "train:\n  learning_rate: 2e-4\n"))
    assert params.learning_rate == pytest.approx(2e-4)


@pytest.mark.parametrize(("key", "value"), [("learning_rate", ".inf"), ("epochs", ".inf"),
                                            ("weight_decay", ".nan"), ("warmup_ratio", "-.inf")])
def test_inf_and_nan_are_rejected(tmp_path, key, value):
    path = write(tmp_path, f"train:\n  seed: 1\n  {key}: {value}\n")
    with pytest.raises(PipelineError, match=rf"params.yaml:3: train.{key}: .*finite"):
        load_section("train", TrainParams, path)


def test_the_whole_file_is_validated_unknown_sections_too(tmp_path):
    from ftpipe.params import validate_all

    text = (ROOT / "params.yaml").read_text()
    assert set(validate_all(write(tmp_path, text))) == set(SECTIONS) | set(FLOW_SECTIONS)
    typo = text.replace("  lr_scheduler: cosine", "  lr_scheduler: cosine\n  learning_rat: 0.001")
    with pytest.raises(PipelineError, match=r"params.yaml:\d+: train.learning_rat: unknown key"):
        validate_all(write(tmp_path, typo))
    with pytest.raises(PipelineError, match=r"params.yaml:\d+: evaluat: unknown section"):
        validate_all(write(tmp_path, text + "evaluat:\n  max_examples: 3\n"))


def test_a_data_length_limit_above_the_training_one_names_both_keys(tmp_path):
    from ftpipe.params import validate_all

    text = (ROOT / "params.yaml").read_text()
    longer = text.replace("  max_tokens: 256", "  max_tokens: 1024", 1)
    assert longer != text
    with pytest.raises(PipelineError, match=r"params.yaml:\d+: prepare_data.max_tokens: 1024 exceeds "
                                            r"train.max_length \(256\)"):
        validate_all(write(tmp_path, longer))
    shorter = text.replace("  max_tokens: 256", "  max_tokens: 128", 1)  # rows the training never cuts
    assert validate_all(write(tmp_path, shorter))["prepare_data"].max_tokens == 128


def test_code_defaults_are_the_shipped_values():
    """One home for each default: a section left out of params.yaml means what params.yaml ships,
    and the "key not used by this method" check compares with these defaults."""
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, model in {**SECTIONS, **FLOW_SECTIONS}.items():
        for name, field in model.model_fields.items():
            assert field.get_default(call_default_factory=True) == shipped[section][name], f"{section}.{name}"
