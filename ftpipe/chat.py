"""Chat-template tokenization shared by training and evaluation.

Training and scoring tokenize a conversation segment by segment (prompt part, assistant part, ...)
so the prompt's tokens are exactly those that generation later sees, and the labels mask every
token that is not written by the assistant (loss on responses only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ftpipe.errors import PipelineError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def prompt_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The text a model is given to write the final assistant turn."""
    return render(tokenizer, messages[:-1], generation_prompt=True)


def encode(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> dict[str, list[int]]:
    """input_ids and labels for one conversation; labels are IGNORE_INDEX outside assistant turns.

    The assistant span includes the template's end-of-turn marker, so the model learns to stop.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True)
        after = render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            raise PipelineError("tokenizer chat template: rendering is not prefix-stable across turns")
        prompt_ids = _ids(tokenizer, before[len(done):])
        answer_ids = _ids(tokenizer, after[len(before):])
        input_ids += prompt_ids + answer_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        done = after
    return {"input_ids": input_ids, "labels": labels}


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def messages_of(row: dict[str, Any]) -> list[dict[str, str]]:
    return row["messages"]


def reference_of(row: dict[str, Any]) -> str:
    return row["messages"][-1]["content"]
