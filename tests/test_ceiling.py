"""The benchmark's FLOP count per training batch (bench/ceiling.py) and its machine line."""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from bench.ceiling import Shapes, describe, machine, step_flops

CONFIG = LlamaConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1)
SHAPES = Shapes.of(CONFIG)


def test_linear_parameters_follow_the_model_shapes():
    # q, o: 8x8; k, v: 8x4 (one kv head of 4); gate, up, down: 8x16; two layers.
    assert SHAPES.kv_dim == 4 and SHAPES.linear_params == 2 * (2 * 64 + 2 * 32 + 3 * 128)


def test_padded_batch_counts_real_positions_pairs_and_loss_positions():
    inputs = {"input_ids": torch.zeros(2, 3, dtype=torch.long),
              "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
              "labels": torch.tensor([[-100, 5, 6], [-100, 7, -100]])}
    positions, pairs, losses = 5, 6 + 3, 3  # labels after the shift: 5, 6 and 7
    expected = 4 * SHAPES.linear_params * positions + 12 * 8 * 2 * pairs + 4 * 100 * 8 * losses
    assert step_flops(SHAPES, inputs, full=False) == expected
    full = 6 * SHAPES.linear_params * positions + 12 * 8 * 2 * pairs + 6 * 100 * 8 * losses
    assert step_flops(SHAPES, inputs, full=True) == full


def test_packing_counts_the_shared_prefix_once():
    # Two rows of 4 tokens sharing a 2-token prefix: padded they compute 8 positions, packed 6.
    padded = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long),
              "labels": torch.tensor([[-100, -100, -100, 1], [-100, -100, -100, 2]])}
    packed = {"input_ids": torch.zeros(1, 7, dtype=torch.long), "segments": torch.tensor([[0, 0, 1, 1, 2, 2, -1]]),
              "labels": torch.tensor([[-100, -100, -100, 1, -100, 2, -100]])}
    # Visible pairs: prefix 3, each row 2 x 2 + 3 = 7 -> 17 packed; padded rows 10 each -> 20.
    saved = 4 * SHAPES.linear_params * 2 + 12 * 8 * 2 * 3
    assert step_flops(SHAPES, padded, full=False) - step_flops(SHAPES, packed, full=False) == saved


def test_machine_line_names_the_cpu_and_both_ceilings():
    info = machine(SHAPES)
    assert info["gflops"]["fp32"] > 0 and info["gflops"]["bf16"] > 0
    line = describe(info)
    assert info["cpu"] in line and "fp32" in line and "bf16" in line
