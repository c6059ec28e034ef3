"""Trainer callbacks shared by the train and dpo stages."""

from __future__ import annotations

import time


def final_step_callback():
    """A callback that logs the training loss and evaluates at the last step when `logging_steps`
    or `eval_steps` would not: a short run (a smoke test, a search's trial) still reports its final
    training and validation loss, which its report, MLflow and the gate read."""
    from transformers import TrainerCallback

    class FinalStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True
                control.should_evaluate = args.eval_strategy != "no"
            return control

    return FinalStep()


# The Trainer's log keys and the MLflow names they go under. Training and validation losses are named
# as the register stage names the curves it logs from reports/ (train_loss, val_loss; dpo_train_loss,
# dpo_val_*), so a run register adopts reads the same as one it fills itself.
TRAIN_KEYS = {"loss": "train_loss", "eval_loss": "val_loss", "learning_rate": "learning_rate",
              "grad_norm": "grad_norm", "tokens_per_s": "tokens_per_s"}
DPO_KEYS = {"loss": "dpo_train_loss", "eval_loss": "dpo_val_loss", "eval_rewards/accuracies": "dpo_val_reward_accuracy",
            "eval_rewards/margins": "dpo_val_reward_margin", "learning_rate": "dpo_learning_rate",
            "grad_norm": "dpo_grad_norm", "tokens_per_s": "dpo_tokens_per_s"}


def live_metrics_callback(live, *, keys: dict[str, str], tokens_per_epoch: int | None = None):
    """A callback that hands each log's values to `live` (an ftpipe.live.LiveRun) under `keys`' names,
    with the tokens per second of the optimizer steps since the previous training log: their tokens
    are `tokens_per_epoch` x the epochs they covered, or, without it, the growth of the trainer's own
    `num_tokens` count (TRL's). Time spent evaluating or saving between steps does not count."""
    from transformers import TrainerCallback

    class LiveMetrics(TrainerCallback):
        def __init__(self):
            self.step_s, self.started, self.tokens = 0.0, None, None

        def on_train_begin(self, args, state, control, **kwargs):
            self.tokens = self._tokens(state, {"num_tokens": 0.0})  # the trainer's count starts at 0
            for logs in state.log_history:  # a resumed run's steps before its checkpoint, restored from it
                self._send(logs, step=logs.get("step", 0))

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.started is not None:
                self.step_s += time.perf_counter() - self.started
                self.started = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            values = dict(logs or {})
            if "loss" in values:
                values["tokens_per_s"] = self._speed(state, values)
            self._send(values, step=state.global_step)

        def _send(self, values, step: int) -> None:
            try:
                live.log({name: float(values[key]) for key, name in keys.items() if values.get(key) is not None},
                         step=step)
            except Exception as exc:  # noqa: BLE001 - a value that is no number: a logger never stops training
                live.fail(exc)

        def _tokens(self, state, logs) -> float | None:
            if tokens_per_epoch is not None:
                return tokens_per_epoch * (state.epoch or 0.0)
            return logs.get("num_tokens")

        def _speed(self, state, logs) -> float | None:
            tokens, before, seconds = self._tokens(state, logs), self.tokens, self.step_s
            self.tokens, self.step_s = tokens, 0.0
            if not isinstance(tokens, (int, float)) or before is None or seconds <= 0:
                return None
            return (tokens - before) / seconds

    return LiveMetrics()
