"""The dpo stage's DPO loop (method dpo; kto stays TRL's KTOTrainer), built for the train stage's speed
rather than TRL's DPOTrainer's: a pair is one sequence, [prompt][chosen][rejected], the prompt computed
once and each reply seeing the prompt and itself only (ftpipe.packing's segments, packed_rows attention);
vocabulary logits only at reply tokens; the reference log-probabilities (the start weights, the adapter
off) computed once per pair and kept; pairs of like length batched together; in bf16 runs the frozen
weights stored in bf16, the LoRA layers through the fused kernel. Losses, rewards and gradients equal
TRL's for the same token ids (tests/test_dpo_trainer.py). A transformers Trainer, so checkpoints, resume,
schedules and callbacks work as train's; its logs use TRL's metric names (rewards/accuracies, ...).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ftpipe.params import DpoParams


def encode_pairs(tokenizer, pairs: list[dict[str, Any]], *, first_uid: int = 0) -> list[dict[str, Any]]:
    """Each pair as one packed sequence (input_ids, labels on the reply tokens, position_ids, segments:
    0 the prompt, 1 the chosen reply, 2 the rejected one), encoded as the SFT rows are (ftpipe.chat), and
    a `uid` that keys its kept reference log-probabilities (unique across the splits given first_uid)."""
    from ftpipe.chat import encode
    from ftpipe.packing import packed_group

    encoded = []
    for uid, pair in enumerate(pairs, start=first_uid):
        replies = [encode(tokenizer, [*pair["prompt"], {"role": "assistant", "content": pair[key]}])
                   for key in ("chosen", "rejected")]
        encoded.append({**packed_group(replies), "uid": uid})
    return encoded


class PairCollator:
    """Pads a batch of encoded pairs (ftpipe.packing.padded) and keeps their uids; real_tokens counts
    the packed sequences' lengths: each prompt once (its last token once per reply) and both replies."""

    def __init__(self, tokenizer) -> None:
        self.pad_id = tokenizer.pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from ftpipe.packing import padded

        batch = padded(features, self.pad_id)
        batch["uid"] = torch.tensor([f["uid"] for f in features])
        batch["real_tokens"] = torch.tensor(sum(len(f["input_ids"]) for f in features))  # the prompt once
        return batch


def reply_logps(model, batch: dict[str, Any]):
    """(pairs, 2) summed log-probabilities of the chosen and rejected replies, and their token counts."""
    import torch

    from ftpipe.chat import IGNORE_INDEX
    from ftpipe.trainer import attention_inputs, takes_position_mask

    inner = getattr(model, "module", model)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    positions = torch.zeros_like(batch["labels"], dtype=torch.bool)
    positions[:, :-1] = keep  # position t predicts token t + 1
    inputs = {"input_ids": batch["input_ids"], "use_cache": False, **attention_inputs(inner, batch)}
    # The head at the reply positions only where the model can; all positions otherwise. (The head's
    # matmul and the log-probabilities in chunks, as train's fused loss, measured no faster here.)
    if takes_position_mask(inner):
        logits = model(**inputs, logits_to_keep=positions).logits
    else:
        logits = model(**inputs).logits[positions]
    logps = -torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="none")
    pair = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
    reply = batch["segments"][:, 1:][keep] - 1  # 0: chosen, 1: rejected
    sums = logps.new_zeros(keep.shape[0], 2).index_put_((pair, reply), logps, accumulate=True)
    counts = logps.new_zeros(keep.shape[0], 2).index_put_((pair, reply), torch.ones_like(logps), accumulate=True)
    return sums, counts


def preference_loss(params: DpoParams, policy, reference, counts):
    """Per-pair losses of params.loss_type from (pairs, 2) policy and reference log-probabilities, as
    TRL 1.16's DPOTrainer computes them (its default f-divergence, reverse KL); and the (pairs, 2)
    rewards beta * (policy - reference). orpo: TRL's ORPOTrainer's loss and rewards (beta times the
    per-token average log-probabilities), reference ignored."""
    import torch
    import torch.nn.functional as F

    beta = params.beta
    ratios = policy - reference  # (pairs, 2): chosen, rejected
    chosen, rejected = ratios[:, 0], ratios[:, 1]
    delta = chosen - rejected
    kind = params.loss_type
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif kind == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif kind == "ipo":  # per-token averages, as TRL's IPO (confirmed with the IPO authors, it says)
        average = ratios / counts.clamp(min=1.0)
        losses = (average[:, 0] - average[:, 1] - 1 / (2 * beta)) ** 2
    elif kind == "robust":
        eps = params.label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif kind == "apo_zero":
        losses = (1 - torch.sigmoid(beta * chosen)) + torch.sigmoid(beta * rejected)
    elif kind == "sppo_hard":
        losses = (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    elif kind == "orpo":  # reference-free: TRL's ORPOTrainer (trl.experimental), on per-token averages
        average = policy / counts.clamp(min=1.0)
        log_odds = (average[:, 0] - average[:, 1]) - (_log1mexp(average[:, 0]) - _log1mexp(average[:, 1]))
        # Its NLL is the mean over all chosen tokens of the batch: each pair's share of it, so that
        # the mean over pairs below is that mean minus beta times the mean log-sigmoid of the odds ratio.
        nll = -policy[:, 0] * (len(policy) / counts[:, 0].sum().clamp(min=1.0))
        losses = nll - beta * F.logsigmoid(log_odds)
        return losses, beta * average.detach()
    else:  # DpoParams accepts no other
        raise ValueError(f"dpo.loss_type: {kind}")
    return losses, beta * ratios.detach()


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, as TRL's ORPO computes it (each form where it is exact); each branch's
    input is clamped to its side, so the branch not taken has no infinite gradient (0 x inf = NaN)."""
    import math

    import torch

    cut = -math.log(2)
    return torch.where(x > cut, torch.log(-torch.expm1(x.clamp(min=cut))), torch.log1p(-torch.exp(x.clamp(max=cut))))


def trainer_class(params: DpoParams):
    """The Trainer subclass for `params` (method dpo)."""

    import torch
    from transformers import Trainer

    from ftpipe.trainer import global_length_grouped_sampler, stop_if_diverged, stop_if_logged_diverged

    class PairTrainer(Trainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = False  # the loss is a mean over pairs: the Trainer scales for grad_accum
            self.reference: dict[int, torch.Tensor] = {}  # uid -> (chosen, rejected) of the start weights
            self.metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
            self.num_tokens = 0  # the packed pairs' positions (PairCollator's real_tokens)

        # Pairs of like length in a batch, as train's rows: padding to the longest pair of a random
        # batch was a quarter of the positions computed on the default pairs.
        def _get_train_sampler(self, train_dataset=None):
            rows = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return global_length_grouped_sampler(train_dataset or self.train_dataset, self.args, rows)

        def _get_eval_sampler(self, eval_dataset):
            return global_length_grouped_sampler(eval_dataset, self.args, self.args.eval_batch_size)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if model.training else "eval"
            policy, counts = reply_logps(model, inputs)
            # ORPO needs no reference model (nor its forward pass).
            reference = torch.zeros_like(policy) if params.loss_type == "orpo" else self._reference(model, inputs)
            losses, rewards = preference_loss(params, policy, reference, counts)
            loss = losses.mean()
            stop_if_diverged(self, loss, params.learning_rate, "dpo")
            margins = rewards[:, 0] - rewards[:, 1]
            for name, value in (("rewards/chosen", rewards[:, 0]), ("rewards/rejected", rewards[:, 1]),
                                ("rewards/accuracies", (margins > 0).float()), ("rewards/margins", margins),
                                ("logps/chosen", policy[:, 0].detach()), ("logps/rejected", policy[:, 1].detach())):
                self.metrics[mode][name].append(value.mean().item())
            if mode == "train":
                self.num_tokens += int(inputs["real_tokens"])
            return (loss, {"loss": loss}) if return_outputs else loss

        def _reference(self, model, inputs) -> torch.Tensor:
            """The start weights' reply log-probabilities, computed the first time a pair is seen."""
            uids = inputs["uid"].tolist()
            missing = [i for i, uid in enumerate(uids) if uid not in self.reference]
            if missing:
                rows = torch.tensor(missing, device=inputs["uid"].device)
                subset = {k: inputs[k].index_select(0, rows) for k in ("input_ids", "labels", "segments", "position_ids")}
                # The bare model, not a data-parallel wrapper: processes may need different numbers of
                # reference passes, and a wrapper's forward would wait for the others' (buffer broadcast).
                bare = self.accelerator.unwrap_model(model)
                with torch.no_grad(), bare.disable_adapter():
                    logps, _ = reply_logps(bare, subset)
                for row, logp in zip(missing, logps):
                    self.reference[uids[row]] = logp
            return torch.stack([self.reference[uid] for uid in uids])

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            # No labels the Trainer knows of: without this, evaluation would run the model without the loss.
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

        def log(self, logs, *args, **kwargs):
            mode = "train" if self.model.training else "eval"  # evaluate() logs under any prefix
            means = {key: sum(values) / len(values) for key, values in self.metrics[mode].items() if values}
            logs.update({f"eval_{key}": value for key, value in means.items()} if mode == "eval" else
                        {**means, "num_tokens": float(self.num_tokens)})
            self.metrics[mode].clear()
            stop_if_logged_diverged(self, logs, params.learning_rate, "dpo")
            return super().log(logs, *args, **kwargs)

    return PairTrainer


def policy_model(params: DpoParams, start, *, bf16: bool):
    """The start weights in a fresh LoRA adapter (dropout off everywhere, as TRL turns it off: the
    reference is these weights with the adapter off), frozen weights in bf16 where training is, and
    the fused LoRA and packed-rows kernels where the architecture is one they are checked for."""
    import torch
    from peft import get_peft_model

    from ftpipe import kernels
    from ftpipe.dpo import lora_config
    from ftpipe.trainer import frozen_weights_to_bf16

    for module in start.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model = get_peft_model(start, lora_config(params))
    if bf16:
        frozen_weights_to_bf16(model)
    kernels.use_fused_lora(model)
    kernels.use_packed_attention(model)
    return model
