"""Chat templates for base models that ship without one (params.yaml `prepare_base.chat_template`).

prepare_base sets the chosen template on the base tokenizer before saving it to models/base/, so
every later stage renders conversations with it. A named template's markers (`<|im_start|>`, ...) are
tokenized as plain text unless the vocabulary has them as tokens; fine-tuning teaches them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftpipe.choices import CHAT_TEMPLATE_CHOICES
from ftpipe.errors import PipelineError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# ChatML, as OpenAI described it (openai-python chatml.md, 2023) and Qwen2 / SmolLM2 ship it
# (without their default system prompt).
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json; bos_token guarded for tokenizers without one.
LLAMA3 = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 and bos_token %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# HuggingFaceH4/zephyr-7b-beta tokenizer_config.json, verbatim (transformers renders with trim_blocks).
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
# The Stanford Alpaca prompt (tatsu-lab/stanford_alpaca README, the variant without input) as turns:
# a system message replaces its preamble, each reply ends with eos so the model learns to stop.
ALPACA = ("{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
          "{% set turns = messages[1:] %}{% else %}{{ 'Below is an instruction that describes a task. Write a "
          "response that appropriately completes the request.\n\n' }}{% set turns = messages %}{% endif %}"
          "{% for message in turns %}{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + "
          "'\n\n' }}{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + "
          "'\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}")

NAMED = {"chatml": CHATML, "llama3": LLAMA3, "zephyr": ZEPHYR, "alpaca": ALPACA}  # names: params.CHAT_TEMPLATES
SAMPLE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


def apply(tokenizer: PreTrainedTokenizerBase, choice: str | None, *, source: str, project_dir: Path = Path(".")
          ) -> dict[str, Any]:
    """Set `choice` (a name in NAMED or a .jinja path) as the tokenizer's chat template, replacing its
    own; keep its own for None. Returns the manifest entry: what was used, its sha256, what it replaced."""
    import hashlib

    had = tokenizer.chat_template is not None
    if choice is None:
        if not had:
            raise PipelineError(f"{source}: tokenizer has no chat template; set prepare_base.chat_template "
                                f"({CHAT_TEMPLATE_CHOICES})")
        return {"given": None, "replaced": False}
    text = NAMED[choice] if choice in NAMED else (project_dir / choice).read_text(encoding="utf-8")
    tokenizer.chat_template = text
    try:  # a broken file fails here, once, rather than in every later stage
        tokenizer.apply_chat_template(SAMPLE, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja raises TemplateSyntaxError, UndefinedError, TypeError...
        raise PipelineError(f"prepare_base.chat_template: {choice} does not render a conversation "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return {"given": choice, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "replaced": had}
