"""ftpipe/templates.py: each named chat template renders every role, honours add_generation_prompt
and is prefix-stable (what ftpipe.chat.encode needs to mask the prompt)."""

from __future__ import annotations

import pytest

from ftpipe.chat import IGNORE_INDEX, encode, render
from ftpipe.params import CHAT_TEMPLATES
from ftpipe.templates import NAMED

GENERATION_PROMPTS = {"chatml": "<|im_start|>assistant\n", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                      "zephyr": "<|assistant|>\n", "alpaca": "### Response:\n"}


def test_names_match_the_params_choices():
    assert tuple(NAMED) == CHAT_TEMPLATES == tuple(GENERATION_PROMPTS)


@pytest.mark.parametrize("name", CHAT_TEMPLATES)
def test_named_template_renders_every_role_and_the_generation_prompt(tiny_model_dir, name):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = NAMED[name]
    messages = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "ASK"},
                {"role": "assistant", "content": "REPLY"}, {"role": "user", "content": "AGAIN"}]
    prompt = render(tokenizer, messages, generation_prompt=True)
    assert prompt.index("SYS") < prompt.index("ASK") < prompt.index("REPLY") < prompt.index("AGAIN")
    assert prompt.endswith(GENERATION_PROMPTS[name])
    assert not render(tokenizer, messages, generation_prompt=False).endswith(GENERATION_PROMPTS[name])
    encoded = encode(tokenizer, messages[:3])  # raises if the rendering is not prefix-stable
    learned = tokenizer.decode([t for t in encoded["labels"] if t != IGNORE_INDEX])
    assert learned.startswith("REPLY") and "ASK" not in learned


def test_a_template_file_that_does_not_render_fails_at_once(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from ftpipe.errors import PipelineError
    from ftpipe.templates import apply

    (tmp_path / "broken.jinja").write_text("{% for message in messages %}{{ message['content'] }}")
    with pytest.raises(PipelineError, match=r"^prepare_base.chat_template: broken.jinja does not render a "
                                            r"conversation \(TemplateSyntaxError: .+\)$"):
        apply(AutoTokenizer.from_pretrained(tiny_model_dir), "broken.jinja", source="x", project_dir=tmp_path)
