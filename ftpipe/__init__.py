"""Shared code for the fine-tuning pipeline's stages: params, data IO, model loading, metrics, tracking.

Each module is small and single-purpose; stages import what they need. Nothing heavy happens at
import time (torch, transformers and mlflow are imported inside the functions that use them).
"""

import logging
import os
import warnings

from ftpipe.credentials import redact_logging

redact_logging()  # before any library logs a URL that carries credentials

# Libraries that call home by default, off unless the user's environment says otherwise (setdefault):
# offline, Prefect's temporary server logs "ERROR ... Failed to send telemetry", which reads as a failure.
# Every stage and flow imports this package (flows/__init__.py does, before `from prefect import ...`)
# ahead of the libraries, which read these when imported; subprocesses (dvc, the Prefect server) inherit them.
QUIET_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the Prefect server's telemetry heartbeat
    "DO_NOT_TRACK": "true",  # the shared opt-out: Prefect's client analytics, MLflow, Hugging Face hub
    "DVC_NO_ANALYTICS": "1",  # any non-empty value; `dvc config core.analytics false` is the per-project one
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",  # transformers, datasets, peft, trl
}
for _name, _value in QUIET_DEFAULTS.items():
    os.environ.setdefault(_name, _value)

# bitsandbytes tries to fetch an optional CPU 4-bit kernel from the Hugging Face hub when imported and warns
# when it cannot (no `kernels` package, or offline); it falls back to its own kernel, so the notice is noise.
_BNB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _drop_bnb_kernel_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_BNB_KERNEL_NOTICE)


_bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
if not any(getattr(f, "__name__", "") == "_drop_bnb_kernel_notice" for f in _bnb_logger.filters):
    _bnb_logger.addFilter(_drop_bnb_kernel_notice)

# peft reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model (PeftModel's
# __init__); the project itself uses the new `activation_checkpointing` names. Only that message is hidden.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                        module=r"transformers\.modeling_utils")
