"""The GPU install path and params overlays: requirements-cuda.lock against requirements.lock, the
Makefile's CUDA=1 variant, and scripts/apply_params.py on every shipped overlay in configs/."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftpipe.errors import PipelineError
from ftpipe.params import validate_all
from scripts.apply_params import apply_overlay

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = sorted((ROOT / "configs").glob("*.yaml"))


def pins(lock: Path) -> dict[str, str]:
    """{normalized name: version} of a requirements lock (comments and blank lines skipped)."""
    found = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            found[re.sub(r"[-_.]+", "-", name).lower()] = version
    return found


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder holding a copy of the shipped params.yaml (applying an overlay validates paths against it)."""
    (tmp_path / "params.yaml").write_bytes((ROOT / "params.yaml").read_bytes())
    return tmp_path


def test_configs_ship_an_overlay():
    assert OVERLAYS, "configs/ holds no overlay"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_shipped_overlay_validates_on_the_shipped_params(overlay: Path, project: Path):
    params_file = project / "params.yaml"
    changed = apply_overlay(overlay, params_file)
    assert changed
    sections = validate_all(params_file)
    for section, values in yaml.safe_load(overlay.read_text()).items():
        for key, value in values.items():
            assert getattr(sections[section], key) == value, f"{section}.{key}"
    # The header gives the exact command that applies it, with its own path (torchtune's convention).
    assert f"python -m scripts.apply_params configs/{overlay.name}" in overlay.read_text()


def test_apply_keeps_params_comments_and_layout(project: Path):
    params_file = project / "params.yaml"
    before = params_file.read_text()
    apply_overlay(OVERLAYS[0], params_file)
    after = params_file.read_text()
    comments = [line[line.index("#"):] for line in before.splitlines() if "#" in line]
    assert all(comment in after for comment in comments)
    assert len(after.splitlines()) == len(before.splitlines())  # each value replaced in place
    # None written `null`, as params.yaml spells it: a key without a value only opens a nested mapping.
    lines = after.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^ +[\w.]+:\s*(#.*)?$", line):
            indent = len(line) - len(line.lstrip())
            assert len(lines[i + 1]) - len(lines[i + 1].lstrip()) > indent, line

    # An overlay of values params.yaml already has changes nothing, byte for byte.
    same = project / "same.yaml"
    same.write_text("train:\n  seed: 42\n  target_modules: [q_proj, k_proj, v_proj, o_proj]\nretrain:\n  cron: '0 3 * * *'\n")
    params_file.write_text(before)
    assert apply_overlay(same, params_file) == []
    assert params_file.read_text() == before


def test_unknown_key_fails_naming_the_overlay_and_key_and_changes_nothing(project: Path):
    params_file = project / "params.yaml"
    before = params_file.read_bytes()
    overlay = project / "typo.yaml"
    overlay.write_text("train:\n  method: qlora\n  learnin_rate: 0.0002\n")
    with pytest.raises(PipelineError) as caught:
        apply_overlay(overlay, params_file)
    assert str(caught.value) == f"{overlay}:3: train.learnin_rate: unknown key"
    assert params_file.read_bytes() == before

    overlay.write_text("trainer:\n  method: qlora\n")
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(overlay))}:1: trainer: unknown section"):
        apply_overlay(overlay, params_file)
    assert params_file.read_bytes() == before


def test_invalid_result_fails_naming_params_and_leaves_no_temporary_file(project: Path):
    params_file = project / "params.yaml"
    before = params_file.read_bytes()
    overlay = project / "half.yaml"
    overlay.write_text("train:\n  method: qlora\n")  # qlora without train.quantization
    with pytest.raises(PipelineError) as caught:
        apply_overlay(overlay, params_file)
    message = str(caught.value)
    assert message.startswith(f"{params_file}:") and "train.quantization: required for method 'qlora'" in message
    assert f"with {overlay} applied" in message and "\n" not in message
    assert params_file.read_bytes() == before
    assert sorted(p.name for p in project.iterdir()) == ["half.yaml", "params.yaml"]


def test_cli_prints_one_error_line_and_exits_2(project: Path):
    overlay = project / "typo.yaml"
    overlay.write_text("evaluate:\n  batch_sise: 64\n")
    proc = subprocess.run([sys.executable, "-m", "scripts.apply_params", str(overlay), "--params",
                           str(project / "params.yaml")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {overlay}:2: evaluate.batch_sise: unknown key"


def test_cuda_lock_is_the_cpu_lock_with_a_cuda_torch():
    cpu, cuda = pins(ROOT / "requirements.lock"), pins(ROOT / "requirements-cuda.lock")
    assert cpu["torch"].endswith("+cpu")
    cuda_torch = re.search(r"^CUDA_TORCH := torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert cuda["torch"] == cuda_torch and "+" not in cuda["torch"]  # PyPI's Linux build: CUDA
    assert {"nvidia-cudnn-cu13", "nvidia-nccl-cu13", "triton"} <= set(cuda)  # what that build pulls in
    assert set(cpu) <= set(cuda), "a package of requirements.lock is missing from requirements-cuda.lock"
    assert {name: cuda[name] for name in cpu if name != "torch"} == {name: v for name, v in cpu.items() if name != "torch"}
    # Only the CUDA torch's own dependencies are added; setuptools is one (pip freeze leaves it out of
    # requirements.lock, pip's installation report does not).
    extra = set(cuda) - set(cpu)
    assert all(name.startswith(("nvidia-", "cuda-")) or name in {"triton", "setuptools"} for name in extra), extra


def test_pinned_bitsandbytes_carries_cuda_kernels():
    """The same bitsandbytes wheel serves both locks: its CUDA kernels ship inside it."""
    package = Path(importlib.util.find_spec("bitsandbytes").submodule_search_locations[0])
    assert list(package.glob("libbitsandbytes_cuda1[23]*.so")), "no CUDA 12/13 kernels in the pinned bitsandbytes"


def make_dry_run(*args: str) -> str:
    # -B: every command, whatever the stamps in .venv say; -n: printed, not run.
    return subprocess.run(["make", "-n", "-B", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_make_installs_the_cuda_lock_only_with_cuda_1():
    cuda = make_dry_run("setup", "CUDA=1")
    assert "pip install --quiet -r requirements-cuda.lock" in cuda and "requirements.lock" not in cuda
    assert "touch .venv/.installed-cuda" in cuda
    for default in (make_dry_run("setup"), make_dry_run("run"), make_dry_run("test")):
        assert "-c requirements.lock" in default and "requirements-cuda.lock" not in default
        assert "touch .venv/.installed-cpu" in default
    assert "requirements-cuda.lock" in make_dry_run("run", "CUDA=1")


def test_readme_documents_the_gpu_path():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## On a GPU", 1)[1].split("\n## ", 1)[0]
    assert "make setup CUDA=1" in section
    for overlay in OVERLAYS:
        assert f"configs/{overlay.name}" in section
