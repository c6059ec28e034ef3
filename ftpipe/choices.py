"""The fixed choices the stages act on (metric names, method groups, chat templates, pruning names),
apart from ftpipe/params.py so that a stage depends on them but not on the params module's text.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ftpipe.errors import PipelineError

# evaluate.metrics' built-in metrics, in report order (ftpipe/metrics.py computes them). A user
# scorer is named "module:function" and reported under the function's name, which must not be one
# of these or a per-example column's.
BUILTIN_METRICS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "exact_match", "perplexity")
TAKEN_KEYS = {*BUILTIN_METRICS, "nll", "tokens", "general_perplexity", "capped_share"}
SCORER_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def metric_key(spec: str) -> str:
    """The report key of an evaluate.metrics entry: a built-in's name, or a user scorer's function name."""
    return spec.rpartition(":")[2]


def load_scorer(spec: str) -> Callable[[str, str], float]:
    """The function a 'module:function' entry names (imported from the project folder or the venv)."""
    import importlib

    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import error, or the user's module failing as it loads
        raise PipelineError(f"evaluate.metrics: {spec}: cannot import {module_name} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    scorer = getattr(module, name, None)
    if not callable(scorer):
        raise PipelineError(f"evaluate.metrics: {spec}: {module_name} has no function {name}")
    return scorer


CHAT_TEMPLATES = ("chatml", "llama3", "zephyr", "alpaca")  # texts in ftpipe/templates.py
CHAT_TEMPLATE_CHOICES = f"{', '.join(CHAT_TEMPLATES)}, or a .jinja file under the project"

PRUNED_PATTERN = r"^(magnitude_[1-9][0-9]?|2of4)$"
"""quantize.pruned entries: unstructured magnitude pruning of 1-99 % of the weights, or 2:4
semi-structured, spelled `2of4`: YAML 1.1 (PyYAML) reads an unquoted 2:4 as the number 124, and
DVC's writer (YAML 1.2) leaves it unquoted."""

METHODS = ("full", "lora", "qlora", "dora", "ia3", "bottleneck", "prefix_tuning", "prompt_tuning", "p_tuning")
LORA_METHODS = ("lora", "qlora", "dora")
PROMPT_METHODS = ("prefix_tuning", "prompt_tuning", "p_tuning")
"""Virtual tokens added inside peft's forward: they cannot be merged into the weights."""
UNMERGEABLE = (*PROMPT_METHODS, "bottleneck")
"""Methods whose result cannot become plain transformers weights (no merge, GGUF or continual start):
virtual tokens, and bottleneck adapters' non-linearity between two projections."""
