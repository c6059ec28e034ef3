"""packing: every row packed once within the limit, the shared prefix found and stored once, and
packed rows train exactly as rows apart (same loss, same gradients, no row seeing another)."""

from __future__ import annotations

import pytest

from ftpipe import packing, trainer
from ftpipe.chat import IGNORE_INDEX

SYSTEM = "you are a terse bot"


def chat(tokenizer, question: str, answer: str, system: str | None = SYSTEM) -> dict:
    from ftpipe.chat import encode

    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return encode(tokenizer, ([{"role": "system", "content": system}] if system else []) + turns)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from ftpipe import models

    return models.load_tokenizer(tiny_model_dir)


def unpack(item: dict, prefix_len: int) -> list[list[int]]:
    """The rows a packed sequence holds, each rebuilt as prefix + its own tokens."""
    prefix, rows = item["input_ids"][:prefix_len], {}
    for token, segment in zip(item["input_ids"][prefix_len:], item["segments"][prefix_len:]):
        rows.setdefault(segment, list(prefix)).append(token)
    return list(rows.values())


def test_shared_prefix_stops_before_the_first_label(tokenizer):
    rows = [chat(tokenizer, "say red", "red cat"), chat(tokenizer, "say blue", "blue"),
            chat(tokenizer, "say red cat please", "red cat")]
    prefix = packing.shared_prefix(rows)
    text = tokenizer.decode(prefix)
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>") and "say" in text
    first_label = min(r["labels"].index(next(x for x in r["labels"] if x != IGNORE_INDEX)) for r in rows)
    assert len(prefix) < first_label
    # Identical rows share everything up to the token ahead of their first label, never a label.
    same = [chat(tokenizer, "say red", "red cat")] * 2
    assert len(packing.shared_prefix(same)) == same[0]["labels"].index(next(x for x in same[0]["labels"]
                                                                            if x != IGNORE_INDEX)) - 1
    assert packing.shared_prefix([chat(tokenizer, "a", "b", system=None), chat(tokenizer, "a", "b")]) == \
        tokenizer("<|im_start|>", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("with_prefix", [False, True])
def test_pack_rows_places_every_row_once_within_the_limit(tokenizer, with_prefix):
    rows = [chat(tokenizer, "q " * n, "a " * (n % 5 + 1)) for n in range(1, 30)]
    prefix = packing.shared_prefix(rows) if with_prefix else []
    limit = max(len(r["input_ids"]) for r in rows) + 10
    packed = packing.pack_rows(rows, limit, prefix)
    assert len(packed) < len(rows) and all(len(p["input_ids"]) <= limit for p in packed)
    stored = sum(len(p["input_ids"]) for p in packed)
    assert stored == sum(len(r["input_ids"]) for r in rows) - len(prefix) * (len(rows) - len(packed))
    assert sum(p["real_tokens"] for p in packed) == sum(len(r["input_ids"]) for r in rows)
    pieces = []
    for p in packed:
        assert p["input_ids"][:len(prefix)] == prefix and set(p["segments"][:len(prefix)]) <= {packing.PREFIX}
        for segment in set(p["segments"]) - {packing.PREFIX}:
            at = [i for i, s in enumerate(p["segments"]) if s == segment]
            # A row's positions continue from the prefix, as if it were alone; its first token has no label.
            assert [p["position_ids"][i] for i in at] == list(range(len(prefix), len(prefix) + len(at)))
            assert p["labels"][at[0]] == IGNORE_INDEX
        pieces += unpack(p, len(prefix))
    assert sorted(pieces) == sorted(r["input_ids"] for r in rows)
    with pytest.raises(ValueError, match="longer than"):
        packing.pack_rows(rows, limit - 11, prefix)
    with pytest.raises(ValueError, match="shared prefix"):
        packing.pack_rows(rows + [chat(tokenizer, "x", "y", system="another")], limit, packing.shared_prefix(rows))


def test_tightest_packing_takes_the_fewest_padded_positions(tokenizer):
    def padded(sequences):
        return len(sequences) * max(len(s["input_ids"]) for s in sequences)

    # Three rows, each longer than their shared prefix, and room for two per sequence: the widest
    # limit would pad the third row's sequence to twice its length; one row per sequence pads nothing.
    long = [chat(tokenizer, f"{word} " + "q " * 100, "a") for word in ("red", "blue", "green")]
    prefix = packing.shared_prefix(long)
    width = max(len(r["input_ids"]) for r in long)
    assert width > 2 * len(prefix)
    limit = 2 * width - len(prefix)
    tight = packing.tightest_packing(long, limit, prefix)
    assert padded(tight) < padded(packing.pack_rows(long, limit, prefix))
    assert padded(tight) == min(padded(packing.pack_rows(long, n, prefix)) for n in range(width, limit + 1))
    assert sorted(sum((unpack(s, len(prefix)) for s in tight), [])) == sorted(r["input_ids"] for r in long)
    # Short rows all go into one sequence, their shared prefix once.
    short = [chat(tokenizer, "q " * (n % 3 + 1), "a") for n in range(8)]
    assert len(packing.tightest_packing(short, 512, packing.shared_prefix(short))) == 1


def test_attention_mask_allows_own_row_and_prefix_only():
    import torch

    segments = torch.tensor([[0, 0, 1, 1, 2, 2, 2, -1]])
    allowed = packing.attention_mask(segments, kernel="sdpa")[0, 0]
    assert allowed.shape == (8, 8) and not allowed.triu(1).any()  # causal
    assert allowed[4].tolist() == [True, True, False, False, True, False, False, False]  # row 2 sees prefix + itself
    assert allowed[3].tolist() == [True, True, True, True, False, False, False, False]
    assert allowed.any(dim=-1).all()  # no query without a key (padding sees itself)
    additive = packing.attention_mask(segments, kernel="eager")[0, 0]
    assert ((additive == 0) == allowed).all() and additive.min() == torch.finfo(torch.float32).min


@pytest.mark.parametrize("kernel", ["eager", "sdpa", "packed_rows"])
def test_packed_rows_train_exactly_as_rows_apart(tiny_model_dir, tokenizer, kernel):
    """Same loss and gradients as a padded batch of the same rows, and no row sees another (for
    packed_rows, the padded batch takes its dense path and the packed one its per-row blocks)."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    from ftpipe import kernels, models

    model = models.load_model(tiny_model_dir, attn_implementation="eager" if kernel == "packed_rows" else kernel)
    assert kernel != "packed_rows" or kernels.use_packed_attention(model)
    model.train()
    # Rows of similar lengths, as the length-grouped sampler makes them: packed_rows takes its blocks
    # here (one long row beside short ones would take its dense path, tested on the padded batch).
    rows = [chat(tokenizer, q, a) for q, a in (("say red", "red cat"), ("a question on blue", "blue"),
                                               ("say green", "green bird one"), ("name a fruit", "an apple"))]
    apart = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(
        [{**r, "attention_mask": [1] * len(r["input_ids"])} for r in rows])
    prefix = packing.shared_prefix(rows)
    assert len(prefix) > 5
    together = packing.PackedCollator(tokenizer, 256)(rows)
    assert together["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows) - 3 * len(prefix))
    assert int(together["real_tokens"]) == sum(len(r["input_ids"]) for r in rows)
    count = sum(x != IGNORE_INDEX for r in rows for x in r["labels"][1:])

    def loss_and_grads(batch):
        model.zero_grad()
        loss = trainer.response_only_loss(model, batch, num_items_in_batch=count)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_apart, grads_apart = loss_and_grads(apart)
    loss_together, grads_together = loss_and_grads(together)
    assert loss_together == pytest.approx(loss_apart, rel=1e-5)
    for name, grad in grads_apart.items():
        torch.testing.assert_close(grads_together[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # Changing the first row's own tokens leaves the other rows' hidden states alone.
    segments = together["segments"][0]
    changed = dict(together, input_ids=together["input_ids"].clone())
    changed["input_ids"][0, segments == 1] = 5
    with torch.no_grad():
        hidden = []
        for batch in (together, changed):
            mask = packing.attention_mask(batch["segments"], kernel=kernel)
            blocks = {"row_blocks": packing.row_blocks(batch["segments"])} if kernel == "packed_rows" else {}
            assert blocks.get("row_blocks", True) is not None
            out = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=mask,
                                      position_ids=batch["position_ids"], use_cache=False, **blocks).last_hidden_state
            hidden.append(out[0, segments > 1])
    torch.testing.assert_close(hidden[0], hidden[1])


def test_collator_packs_a_batch_and_pads_as_a_segment_of_its_own(tokenizer):
    rows = [chat(tokenizer, "say red", "red cat"), chat(tokenizer, "say blue things now", "blue")]
    prefix = packing.shared_prefix(rows)
    assert packing.PackedCollator(tokenizer, 256)(rows)["input_ids"].shape == (
        1, sum(len(r["input_ids"]) for r in rows) - len(prefix))
    batch = packing.PackedCollator(tokenizer, len(rows[1]["input_ids"]) + 1)(rows)  # one row per sequence
    assert batch["input_ids"].shape[0] == 2 and int(batch["real_tokens"]) == sum(len(r["input_ids"]) for r in rows)
    short = int((batch["segments"][1] != packing.PADDING).sum())
    assert short < batch["input_ids"].shape[1]
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, short:] == tokenizer.pad_token_id).all()
