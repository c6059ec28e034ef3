"""Trainer callbacks shared by the train and dpo stages."""

from __future__ import annotations


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
