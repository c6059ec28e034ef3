"""CPU training kernels: the stock modules' results (fp32 within rounding, tests/test_kernels.py) in fewer,
smaller operations.
- `packed_rows` attention (transformers' AttentionInterface): in a packed batch (ftpipe.packing.row_blocks) a
  row's queries are scored against the shared prefix and the row's own keys only; other batches run dense.
- use_fused_lora: a LoRA linear layer as one autograd function with a written-out backward.
- use_fused_loss (linear_cross_entropy): the vocabulary projection and cross-entropy in chunks of positions.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Any

PACKED_ATTENTION = "packed_rows"
# Architectures whose attention modules call the attention interface with nothing but the mask
# to apply (no sliding window, no soft-capping): packed_rows is used for these only.
PACKED_ATTENTION_MODELS = ("llama",)


def register_attention() -> None:
    """Make `packed_rows` a name models can be switched to (masks are built as for eager)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_rows_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, eager_mask)


def use_packed_attention(model) -> bool:
    """Switch a model (or the base model inside a peft wrapper) to packed_rows; False where its
    architecture is not one it is checked for."""
    config = model.config
    if config.model_type not in PACKED_ATTENTION_MODELS:
        return False
    register_attention()
    config._attn_implementation = PACKED_ATTENTION
    return True


def packed_rows_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
                          row_blocks: dict[str, Any] | None = None, **kwargs):
    """query (batch, heads, length, dim), key and value (batch, kv heads, length, dim); returns the
    output as (batch, length, heads, dim), as transformers' attention functions do."""
    if row_blocks is None or dropout:
        return _dense(query, key, value, attention_mask, scaling, dropout, module.training), None
    import torch

    batch, heads, length, dim = query.shape
    kv = key.shape[1]
    hidden = row_blocks["hidden"]
    blocks, width_own, width = hidden.shape

    def flat(states):  # (batch * length, heads, dim): a block gathers its slots' positions from it
        return states.transpose(1, 2).reshape(batch * length, states.shape[1], dim)

    queries = flat(query * scaling).index_select(0, row_blocks["query"])
    queries = queries.view(blocks, width_own, kv, heads // kv, dim).permute(0, 2, 3, 1, 4)
    queries = queries.reshape(blocks, kv, heads // kv * width_own, dim)
    keys = flat(key).index_select(0, row_blocks["key"]).view(blocks, width, kv, dim).transpose(1, 2)
    values = flat(value).index_select(0, row_blocks["key"]).view(blocks, width, kv, dim).transpose(1, 2)
    scores = torch.matmul(queries, keys.transpose(2, 3)).view(blocks, kv, heads // kv, width_own, width)
    scores = scores.masked_fill_(hidden[:, None, None], torch.finfo(scores.dtype).min)
    # Softmax in the scores' dtype (bf16 under autocast; the kernel accumulates in fp32): its output
    # is rounded to bf16 as eager's is, and the copy the backward keeps is half the size.
    weights = torch.softmax(scores.view(blocks, kv, -1, width), dim=-1)
    out = torch.matmul(weights, values).view(blocks, kv, heads // kv, width_own, dim)
    out = out.permute(0, 3, 1, 2, 4).reshape(blocks * width_own, heads, dim).index_select(0, row_blocks["slots"])
    full = out.new_zeros(batch * length, heads, dim).index_copy(0, row_blocks["positions"], out)
    return full.view(batch, length, heads, dim), None


def _dense(query, key, value, attention_mask, scaling: float, dropout: float, training: bool):
    """Eager attention's math; the query heads that share a key head are scored as one matrix
    instead of copying the key and value heads once per query head."""
    import torch

    batch, heads, length, dim = query.shape
    kv, keys = key.shape[1], key.shape[2]
    group = heads // kv
    scores = torch.matmul((query * scaling).reshape(batch, kv, group * length, dim), key.transpose(2, 3))
    if attention_mask is not None:
        # The mask in the scores' dtype, its hidden value kept finite: a row that hides everything
        # (left padding) averages instead of turning into NaN, as eager's float32 minimum does.
        mask = attention_mask[:, :, :, :keys].clamp(min=torch.finfo(scores.dtype).min).to(scores.dtype)
        scores = scores.view(batch, kv, group, length, keys).add_(mask[:, :, None]).view(batch, kv, -1, keys)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=training)
    out = torch.matmul(weights, value).view(batch, heads, length, dim)
    return out.transpose(1, 2).contiguous()


def use_fused_lora(model) -> int:
    """Run every plain LoRA linear layer of a peft model through LoraLinear (instance forward; the
    module, its weights and what peft saves are unchanged). Returns how many layers were switched."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if type(module) is Linear:
            module.forward = types.MethodType(_lora_forward, module)
            count += 1
    return count


def _lora_forward(self, x, *args, **kwargs):
    """LoraLinear where the layer is a plain LoRA on a frozen nn.Linear with one active adapter, no
    dropout and no bias on B; peft's own forward otherwise (merged, disabled, DoRA, dropout, lora_bias,
    several adapters, a trainable base bias)."""
    import torch

    name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    base = self.base_layer
    if (args or kwargs or self.disable_adapters or self.merged or name not in self.lora_A
            or name in self.lora_variant or type(base) is not torch.nn.Linear or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)
            or self.lora_B[name].bias is not None or not isinstance(self.lora_dropout[name], torch.nn.Identity)):
        return type(self).forward(self, x, *args, **kwargs)
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    with torch.autocast(device, enabled=False):
        return lora_linear().apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                self.scaling[name], dtype)


@functools.cache
def lora_linear():
    """The autograd function (made on first use: importing this module does not import torch)."""
    import torch

    class LoraLinear(torch.autograd.Function):
        """y = x W^T + b + s (x A^T) B^T in `dtype`; gradients for x, A and B (W and b are frozen)."""

        @staticmethod
        def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dtype):
            shape = x.shape
            rows = x.reshape(-1, shape[-1]).to(dtype)
            weight, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
            down = torch.mm(rows, a.t())
            out = torch.mm(rows, weight.t()) if bias is None else torch.addmm(bias.to(dtype), rows, weight.t())
            out.addmm_(down, b.t(), alpha=scaling)
            ctx.save_for_backward(rows, down, weight, a, b)
            ctx.scaling, ctx.shape, ctx.dtypes = scaling, shape, (x.dtype, lora_a.dtype, lora_b.dtype)
            return out.view(*shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            rows, down, weight, a, b = ctx.saved_tensors
            x_dtype, a_dtype, b_dtype = ctx.dtypes
            grad = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
            grad_down = torch.mm(grad, b)
            grad_x = grad_a = grad_b = None
            if ctx.needs_input_grad[0]:
                grad_x = torch.mm(grad, weight).addmm_(grad_down, a, alpha=ctx.scaling).view(ctx.shape).to(x_dtype)
            if ctx.needs_input_grad[3]:
                grad_a = torch.mm(grad_down.t(), rows).to(a_dtype).mul_(ctx.scaling)
            if ctx.needs_input_grad[4]:
                grad_b = torch.mm(grad.t(), down).to(b_dtype).mul_(ctx.scaling)
            return grad_x, None, None, grad_a, grad_b, None, None

    return LoraLinear


# Positions per chunk of the fused loss: [128, 49152] fp32 logits are 25 MB. Measured on SmolLM2
# (2-core EPYC, bf16): 128 and 256 equally fast, 32 and 64 slower (thinner matmuls).
LOSS_CHUNK = 128
# Architectures whose forward returns the output head's result as the logits, unscaled and uncapped
# (no logit scaling or soft-capping after the head): the fused loss is used for these only.
FUSED_LOSS_MODELS = ("llama",)
_FUSED_LOSS = "_ftpipe_fused_loss"  # marks an output head (a module attribute: never saved with the model)


def use_fused_loss(model) -> bool:
    """Mark the model's output head for linear_cross_entropy in ftpipe.trainer.response_only_loss;
    False (nothing marked) where the head is not a bias-free nn.Linear whose output is the logits
    as they are (architectures that scale or cap logits after the head are not in the list)."""
    import torch

    head = model.get_output_embeddings()
    if model.config.model_type not in FUSED_LOSS_MODELS or type(head) is not torch.nn.Linear \
            or head.bias is not None:
        return False
    setattr(head, _FUSED_LOSS, True)
    return True


def fused_loss_head(model):
    """The model's output head where use_fused_loss marked it, else None."""
    head = model.get_output_embeddings()
    return head if getattr(head, _FUSED_LOSS, False) else None


@contextlib.contextmanager
def head_skipped(head):
    """Within: the head hands back its input, so the model's forward returns the hidden states of the
    positions it keeps (logits_to_keep) instead of their logits."""
    own = head.__dict__.get("forward")  # an instance forward already there (accelerate's hooks): bypassed within, restored after
    head.forward = _unchanged
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def _unchanged(hidden):
    return hidden


def linear_cross_entropy(hidden, weight, targets, *, chunk: int = LOSS_CHUNK):
    """sum over rows of cross_entropy(hidden @ weight^T, targets), the logits in the compute dtype
    (autocast's, else hidden's) and the softmax in fp32, as the stock path computes them; gradients
    for hidden and, where it trains, weight."""
    import torch

    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):
        return _linear_cross_entropy().apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                             dtype, chunk, torch.is_grad_enabled())


@functools.cache
def _linear_cross_entropy():
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """Chunk by chunk: logits, their log-sum-exp, the loss, and (softmax - one-hot) @ weight, the
        gradient of the summed loss for that chunk's rows, kept for backward (which only scales it)."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, dtype, chunk, grad_enabled):
            rows, w = hidden.to(dtype), weight.to(dtype)
            # needs_input_grad says which inputs require grad even under no_grad (evaluation): no
            # gradient is computed there.
            want_rows, want_weight = (grad_enabled and needed for needed in ctx.needs_input_grad[:2])
            grad_rows = torch.empty_like(rows) if want_rows else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=w.device) if want_weight else None
            total = torch.zeros((), dtype=torch.float32, device=w.device)
            for start in range(0, rows.shape[0], chunk):
                part, target = rows[start:start + chunk], targets[start:start + chunk, None]
                logits = torch.mm(part, w.t()).float()
                lse = torch.logsumexp(logits, dim=1, keepdim=True)
                total += lse.sum() - logits.gather(1, target).sum()
                if want_rows or want_weight:
                    probs = logits.sub_(lse).exp_()
                    probs.scatter_add_(1, target, probs.new_full(target.shape, -1.0))
                    probs = probs.to(dtype)
                    if want_rows:
                        torch.mm(probs, w, out=grad_rows[start:start + chunk])
                    if want_weight:
                        grad_weight += torch.mm(probs.t(), part).float()
            ctx.save_for_backward(grad_rows, grad_weight)
            ctx.dtypes = (hidden.dtype, weight.dtype)
            return total

        @staticmethod
        def backward(ctx, grad):
            grad_rows, grad_weight = ctx.saved_tensors
            if grad_rows is not None:  # scaled in fp32: 1 / tokens rounded to bf16 would scale the whole step's gradient
                grad_rows = grad_rows.float().mul_(grad).to(ctx.dtypes[0])
            if grad_weight is not None:
                grad_weight = grad_weight.mul(grad).to(ctx.dtypes[1])
            return grad_rows, grad_weight, None, None, None, None

    return LinearCrossEntropy
