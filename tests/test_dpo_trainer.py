"""The project's DPO loop (ftpipe.dpo_trainer) against TRL's DPOTrainer on the same token ids: the
same losses, rewards and LoRA gradients for every loss type, with the prompt computed once."""

from __future__ import annotations

import pytest
from conftest import qa_rows

from ftpipe.params import DpoParams

LOSS_TYPES = ["sigmoid", "hinge", "ipo", "robust", "apo_zero", "sppo_hard"]


def pairs(n: int = 6) -> list[dict]:
    rows = qa_rows(n, offset=300)
    # Replies of different lengths, and a pair whose replies start alike (the shared prefix stops at the prompt).
    return [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": r["response"],
             "rejected": f"{r['response']} and more words" if i % 2 else r["response"].split()[0] + " no"}
            for i, r in enumerate(rows)]


def policy(tiny_model_dir, params: DpoParams):
    """The project's policy model (fp32) with non-zero LoRA weights."""
    import torch

    from ftpipe import dpo_trainer
    from ftpipe import models as loading

    ours = dpo_trainer.policy_model(params, loading.load_model(tiny_model_dir), bf16=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, weight in ours.named_parameters():
            if "lora_B" in name:  # zero at the start: the policy would be the reference
                weight.normal_(0, 0.2)
    return ours


def trl_batch(tokenizer, rows: list[dict]):
    """TRL's collated batch of the very token ids the project encodes (prompt, then each reply)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from ftpipe.chat import IGNORE_INDEX, encode

    examples = []
    for pair in rows:
        ids = {}
        for key in ("chosen", "rejected"):
            item = encode(tokenizer, [*pair["prompt"], {"role": "assistant", "content": pair[key]}])
            first = next(i for i, label in enumerate(item["labels"]) if label != IGNORE_INDEX)
            ids["prompt_ids"], ids[f"{key}_ids"] = item["input_ids"][:first], item["input_ids"][first:]
        examples.append(ids)
    return DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(examples)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_rewards_and_gradients_equal_trls(tmp_path, tiny_model_dir, loss_type):
    import torch
    from trl import DPOConfig, DPOTrainer

    from ftpipe import dpo_trainer
    from ftpipe import models as loading
    from ftpipe.dpo import lora_config, to_dataset

    params = DpoParams(enabled=True, loss_type=loss_type, beta=0.5, precision="fp32",
                       label_smoothing=0.1 if loss_type == "robust" else 0.0)
    ours = policy(tiny_model_dir, params)
    tokenizer = loading.load_tokenizer(tiny_model_dir)
    rows = pairs()
    encoded = dpo_trainer.encode_pairs(tokenizer, rows)
    batch = dpo_trainer.PairCollator(tokenizer)(encoded)
    # One packed row per pair: the prompt once (its last token once per reply), then both replies.
    reference = trl_batch(tokenizer, rows)
    half = len(rows)
    prompts = (reference["attention_mask"][:half] - reference["completion_mask"][:half]).sum(dim=1)
    assert [len(e["input_ids"]) for e in encoded] == \
        (reference["attention_mask"][:half].sum(dim=1) + reference["completion_mask"][half:].sum(dim=1) + 1).tolist()
    assert (batch["segments"] == 0).sum(dim=1).tolist() == (prompts - 1).tolist()

    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "ours"), use_cpu=True, report_to="none",
                             remove_unused_columns=False, per_device_train_batch_size=len(rows))
    mine = dpo_trainer.trainer_class(params)(model=ours, args=args, train_dataset=encoded,
                                             data_collator=dpo_trainer.PairCollator(tokenizer))
    # TRL wraps the stock model in the same adapter (its reference: the adapter off), given the same weights.
    trl = DPOTrainer(model=loading.load_model(tiny_model_dir), args=DPOConfig(
        output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to="none", beta=params.beta,
        loss_type=[loss_type], label_smoothing=params.label_smoothing, activation_checkpointing=False),
        train_dataset=to_dataset(rows), processing_class=tokenizer, peft_config=lora_config(params))
    theirs = trl.model
    theirs.load_state_dict(ours.state_dict())
    ours.train()
    theirs.train()
    loss = mine.compute_loss(ours, batch)
    expected = trl.compute_loss(theirs, reference)
    loss.backward()
    expected.backward()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6), (loss.item(), expected.item())
    assert loss.item() > 0.01  # a loss worth comparing: the random LoRA weights move the policy off the reference
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert mine.metrics["train"][key][-1] == pytest.approx(trl._metrics["train"][key][-1], rel=1e-4, abs=1e-5)
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    compared = 0
    for name, param in ours.named_parameters():
        if param.requires_grad:
            # fp32, summed in another order (the prompt once, per-row attention blocks, the fused LoRA
            # backward): within 1e-5 of the layer's largest gradient.
            scale = grads[name].abs().max().item()
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
            compared += param.grad.abs().sum() > 0
    assert compared == len(grads)


def test_reference_is_computed_once_per_pair_and_the_tokens_count_each_prompt_once(tmp_path, tiny_model_dir):
    import torch
    from transformers import TrainingArguments

    from ftpipe import dpo_trainer
    from ftpipe import models as loading

    params = DpoParams(enabled=True, precision="fp32")
    ours = policy(tiny_model_dir, params)
    tokenizer = loading.load_tokenizer(tiny_model_dir)
    rows = pairs(4)
    encoded = dpo_trainer.encode_pairs(tokenizer, rows, first_uid=10)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False)
    trainer = dpo_trainer.trainer_class(params)(model=ours, args=args, train_dataset=encoded,
                                                data_collator=dpo_trainer.PairCollator(tokenizer))
    forwards = []
    ours.get_input_embeddings().register_forward_hook(lambda *_: forwards.append(1))
    collate = dpo_trainer.PairCollator(tokenizer)
    ours.train()
    first = trainer.compute_loss(ours, collate(encoded[:2]))
    assert len(forwards) == 2 and sorted(trainer.reference) == [10, 11]  # the policy and the reference
    again = trainer.compute_loss(ours, collate(encoded[:2]))
    assert len(forwards) == 3 and torch.equal(first, again)  # the policy only: the reference was kept
    trainer.compute_loss(ours, collate(encoded[1:]))
    assert len(forwards) == 5 and sorted(trainer.reference) == [10, 11, 12, 13]  # only the new pairs' reference
    # The kept reference is the start weights' (the adapter off), whatever the adapter has become.
    with torch.no_grad(), ours.disable_adapter():
        start, _ = dpo_trainer.reply_logps(ours, collate(encoded))
    assert torch.allclose(torch.stack([trainer.reference[u] for u in (10, 11, 12, 13)]), start, atol=1e-5)
    prompt_once = sum(len(e["input_ids"]) for e in encoded[:2]) * 2 + sum(len(e["input_ids"]) for e in encoded[1:])
    assert trainer.num_tokens == prompt_once


def test_orpo_is_trls_odds_ratio_loss_with_no_reference_pass(tmp_path, tiny_model_dir):
    """loss_type orpo: TRL's ORPOTrainer loss (trl.experimental) on the same per-token averages, the
    NLL the mean over the batch's chosen tokens; no reference forward is run or kept."""
    from types import SimpleNamespace

    import torch
    from transformers import TrainingArguments
    from trl.experimental.orpo import ORPOTrainer

    from ftpipe import dpo_trainer
    from ftpipe import models as loading

    params = DpoParams(enabled=True, loss_type="orpo", beta=0.3, precision="fp32", init_from="base")
    ours = policy(tiny_model_dir, params)
    tokenizer = loading.load_tokenizer(tiny_model_dir)
    encoded = dpo_trainer.encode_pairs(tokenizer, pairs())
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False)
    trainer = dpo_trainer.trainer_class(params)(model=ours, args=args, train_dataset=encoded,
                                                data_collator=dpo_trainer.PairCollator(tokenizer))
    batch = dpo_trainer.PairCollator(tokenizer)(encoded)
    forwards = []
    ours.get_input_embeddings().register_forward_hook(lambda *_: forwards.append(1))
    ours.train()
    loss = trainer.compute_loss(ours, batch)
    assert len(forwards) == 1 and trainer.reference == {}
    loss.backward()
    trainable = [p for p in ours.parameters() if p.requires_grad]
    grads = [p.grad.clone() for p in trainable]
    ours.zero_grad()

    logps, counts = dpo_trainer.reply_logps(ours, batch)
    average = logps / counts
    fake = SimpleNamespace(beta=params.beta, accelerator=SimpleNamespace(device="cpu"))
    odds, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(fake, average[:, 0], average[:, 1])
    expected = -logps[:, 0].sum() / counts[:, 0].sum() - odds.mean()  # ORPOTrainer: NLL over the chosen tokens
    assert torch.allclose(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6), (loss.item(), expected.item())
    expected.backward()
    for param, grad in zip(trainable, grads):
        torch.testing.assert_close(grad, param.grad, rtol=1e-4, atol=1e-5 * param.grad.abs().max().item())
    assert any(grad.abs().sum() > 0 for grad in grads)
    assert trainer.metrics["train"]["rewards/chosen"][-1] == pytest.approx(chosen_rewards.mean().item(), rel=1e-5)
    assert trainer.metrics["train"]["rewards/rejected"][-1] == pytest.approx(rejected_rewards.mean().item(), rel=1e-5)
