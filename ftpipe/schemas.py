"""Typed models of the JSON reports the stages write and the stages and flows read.

The writer builds the model and the readers get it back from `read`, so a renamed or missing key
fails at once, naming the file and the key, instead of surfacing later as a KeyError elsewhere.
Unknown keys are refused too: a report written by other code is not silently half-read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from ftpipe.errors import PipelineError
from ftpipe.io import read_json, write_json


class _Report(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def read(cls, path: Path) -> Self:
        if not path.is_file():
            raise PipelineError(f"{path}: not found (run `dvc repro` to write it)")
        try:
            return cls.model_validate(read_json(path))
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(part) for part in first["loc"]) or "(top level)"
            raise PipelineError(f"{path}: {key}: {first['msg'].lower()} ({exc.error_count()} problem(s); "
                                "written by other code? rerun its stage)") from None

    def write(self, path: Path) -> None:
        write_json(path, self.model_dump(mode="json"))


class _Nested(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainReport(_Report):
    """reports/train.json (DVC metrics), written by the train stage."""

    method: str
    parent: str = "base"  # what training started from: "base" or "<model> v<N> (champion)"
    parent_version: str | None = None  # the parent champion's registered version
    steps: int
    epochs: float
    resumed_from_step: int
    early_stopped: bool
    train_loss_final: float | None
    val_loss_final: float  # of the model written (the best checkpoint after early stopping)
    val_loss_last_eval: float
    val_loss_best: float
    best_step: int
    kept_step: int
    train_val_gap: float | None
    runtime_s: float
    train_s: float  # runtime less evaluation and checkpointing
    tokens_per_s: float  # the rows' tokens, prefix included where packing shares it
    precision: str
    device: str = "cpu"  # where it trained: cuda | cpu
    attention: str
    optimizer: str
    parameters: int
    trainable_parameters: int
    rows: dict[str, int]
    packing: bool
    shared_prefix_tokens: int  # tokens every training row starts with
    dropped_too_long: dict[str, int]
    # The MLflow run the losses were logged into while training (ftpipe/live.py), which register
    # adopts; None: live_metrics off, or the store failed.
    live_run_id: str | None = None


class Leaks(_Nested):
    model_config = ConfigDict(extra="allow")  # one count per leak kind (ftpipe/leaks.py)

    total: int


class DataReport(_Report):
    """reports/data.json (DVC metrics), written by prepare_data."""

    source: str
    rows_in: int
    rules: dict[str, dict[str, int]]  # rule -> {changed|dropped: rows}
    rows_out: int
    near_duplicate_clusters: int
    split_groups: int
    split_rows_reassigned: int = 0  # rows whose own draw (ftpipe.splits) differs from their group's split
    splits: dict[str, int]
    leaks: Leaks
    leak_action: str
    train_rows_dropped_for_leaks: int
    token_filters: bool

    @property
    def leaks_in_training(self) -> int:
        """Leaks the trained model saw: drop removed every leaking training row (checked again until
        none is left), so only warn leaves them; `leaks` counts what was found."""
        return 0 if self.leak_action == "drop" else self.leaks.total


class PrefsReport(_Report):
    """reports/preferences.json (DVC metrics), written by prepare_prefs."""

    enabled: bool  # false: dpo is off and no pair was built
    kind: str | None = None  # pairs | thumbs (single replies rated good or bad)
    source: str | None = None
    pairs: dict[str, int] = {}  # split -> pairs (or rated replies) written
    good: dict[str, int] = {}  # thumbs: split -> rated replies labelled good (the rest are bad)
    dropped: dict[str, int] = {}  # reason -> pairs left out
    leaks: dict[str, int] = {}  # kind -> evaluation pairs leaking from training pairs, and "total"
    leak_action: str | None = None
    train_pairs_dropped_for_leaks: int = 0
    generated: int = 0  # self: base model replies generated
    generate_s: float = 0.0

    @property
    def leaks_in_training(self) -> int:
        """As DataReport's: drop removed the leaking training pairs."""
        return 0 if self.leak_action == "drop" else self.leaks.get("total", 0)


class DpoReport(_Report):
    """reports/dpo.json (DVC metrics), written by the dpo stage."""

    enabled: bool  # false: dpo is off and no model was written
    start: str | None = None  # what DPO started from (also its reference model)
    method: str = "dpo"  # dpo (DPO on pairs) | kto (KTOTrainer on good and bad replies)
    loss_type: str | None = None  # dpo: dpo.loss_type; kto: "kto"
    beta: float | None = None
    steps: int = 0
    epochs: float = 0.0
    pairs: dict[str, int] = {}
    train_loss_final: float | None = None
    val_loss_final: float | None = None
    test_loss: float | None = None  # DPO (or KTO) loss on the held-out test pairs (or rated replies)
    # TRL's implicit rewards (beta x log-ratio to the reference) on the held-out test pairs.
    test_reward_accuracy: float | None = None  # share of pairs whose chosen reply gets the higher reward; kto: None
    test_reward_margin: float | None = None  # mean reward of chosen (kto: good) - rejected (bad)
    train_curve: list[dict[str, float]] = []  # step, loss per logged training step
    val_curve: list[dict[str, float]] = []  # step, loss, reward_accuracy, reward_margin per evaluation
    # The policy's own log-probability of chosen - rejected (summed over reply tokens), averaged over
    # the test pairs, before and after: the preference the model actually learned. kto: the mean
    # log-probability of the test split's good replies minus that of its bad replies.
    test_logp_margin_before: float | None = None
    test_logp_margin_after: float | None = None
    runtime_s: float = 0.0
    resumed_from_step: int = 0  # the checkpoint an interrupted run resumed from; 0: a fresh run
    precision: str | None = None
    parameters: int = 0
    trainable_parameters: int = 0
    live_run_id: str | None = None  # as TrainReport's, for the DPO run


class GeneralText(_Nested):
    path: str
    tokens: int


class OldTask(_Nested):
    """The parent champion and the fine-tuned model on the parent's own test split (continual fine-tuning)."""

    parent: str  # "<model> v<N>"
    examples: int
    left_out_seen: int = 0  # old test rows left out: their prompt is in the current train or val split
    parent_scores: dict[str, float]
    finetuned: dict[str, float]


class MetricsReport(_Report):
    """reports/metrics.json (DVC metrics), written by evaluate: one block per candidate, same keys."""

    examples: int
    base: dict[str, float]
    fewshot: dict[str, float]
    finetuned: dict[str, float]
    dpo: dict[str, float] | None = None  # the DPO model, when the dpo stage is enabled
    delta: dict[str, float]  # fine-tuned - base
    forgetting: float  # general-text perplexity change after fine-tuning
    training: dict[str, Any]  # evaluate.training_check's facts about reports/train.json
    few_shot_ids: list[str]
    general_text: GeneralText
    bleu_signature: str
    intervals: dict[str, dict[str, dict[str, Any]]]  # finetuned_vs_base -> metric -> Interval.as_dict()
    settings: dict[str, Any]  # the resolved evaluate settings (register scores the champion with them)
    old_task: OldTask | None = None  # with train.init_from: champion and the parent's test split at hand

    def candidate(self, name: str) -> dict[str, float]:
        found = {"base": self.base, "fewshot": self.fewshot, "finetuned": self.finetuned, "dpo": self.dpo}[name]
        if found is None:
            raise PipelineError(f"reports/metrics.json: no '{name}' candidate (rerun `dvc repro evaluate`)")
        return found

    @property
    def product(self) -> str:
        """The candidate this pipeline registers: the DPO model when it ran, else the SFT one."""
        return "dpo" if self.dpo is not None else "finetuned"


class GgufFile(_Nested):
    file: str  # relative to the project folder
    bytes: int
    sha256: str
    write_s: float
    load_s: float
    max_abs_logit_diff: float  # over every position of the compared conversations
    mean_abs_logit_diff: float
    top1_agreement: float  # share of positions whose most likely next token is the merged model's
    exact_match: float  # greedy replies identical to the merged model's
    token_agreement: float


class ExportReport(_Report):
    """reports/export.json (DVC metrics), written by the export stage."""

    model: str | None = None  # the merged model exported (the SFT one, or the DPO one when dpo is enabled)
    formats: dict[str, GgufFile]
    modelfile: str | None  # the Ollama Modelfile, None when no GGUF was written
    pre_tokenizer: str  # tokenizer.ggml.pre written (llama.cpp's pre-tokenizer name)
    prompts: int
    logit_positions: int
    gguf_package: str


class Promotion(_Nested):
    promote: bool
    reasons: list[str]
    metric: str
    min_improvement: float
    intervals: dict[str, dict[str, Any] | None]  # base / champion -> the gain's interval (None: not formed)


class ChampionScores(_Nested):
    version: str
    scored: str
    run_id: str
    metrics: dict[str, float]  # on this test split
    logged_metrics: dict[str, float]  # what its own run logged when it was registered
    examples: int | None = None  # test rows it was scored on (the split's rows it did not train on)
    left_out_trained: int | None = None  # test rows left out because it trained on them; None: not known


class RegistrationReport(_Report):
    """reports/registration.json, written by register."""

    model_name: str
    version: str
    model_uri: str
    experiment: str
    pipeline_run_id: str
    base_run_id: str
    fewshot_run_id: str
    finetuned_run_id: str  # the run holding the registered model (the DPO model's, with dpo enabled)
    candidate: str = "finetuned"  # which candidate was registered: finetuned | dpo
    sft_run_id: str | None = None  # with dpo enabled: the SFT model's metrics (not registered)
    tracking_uri: str  # credentials masked
    aliases: list[str]
    promotion: Promotion
    champion: ChampionScores | None  # the champion the gate compared with, scored again (None: none)
