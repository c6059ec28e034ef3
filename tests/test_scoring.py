"""One pass per batch (ftpipe.scoring) gives what generate + a separate NLL forward give: the same
greedy replies, the same reference NLLs, and it says which replies ran out of tokens."""

from __future__ import annotations

import pytest
from conftest import qa_rows

from ftpipe import metrics, models, scoring
from ftpipe.chat import prompt_text


@pytest.fixture(scope="module")
def talking(talking_model):
    return models.load_model(talking_model / "merged"), models.load_tokenizer(talking_model / "merged")


def conversations(n: int, offset: int = 0) -> list[list[dict[str, str]]]:
    convs = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
             for r in qa_rows(n, offset)]
    # Longer prompts too (earlier turns, as few-shot prompts have), so batches mix lengths.
    return convs + [convs[0] + c for c in convs[: n // 2]]


@pytest.mark.parametrize("max_new_tokens", [3, 24])
def test_one_pass_matches_generate_and_a_separate_nll_forward(talking, max_new_tokens):
    model, tokenizer = talking
    convs = conversations(10)
    scored = scoring.score(model, tokenizer, convs, max_new_tokens=max_new_tokens, batch_size=4)
    prompts = [prompt_text(tokenizer, c) for c in convs]
    expected = metrics.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=4)
    assert scored.outputs == expected
    assert any(scored.outputs)  # the talking model answers in words: a real comparison
    nll = metrics.response_nll(model, tokenizer, convs, batch_size=4)
    assert [t for _, t in scored.nll] == [t for _, t in nll]
    assert [n for n, _ in scored.nll] == pytest.approx([n for n, _ in nll], rel=1e-4, abs=1e-4)  # fp32 sums in another order
    # The two-pass way (for models the loop cannot drive) gives the same again.
    items = [scoring.prompt_and_reference(tokenizer, c) for c in convs]
    tokens, two_pass_nll = scoring.two_pass(model, tokenizer, items, max_new_tokens)
    assert [t.strip() for t in tokenizer.batch_decode(tokens, skip_special_tokens=True)] == expected
    assert [n for n, _ in two_pass_nll] == pytest.approx([n for n, _ in nll], rel=1e-4, abs=1e-4)  # fp32 sums in another order


def test_replies_cut_at_the_token_limit_are_counted(talking):
    model, tokenizer = talking
    convs = conversations(6)
    short = scoring.score(model, tokenizer, convs, max_new_tokens=2, batch_size=3)
    long = scoring.score(model, tokenizer, convs, max_new_tokens=40, batch_size=3)
    # Two tokens end no reply of words and an end marker; forty end every one the talking model says.
    assert all(short.capped) and not any(long.capped)
    assert short.new_tokens == 2 * len(convs) and long.new_tokens > short.new_tokens
    block, _, _ = scoring.score_model(model, tokenizer, convs, max_new_tokens=2, batch_size=3, stemmer=True,
                                      name="t")
    assert block[metrics.CAPPED_KEY] == 1.0


def test_batch_size_does_not_change_the_scores(talking):
    model, tokenizer = talking
    convs = conversations(8)
    one = scoring.score(model, tokenizer, convs, max_new_tokens=12, batch_size=1)
    many = scoring.score(model, tokenizer, convs, max_new_tokens=12, batch_size=6)
    assert one.outputs == many.outputs
    assert [n for n, _ in one.nll] == pytest.approx([n for n, _ in many.nll], rel=1e-4, abs=1e-4)  # fp32 sums in another order


@pytest.mark.parametrize("prefill_positions", [1, 60, 4096])
def test_a_shared_prefix_and_prefill_groups_change_no_score(talking, prefill_positions):
    """Prompts that share their start (a system prompt and few-shot turns) run it once, and the rest of
    each prompt with its reference in groups of like length (one row each, a few, all): the replies
    are generate's and the NLLs a separate forward's."""
    from ftpipe.evaluation import with_shots

    model, tokenizer = talking
    shots = [{"id": f"s{i}", "messages": c} for i, c in enumerate(conversations(3, offset=20))]
    convs = [with_shots(c, shots) for c in conversations(8)]
    items = [scoring.prompt_and_reference(tokenizer, c) for c in convs]
    assert scoring._shared_prefix([p for p, _ in items]) > 20  # the shots' turns: a real shared prefix
    groups = scoring._chunks(items, scoring._shared_prefix([p for p, _ in items]), prefill_positions)
    if prefill_positions == 60:  # some rows share a forward, not all
        assert 1 < len(groups) < len(items)
    scored = scoring.score(model, tokenizer, convs, max_new_tokens=16, batch_size=len(convs),
                           prefill_positions=prefill_positions)
    expected = metrics.generate(model, tokenizer, [prompt_text(tokenizer, c) for c in convs], max_new_tokens=16,
                                batch_size=4)
    assert scored.outputs == expected and any(expected)
    nll = metrics.response_nll(model, tokenizer, convs, batch_size=4)
    assert [t for _, t in scored.nll] == [t for _, t in nll]
    assert [n for n, _ in scored.nll] == pytest.approx([n for n, _ in nll], rel=1e-4, abs=1e-4)  # fp32 sums in another order


def test_the_decode_cache_writes_in_place_and_grows_past_its_room():
    """ftpipe.kvcache: steps that fit the buffer's room are written into it (no copy of the cache);
    past the room it concatenates; either way it holds what transformers' DynamicLayer holds."""
    import torch
    from transformers.cache_utils import DynamicLayer

    from ftpipe.kvcache import roomy_cache

    keys, values = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    room_keys, room_values = torch.zeros(2, 3, 6, 5), torch.zeros(2, 3, 6, 5)
    room_keys[:, :, :4], room_values[:, :, :4] = keys, values
    cache = roomy_cache([(room_keys, room_values)], 4)
    plain = DynamicLayer()
    plain.update(keys, values)
    for step in range(4):  # two steps fit the room, two grow it
        new_keys, new_values = torch.randn(2, 3, 1, 5), torch.randn(2, 3, 1, 5)
        got, want = cache.layers[0].update(new_keys, new_values), plain.update(new_keys, new_values)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert (got[0].data_ptr() == room_keys.data_ptr()) == (step < 2)
    assert cache.get_seq_length() == 8
    cache.batch_select_indices(torch.tensor([1]))
    assert torch.equal(cache.layers[0].keys, plain.keys[1:]) and torch.equal(cache.layers[0].values, plain.values[1:])


def test_prefill_groups_bound_their_width_padding_and_cache():
    """Every row in one group; a group's positions, its padding past SMALL_FORWARD, and its KV cache
    (each row's copy of a long shared prefix counted) stay within their bounds."""
    shared = 500
    items = [([0] * (shared + 1 + n % 7), [1] * (1 + n % 40)) for n in range(200)]
    groups = scoring._chunks(items, shared, 4096)
    assert sorted(i for group in groups for i in group) == list(range(200))
    for group in groups:
        sizes = [len(items[i][0]) - shared + len(items[i][1]) for i in group]
        area = len(group) * max(sizes)
        assert len(group) == 1 or area <= 4096
        assert len(group) == 1 or len(group) * (shared + max(sizes)) <= scoring.PREFILL_CACHE
        assert area <= max(scoring.SMALL_FORWARD, scoring.PADDING * sum(sizes))
    assert len(groups) < len(items)  # rows do share forwards


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("length", [1, 5])
@pytest.mark.parametrize("padded", [True, False])
def test_shared_prefix_attention_equals_attention_over_the_joined_cache(dtype, length, padded):
    """ftpipe.kvcache's prefix attention (the prefix once for all rows, each row's own keys apart, joined
    by their log-sum-exps) gives what one attention over [prefix | row] gives, for a decoding step
    (length 1) and a prefill (length 5, causal), with left padding or none (no mask)."""
    import types

    import torch

    from ftpipe import kvcache

    torch.manual_seed(0)
    dtype = getattr(torch, dtype)
    batch, heads, kv, dim, own, shared = 3, 6, 2, 16, 7, 11
    query = torch.randn(batch, heads, length, dim, dtype=dtype)
    keys, values = torch.randn(batch, kv, own, dim, dtype=dtype), torch.randn(batch, kv, own, dim, dtype=dtype)
    prefix = (torch.randn(1, kv, shared, dim, dtype=dtype), torch.randn(1, kv, shared, dim, dtype=dtype))
    lengths = torch.tensor([own, own - 2, own - 4] if padded else [own] * batch)
    visible = torch.arange(own)[None, :] >= (own - lengths)[:, None]  # left padding
    causal = torch.ones(length, own, dtype=torch.bool).tril(own - length)
    mask = (visible[:, None, None, :] & causal[None, None]) if padded else None
    model = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="sdpa"))
    with kvcache.prefix_attention(model, [prefix]):
        assert model.config._attn_implementation == kvcache.PREFIX_ATTENTION
        got, _ = kvcache._prefix_and_rows_attention(types.SimpleNamespace(layer_idx=0), query, keys, values, mask,
                                                    scaling=dim**-0.5)
    assert model.config._attn_implementation == "sdpa"
    joined_keys = torch.cat([prefix[0].expand(batch, -1, -1, -1), keys], dim=2)
    joined_values = torch.cat([prefix[1].expand(batch, -1, -1, -1), values], dim=2)
    joined_mask = torch.cat([torch.ones(batch, 1, length, shared, dtype=torch.bool),
                             visible[:, None, None, :] & causal[None, None]], dim=-1)
    want = torch.nn.functional.scaled_dot_product_attention(
        query.float(), joined_keys.float(), joined_values.float(), attn_mask=joined_mask, scale=dim**-0.5,
        enable_gqa=True).transpose(1, 2)
    # Query positions that see keys of their own (a left-padded position sees none and is never read).
    real = (own - length + torch.arange(length))[None, :] >= (own - lengths)[:, None]
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 inputs and output: 8 bits of mantissa
    torch.testing.assert_close(got.float()[real], want[real], atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3"])
def test_each_prefix_attention_architecture_scores_as_generate(tiny_model_dir, monkeypatch, architecture):
    """The architectures that read a shared prefix apart: their replies and NLLs are generate's and a
    separate forward's, and the prefix attention did run (prefill and decoding steps)."""
    import torch
    import transformers

    from ftpipe import kvcache
    from ftpipe.evaluation import with_shots

    tokenizer = models.load_tokenizer(tiny_model_dir)
    config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                                 "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[architecture]
    torch.manual_seed(0)
    config = config_class(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    model = model_class(config).eval()
    assert kvcache.reads_prefix_apart(model)
    lengths: list[int] = []
    attention = kvcache._prefix_and_rows_attention
    monkeypatch.setattr(kvcache, "_prefix_and_rows_attention",
                        lambda module, query, *a, **k: (lengths.append(query.shape[2]), attention(module, query, *a, **k))[1])
    shots = [{"id": f"s{i}", "messages": c} for i, c in enumerate(conversations(2, offset=20))]
    convs = [with_shots(c, shots) for c in conversations(6)]
    scored = scoring.score(model, tokenizer, convs, max_new_tokens=8, batch_size=len(convs), prefill_positions=40)
    assert 1 in lengths and max(lengths) > 1
    expected = metrics.generate(model, tokenizer, [prompt_text(tokenizer, c) for c in convs], max_new_tokens=8,
                                batch_size=3)
    assert scored.outputs == expected
    nll = metrics.response_nll(model, tokenizer, convs, batch_size=3)
    assert [n for n, _ in scored.nll] == pytest.approx([n for n, _ in nll], rel=1e-4, abs=1e-4)  # fp32 sums in another order


def test_a_sliding_window_model_scores_by_generate_then_a_forward(tiny_model_dir):
    """A cache the loop cannot cut and join (mistral with a sliding window of 4) takes the two-pass
    way: the same replies as generate, and no shared-prefix attention for an architecture it is not
    made for."""
    import torch
    import transformers

    from ftpipe import kvcache

    tokenizer = models.load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=8, sliding_window=4, max_position_embeddings=256,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id)
    model = transformers.MistralForCausalLM(config).eval()
    assert not kvcache.reads_prefix_apart(model)
    convs = conversations(5)
    scored = scoring.score(model, tokenizer, convs, max_new_tokens=6, batch_size=len(convs))
    expected = metrics.generate(model, tokenizer, [prompt_text(tokenizer, c) for c in convs], max_new_tokens=6,
                                batch_size=len(convs))
    assert scored.outputs == expected
