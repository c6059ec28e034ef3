"""Where the stages read and write, relative to the project folder: the one definition of each path.

dvc.yaml declares the same paths as deps and outs; tests/test_paths.py checks that every path a stage
module names here is declared for that stage in dvc.yaml, that every out dvc.yaml declares is named
by its stage, and that no module spells one of these paths or file names itself.
"""

from pathlib import Path

PARAMS = Path("params.yaml")
DVC_LOCK = Path("dvc.lock")  # DVC's record of what produced the outputs (the lineage tags read it)
RAW_DIR = Path("data/raw")  # landing folder of training data files; a dep of prepare_data
SCORERS = Path("scorers")  # user metrics (evaluate.metrics "scorers.<module>:<function>"); a dep of the scoring stages
SPLITS = ("train", "val", "test")  # split_file(split) in PREPARED_DIR and PREFS_DIR
PREPARED_DIR = Path("data/prepared")  # {train,val,test}.jsonl
BASE_DIR = Path("models/base")
PARENT_DIR = Path("models/parent")  # the champion a continual fine-tune starts from (manifest.json only for base)
ADAPTER_DIR = Path("models/adapter")  # the adapter (or full model), merged/ inside where it can be merged
PREFS_DIR = Path("data/preferences")  # {train,val,test}.jsonl preference pairs and manifest.json
DPO_DIR = Path("models/dpo")  # the DPO adapter and merged/ model (manifest.json only when dpo is off)
DPO_LOSS_PLOT_NAME = "loss.png"  # in models/dpo/ (inside its folder out: written only when dpo runs)
GGUF_DIR = Path("models/gguf")  # the merged model as GGUF files and an Ollama Modelfile

# What a folder holds and where it came from, one per folder: models/base/ (prepare_base: source, weights'
# sha256, chat template), models/parent/ (prepare_parent: the champion a continual fine-tune starts from),
# data/preferences/ (prepare_prefs: whether pairs were built, and from what), models/dpo/ (dpo: {"enabled",
# "start"}). bench/gpu_check.py writes one in the base folder it builds.
MANIFEST_NAME = "manifest.json"
PREFS_MANIFEST_NAME = MANIFEST_NAME  # the same name, as stages/dpo.py imports it
TRAIN_CONFIG_NAME = "train_config.json"  # in models/adapter/ and models/dpo/: the params and summary of the run
PARENT_OLD_TEST = "test.jsonl"  # in models/parent/: the test split the parent champion was evaluated on
PARENT_TRAINED_ON = "train_prompts.json"  # in models/parent/: the prompt digests of every row it trained on

# Not a DVC out: DVC deletes a stage's outs before rerunning it, and these must survive a kill.
CHECKPOINTS = Path("checkpoints/train")
DPO_CHECKPOINTS = Path("checkpoints/dpo")

REPORTS = Path("reports")
VALIDATED = REPORTS / "validated.json"
DATA_REPORT = REPORTS / "data.json"
DATA_REPORT_MD = REPORTS / "data_report.md"
LEAKS = REPORTS / "leaks.jsonl"
QUANTIZE_REPORT = REPORTS / "quantize.json"
QUANTIZE_MD = REPORTS / "quantize.md"
TRAIN_REPORT = REPORTS / "train.json"
TRAIN_LOSS = REPORTS / "train_loss.csv"
VAL_LOSS = REPORTS / "val_loss.csv"
LOSS_PLOT = REPORTS / "loss.png"
PREFS_REPORT = REPORTS / "preferences.json"
DPO_REPORT = REPORTS / "dpo.json"
METRICS = REPORTS / "metrics.json"
# The base and few-shot candidates' scores: their own stage, so that a training change does not score them again.
BASE_SCORES = REPORTS / "base_scores.json"
GENERATIONS = REPORTS / "generations.jsonl"
COMPARISON = REPORTS / "comparison.md"
EXPORT_REPORT = REPORTS / "export.json"
EXPORT_MD = REPORTS / "export.md"
REGISTRATION = REPORTS / "registration.json"
# Written by the flows, not DVC outs: a run's summary (its times and date differ on every run).
SUMMARY = REPORTS / "summary.md"
PARAMS_DOC = Path("docs/params.md")  # generated from ftpipe/params.py (python -m scripts.params_doc)

# Folders a stage may leave half-written temporaries in after kill -9 (swept when a stage starts).
OUTPUT_FOLDERS = (Path("models"), Path("data"), REPORTS)


def split_file(split: str) -> str:
    """The file name of a split (one of SPLITS) in PREPARED_DIR and PREFS_DIR: <split>.jsonl."""
    return f"{split}.jsonl"
