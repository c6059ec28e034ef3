"""A normal offline run prints no false alarms: no telemetry ERROR, no library FutureWarning, no
bitsandbytes kernel-download notice. The pipeline's defaults turn every library's telemetry off (the
whole flow run's output is checked in test_flow_run.py)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
from conftest import ROOT, stage_env


def test_telemetry_defaults_set_on_import(monkeypatch):
    import ftpipe

    for name in ftpipe.QUIET_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    importlib.reload(ftpipe)
    for name, value in ftpipe.QUIET_DEFAULTS.items():
        assert os.environ[name] == value
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert os.environ["DVC_NO_ANALYTICS"]
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"


def test_telemetry_defaults_keep_user_value(monkeypatch):
    import ftpipe

    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "0")
    importlib.reload(ftpipe)
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true"
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "0"


def test_flows_package_sets_defaults_before_prefect():
    """`python -m flows.pipeline` imports flows/__init__ before `from prefect import ...`."""
    code = "import os, flows, sys; print(os.environ['PREFECT_SERVER_ANALYTICS_ENABLED'], 'prefect' in sys.modules)"
    env = {k: v for k, v in stage_env().items() if k not in ("PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["false", "False"]


@pytest.mark.parametrize("user_value", [None, "45"])
def test_flows_wait_for_a_migrating_temporary_server(user_value):
    """Prefect's own 20 s is too short for a new home's migrations on a loaded machine; a user's value
    is kept. What Prefect itself reads after `import flows`."""
    code = ("import flows; from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as s; "
            "print(s.value())")
    env = {k: v for k, v in stage_env().items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    if user_value:
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = user_value
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split()[-1] == (user_value or "180")


def test_bnb_kernel_notice_filtered_narrowly(caplog):
    import logging

    import ftpipe  # noqa: F401  (installs the filter)

    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no kernels")
        bnb.warning("some other bitsandbytes warning")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["some other bitsandbytes warning"]


def _future_warnings(action) -> list[str]:
    """FutureWarning messages from `action`, under Python's default filters plus ftpipe's."""
    import warnings

    import ftpipe

    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        importlib.reload(ftpipe)  # its filters go in front of "always"
        action()
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def test_peft_checkpointing_notice_filtered_narrowly(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert _future_warnings(lambda: model.is_gradient_checkpointing) == []
    # Other deprecations still show: the filter is by message.
    assert any("gradient_checkpointing_enable" in m for m in _future_warnings(model.gradient_checkpointing_enable))


def test_qlora_checkpointing_uses_new_names(tiny_model_dir):
    """methods.build for qlora with checkpointing: no deprecated-name FutureWarning, checkpointing on."""
    import yaml

    from ftpipe import methods
    from ftpipe.params import TrainParams

    cfg = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    params = TrainParams(**{**cfg, "method": "qlora", "quantization": "int8", "gradient_checkpointing": True})
    built = []
    assert _future_warnings(lambda: built.append(methods.build(params, tiny_model_dir, bf16=False))) == []
    assert built[0].base_model.model.is_activation_checkpointing
