"""ftpipe.kernels: packed_rows attention, the fused LoRA layer and the fused loss compute what
transformers' eager attention, peft's LoRA layers and the stock cross-entropy compute (fp32 to
rounding, bf16 within bf16's precision), fall back where they do not apply, and train params choose them."""

from __future__ import annotations

import pytest
from conftest import tiny_params

from ftpipe import kernels, packing
from ftpipe.params import TrainParams

HEADS, KV_HEADS, DIM = 4, 2, 8


class Attention:
    """What an attention function reads from the module calling it."""

    num_key_value_groups = HEADS // KV_HEADS
    training = True


def segments_of(*rows: list[int]):
    import torch

    width = max(len(r) for r in rows)
    return torch.tensor([r + [packing.PADDING] * (width - len(r)) for r in rows])


# Two sequences: a 3-token prefix and rows of 2, 4 and 1 tokens, then padding; a 2-token prefix and
# one row of 5 tokens.
SEGMENTS = ([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, -1, -1], [0, 0, 1, 1, 1, 1, 1])


def test_row_blocks_let_each_token_see_what_the_packed_mask_allows():
    import torch

    segments = segments_of(*SEGMENTS)
    batch, length = segments.shape
    blocks = packing.row_blocks(segments)
    assert blocks is not None
    allowed = packing.attention_mask(segments, kernel="sdpa")[:, 0]
    seen: dict[int, set[int]] = {}
    queries, keys = blocks["query"].view(blocks["hidden"].shape[:2]), blocks["key"].view(-1, blocks["hidden"].shape[2])
    real = torch.zeros(queries.numel(), dtype=torch.bool)
    real[blocks["slots"]] = True
    for block in range(queries.shape[0]):
        for slot in range(queries.shape[1]):
            if real[block * queries.shape[1] + slot]:
                visible = keys[block][~blocks["hidden"][block, slot]].tolist()
                seen[int(queries[block, slot])] = set(visible)
    expected = {}
    for b in range(batch):
        for q in range(length):
            if segments[b, q] != packing.PADDING:
                expected[b * length + q] = {b * length + k for k in range(length) if allowed[b, q, k]}
    assert seen == expected  # every real token once, with exactly its keys
    assert sorted(blocks["positions"].tolist()) == sorted(expected)


def test_row_blocks_none_where_the_dense_square_is_smaller():
    # One long row beside many one-token rows: blocks padded to the long row outgrow the square.
    assert packing.row_blocks(segments_of([0] + [1] * 40 + list(range(2, 30)))) is None
    assert packing.row_blocks(segments_of([-1, -1])) is None  # padding only: nothing to attend


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_packed_rows_attention_equals_eager(dtype_name):
    import torch
    from transformers.models.llama.modeling_llama import eager_attention_forward

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    segments = segments_of(*SEGMENTS)
    batch, length = segments.shape
    real = segments != packing.PADDING
    shapes = {"query": (batch, HEADS, length, DIM), "key": (batch, KV_HEADS, length, DIM),
              "value": (batch, KV_HEADS, length, DIM)}
    states = {name: torch.randn(shape) for name, shape in shapes.items()}
    weight = torch.randn(batch, length, HEADS, DIM)
    mask = packing.attention_mask(segments, kernel="eager")

    def run(function, **extra):
        leaves = {name: t.to(dtype).requires_grad_() for name, t in states.items()}
        out, _ = function(Attention, leaves["query"], leaves["key"], leaves["value"], mask, scaling=DIM ** -0.5,
                          **extra)
        (out.float()[real] * weight[real]).sum().backward()  # padding's outputs carry no loss
        return out.float()[real], {name: t.grad.float() for name, t in leaves.items()}

    out, grads = run(kernels.packed_rows_attention, row_blocks=packing.row_blocks(segments))
    expected, expected_grads = run(eager_attention_forward)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out, expected, **tolerance)
    for name in states:
        torch.testing.assert_close(grads[name], expected_grads[name], **tolerance, msg=name)


def test_dense_path_equals_eager_and_stays_finite_under_left_padding():
    """No row_blocks (padded evaluation rows): eager's math; a query that sees nothing (left padding)
    gives a finite output, as eager's finite minimum does, not NaN."""
    import torch
    from transformers.models.llama.modeling_llama import eager_attention_forward

    torch.manual_seed(1)
    length = 6
    query = torch.randn(2, HEADS, length, DIM)
    key, value = torch.randn(2, KV_HEADS, length, DIM), torch.randn(2, KV_HEADS, length, DIM)
    visible = torch.ones(length, length, dtype=torch.bool).tril().repeat(2, 1, 1, 1)
    visible[1, :, :, :2] = False  # the second row is left-padded by two tokens
    mask = torch.zeros(visible.shape).masked_fill_(~visible, torch.finfo(torch.float32).min)
    for dtype in (torch.float32, torch.bfloat16):
        args = (query.to(dtype), key.to(dtype), value.to(dtype), mask)
        out, _ = kernels.packed_rows_attention(Attention, *args, scaling=0.3)
        expected, _ = eager_attention_forward(Attention, *args, scaling=0.3)
        assert torch.isfinite(out).all()
        tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        torch.testing.assert_close(out.float(), expected.float(), **tolerance)


def lora_model(tiny_model_dir, **lora):
    import torch
    from peft import LoraConfig, get_peft_model

    from ftpipe import models

    model = models.load_model(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **lora)
    model = get_peft_model(model, config)
    with torch.no_grad():  # B starts at zero; a random B makes the adapter's path count
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return model


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_lora_equals_peft_in_fp32_and_bf16(tiny_model_dir):
    import torch

    torch.manual_seed(2)
    model = lora_model(tiny_model_dir)
    ids = torch.randint(3, 300, (2, 12))
    expected_loss, expected = loss_and_grads(model, ids)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    hidden = torch.randn(2, 5, model.config.hidden_size, requires_grad=True)
    assert type(layer(hidden).grad_fn).__name__ != "LoraLinearBackward"
    assert kernels.use_fused_lora(model) == 3 * model.config.num_hidden_layers
    assert type(layer(hidden).grad_fn).__name__ == "LoraLinearBackward"  # the fused path is the one taken
    loss, grads = loss_and_grads(model, ids)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    assert grads.keys() == expected.keys() and all("lora_" in name for name in grads)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, ids)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=2e-2)
    for name, grad in expected.items():
        assert grads[name].dtype == torch.float32  # the adapter and its optimizer stay fp32
        torch.testing.assert_close(grads[name], grad, rtol=0.1, atol=0.1 * grad.abs().max().item(), msg=name)


def test_fused_lora_leaves_other_layers_to_peft(tiny_model_dir):
    """Dropout, a bias on B, a merged adapter and disabled adapters run peft's own forward, with its results."""
    import torch

    torch.manual_seed(3)
    ids = torch.randint(3, 300, (1, 10))
    biased = lora_model(tiny_model_dir, lora_bias=True).eval()
    with torch.no_grad():
        for module in biased.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_()
        expected = biased(input_ids=ids).logits
        kernels.use_fused_lora(biased)
        torch.testing.assert_close(biased(input_ids=ids).logits, expected)
    trainable_bias = lora_model(tiny_model_dir)
    kernels.use_fused_lora(trainable_bias)
    layer = trainable_bias.get_base_model().model.layers[0].self_attn.q_proj
    hidden = torch.randn(1, 4, trainable_bias.config.hidden_size)
    assert type(layer(hidden).grad_fn).__name__ == "LoraLinearBackward"
    layer.base_layer.bias = torch.nn.Parameter(torch.zeros(layer.base_layer.out_features))  # trains: peft's path
    assert type(layer(hidden).grad_fn).__name__ != "LoraLinearBackward"
    dropout = lora_model(tiny_model_dir, lora_dropout=0.5)
    kernels.use_fused_lora(dropout)
    torch.manual_seed(4)
    fused = dropout(input_ids=ids).logits
    with torch.no_grad():  # peft's forward draws the same dropout masks from the same seed
        for module in dropout.modules():
            module.__dict__.pop("forward", None)
    torch.manual_seed(4)
    torch.testing.assert_close(fused, dropout(input_ids=ids).logits)

    model = lora_model(tiny_model_dir).eval()
    kernels.use_fused_lora(model)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
    assert not torch.allclose(adapted, plain, atol=1e-3)  # the adapter changes the output...
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)  # ...and merging keeps it


def test_train_params_choose_and_check_the_kernels(tiny_model_dir, tiny_data):
    from ftpipe import methods

    cfg = tiny_params(tiny_model_dir, tiny_data)["train"]
    assert methods.fuses_lora(TrainParams(**cfg), cuda=False)
    assert not methods.fuses_lora(TrainParams(**cfg), cuda=True)
    assert not methods.fuses_lora(TrainParams(**{**cfg, "fused_lora": False}), cuda=False)
    assert methods.fuses_lora(TrainParams(**{**cfg, "fused_lora": True}), cuda=True)
    assert not methods.fuses_lora(TrainParams(**{**cfg, "method": "ia3"}), cuda=False)
    assert methods.fuses_loss(TrainParams(**cfg), cuda=False)
    assert not methods.fuses_loss(TrainParams(**cfg), cuda=True)
    assert not methods.fuses_loss(TrainParams(**{**cfg, "fused_loss": False}), cuda=False)
    assert methods.fuses_loss(TrainParams(**{**cfg, "fused_loss": True}), cuda=True)
    assert methods.fuses_loss(TrainParams(**{**cfg, "method": "full"}), cuda=False)
    assert not methods.fuses_loss(TrainParams(**{**cfg, "method": "prompt_tuning", "merge": False}), cuda=False)
    # Rejected combinations: tests/test_train.py::test_invalid_combination_fails_at_params_time_naming_the_key


def test_packed_rows_only_for_the_architectures_it_is_made_for(tiny_model_dir):
    from ftpipe import methods

    params = TrainParams(method="full", attention="packed_rows")
    assert methods.build(params, tiny_model_dir, bf16=False, attention="packed_rows").config._attn_implementation \
        == "packed_rows"
    from transformers import GPT2Config, GPT2LMHeadModel

    other = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert not kernels.use_packed_attention(other)
    assert other.config._attn_implementation != "packed_rows"


@pytest.mark.parametrize("weight_trains", [False, True], ids=["frozen-head", "trained-head"])
def test_linear_cross_entropy_equals_the_stock_loss(weight_trains, monkeypatch):
    """Chunked (3 rows a chunk over 10) against logits then cross_entropy: the summed loss and the
    gradients of hidden and weight, fp32 to rounding, bf16 under autocast within bf16's precision."""
    import torch

    torch.manual_seed(5)
    hidden = torch.randn(10, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=weight_trains)
    targets = torch.randint(0, 50, (10,))

    def stock():
        logits = torch.nn.functional.linear(hidden, weight)
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")

    def grads(loss):
        wanted = [hidden, weight] if weight_trains else [hidden]
        return torch.autograd.grad(loss * 0.25, wanted)  # scaled afterwards, as by a mean over tokens

    expected = stock()
    expected_grads = grads(expected)
    matmuls = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: matmuls.append(1) or mm(*a, **k))
    ours = kernels.linear_cross_entropy(hidden, weight, targets, chunk=3)
    assert len(matmuls) == 4 * (3 if weight_trains else 2)  # 4 chunks: logits, hidden's gradient, weight's
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)
    for got, want in zip(grads(ours), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    matmuls.clear()
    with torch.no_grad():  # evaluation: the loss alone, no gradient computed
        assert kernels.linear_cross_entropy(hidden, weight, targets, chunk=3).item() == pytest.approx(expected.item(),
                                                                                                      rel=1e-6)
    assert len(matmuls) == 4
    monkeypatch.undo()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference, ours = stock(), kernels.linear_cross_entropy(hidden, weight, targets, chunk=3)
        reference_grads = grads(reference)
        ours_grads = grads(ours)
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(reference.item(), rel=1e-3)  # the same bf16 logits, fp32 softmax
    for got, want in zip(ours_grads, reference_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fused_loss_in_training_equals_the_stock_path(tiny_model_dir, monkeypatch, method):
    """response_only_loss with the head marked: the same loss and gradients (the adapter's; for full
    fine-tuning every weight's, the output head's included) over a padded batch, the fused function
    being the one called, and the head its own self afterwards."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    from ftpipe import models, trainer
    from ftpipe.chat import IGNORE_INDEX, encode

    torch.manual_seed(6)
    tokenizer = models.load_tokenizer(tiny_model_dir)
    model = lora_model(tiny_model_dir) if method == "lora" else models.load_model(tiny_model_dir)
    head = model.get_output_embeddings()
    assert head.weight.requires_grad == (method == "full")
    rows = [encode(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            for q, a in (("say red", "red cat"), ("say one two three four", "four three two one"))]
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(
        [{**row, "attention_mask": [1] * len(row["input_ids"])} for row in rows])

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = trainer.response_only_loss(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected_loss, expected = loss_and_grads()
    calls = []
    fused = kernels.linear_cross_entropy
    monkeypatch.setattr(kernels, "linear_cross_entropy", lambda *a, **k: calls.append(1) or fused(*a, **k))
    assert kernels.fused_loss_head(model) is None
    assert kernels.use_fused_loss(model)
    loss, grads = loss_and_grads()
    assert calls == [1]
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    assert grads.keys() == expected.keys()
    assert any("lm_head" in name or "embed_tokens" in name for name in grads) == (method == "full")
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # the head projects again outside the loss
        assert model(input_ids=batch["input_ids"]).logits.shape[-1] == model.config.vocab_size


def test_fused_loss_only_for_plain_heads_of_known_architectures(tiny_model_dir):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ftpipe import models

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    assert not kernels.use_fused_loss(gpt2) and kernels.fused_loss_head(gpt2) is None
    biased = models.load_model(tiny_model_dir)
    head = biased.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features))  # a bias the fused matmul would leave out
    assert not kernels.use_fused_loss(biased) and kernels.fused_loss_head(biased) is None

    model = models.load_model(tiny_model_dir)
    head = model.get_output_embeddings()
    hooked = head.forward  # an instance forward already there (as accelerate's hooks set) survives
    head.forward = lambda hidden: hooked(hidden)
    own = head.forward
    with pytest.raises(RuntimeError, match="inside"):
        with kernels.head_skipped(head):
            assert head(torch.ones(2, 3)).shape == (2, 3)
            raise RuntimeError("inside")
    assert head.forward is own


def test_the_train_stage_installs_the_kernels_its_params_choose(tiny_model_dir, tiny_data):
    from ftpipe import models
    from stages import train

    cfg = tiny_params(tiny_model_dir, tiny_data)["train"]
    tokenizer = models.load_tokenizer(tiny_model_dir)
    for fused in (True, False):
        params = TrainParams(**{**cfg, "fused_loss": fused, "fused_lora": fused})
        model = train._setup_model(params, tiny_model_dir, tokenizer).model
        layer = model.get_base_model().model.layers[0].self_attn.q_proj
        assert (kernels.fused_loss_head(model) is not None) == fused
        assert ("forward" in layer.__dict__) == fused  # LoraLinear's instance forward
