"""Shared fixtures: a tiny randomly-initialised chat model, tiny data, and a throw-away project.

The tiny model (2 layers, 32 wide, a 400-token byte-level BPE with a ChatML template) is built from
a config, so the suite needs no download and runs in minutes on CPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

# One thread for this process and every process a test starts (stages, flows, servers): the tiny
# model gains nothing from a second one, and `make test` runs two test processes (pytest-xdist) on
# this project's two cores, where two threads each would contend (torch honours this at import).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
# Modules whose tests must share one xdist worker, as one unit of work: each has a module-scoped
# fixture that is expensive (a server stack, an MLflow server, a copy of the finished pipeline) or
# reads the session's one flow run.
SHARED_FIXTURE_MODULES = ("test_stack.py", "test_retrain.py", "test_register.py", "test_distributed.py",
                          "test_train.py", "test_export.py", "test_quantize.py", "test_flow_run.py",
                          "test_live_metrics.py")


def pytest_xdist_make_scheduler(config, log):
    """`--dist load` (each test to the next free worker), except that each module named above goes to
    one worker whole. xdist's own `--dist loadgroup` cannot do this with pytest 9.2: the group it
    writes into the test id no longer takes effect (pytest-xdist issue #1386)."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if Path(module).name in SHARED_FIXTURE_MODULES else nodeid

    config.option.loadscopereorder = False  # units in collection order: LONGEST_FIRST's (below)
    return SharedFixtureScheduling(config, log)


# Modules whose tests take a minute or more, longest first (measured), dealt out before the rest so
# that no worker starts one near the end while the other idles. The first goes to one worker, which
# makes the session's pipeline run (`flow_run`, about 85 s) while the other runs test_bench_scale and
# test_live_metrics, which need none of it, so neither waits for it.
LONGEST_FIRST = ("test_flow_run.py", "test_bench_scale.py", "test_live_metrics.py", "test_register.py",
                 "test_retrain.py", "test_project_store.py", "test_pipeline.py", "test_tune.py",
                 "test_train.py", "test_stack.py", "test_distributed.py", "test_dpo.py", "test_faults.py",
                 "test_continual.py", "test_custom_metrics.py", "test_serve.py")


# Session fixtures that are (or read) the session's whole pipeline run of the tiny project (about a minute).
PIPELINE_RUNS = {"built_project", "flow_run"}


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(config, items) -> None:
    """A test that starts from a whole pipeline run counts as slow too, so that `make test-fast`
    makes no such run (`make test` runs every test); the longest modules go first."""
    for item in items:
        if PIPELINE_RUNS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: files keep their order


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FLOW_OUTPUT = "flow.log"
WORDS = "red green blue cat dog bird one two three four five hello world what is the colour of sky grass".split()


def qa_rows(n: int, offset: int = 0) -> list[dict[str, str]]:
    """Distinct, learnable prompt/response pairs."""
    rows = []
    for i in range(offset, offset + n):
        a, b = WORDS[i % len(WORDS)], WORDS[(i * 7 + 3) % len(WORDS)]
        rows.append({"prompt": f"say {a} {b} number {i}", "response": f"{b} {a} {i}"})
    return rows


def ran(output: str) -> set[str]:
    """The stages `dvc repro` ran, from what it printed."""
    return set(re.findall(r"Running stage '([a-z_]+)'", output))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def once_per_run(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A new folder filled by `build(folder)` once per test run. Under xdist the workers share it: the
    first to ask builds it while the others wait on its lock, then reuse it (the pattern xdist's docs
    give for an expensive session fixture)."""
    from filelock import FileLock

    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent  # this run's folder, above each worker's own
    folder, done = root / name, root / f"{name}.done"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():  # not built, or a worker failed while building it
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return once_per_run(tmp_path_factory, "tiny-model", _build_tiny_model)


def _build_tiny_model(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [f"{r['prompt']} {r['response']} user assistant system" for r in qa_rows(200)]
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(out)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)


@pytest.fixture(scope="session")
def talking_model(tmp_path_factory, tiny_model_dir):
    """A tiny model that answers in words (see _train_talking), trained once per run and shared read-only."""
    return once_per_run(tmp_path_factory, "talking", lambda folder: _train_talking(tiny_model_dir, folder)) / "adapter"


def _train_talking(tiny_model_dir: Path, folder: Path) -> None:
    """The tiny model fully fine-tuned for 150 steps on the qa rows, so that it answers with words
    (the random tiny model, and the suite's 6-step fine-tune of it, answer with newlines only).
    Saved as the train stage's merged/ folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftpipe.chat import IGNORE_INDEX, encode

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [encode(tokenizer, [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}])
            for r in qa_rows(80)]
    width = max(len(r["input_ids"]) for r in rows)
    pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
    ids = torch.tensor([pad(r["input_ids"], tokenizer.pad_token_id) for r in rows])
    labels = torch.tensor([pad(r["labels"], IGNORE_INDEX) for r in rows])
    mask = torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter_dir = folder / "adapter"
    model.save_pretrained(adapter_dir / "merged")
    tokenizer.save_pretrained(adapter_dir / "merged")


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory, tiny_model_dir, tiny_data):
    """(tiny params, models/base, data/prepared) made by the prepare stages' run(): what the train
    stage's run() reads, for the modules that train in-process (test_train, test_bottleneck)."""
    from ftpipe.params import PrepareDataParams
    from stages import prepare_base, prepare_data

    tmp = tmp_path_factory.mktemp("train-inputs")
    cfg = tiny_params(tiny_model_dir, tiny_data)
    base, data = tmp / "base", tmp / "prepared"
    prepare_base.run(params=prepare_base.PrepareBaseParams(**cfg["prepare_base"]), out_dir=base)
    prepare_data.run(params=PrepareDataParams(**cfg["prepare_data"]), out_dir=data, reports_dir=tmp / "r0")
    return cfg, base, data


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-data")
    rows = qa_rows(80)
    rows += rows[:10]  # exact duplicates that cleaning must drop
    rows.append({"prompt": "   ", "response": "empty prompt"})
    return write_jsonl(folder / "raw.jsonl", rows)


def tiny_params(model_dir: Path, data_file: Path) -> dict:
    """The shipped params.yaml, pointed at the tiny model and data and cut to a few steps."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare_base"].update(source="local", path=str(model_dir))
    params["prepare_data"].update(source="file", path=str(data_file), val_fraction=0.1, test_fraction=0.1,
                                  max_tokens=64)  # = train.max_length
    # int8 only: bitsandbytes' CPU 4-bit kernel needs wider layers (test_quantize builds a wider model).
    params["quantize"].update(variants=["int8"], max_rows=8, prompts=4, max_new_tokens=8, batch_size=4)
    # live_metrics off: an MLflow store created per stage run costs seconds (test_live_metrics turns it on).
    params["train"].update(max_steps=6, batch_size=4, eval_steps=3, logging_steps=1, learning_rate=5e-3,
                           max_length=64, live_metrics=False, precision="fp32")
    params["dpo"].update(live_metrics=False, precision="fp32")
    # The tiny model's context is 256 tokens.
    params["evaluate"].update(max_new_tokens=8, batch_size=4, general_max_length=256, general_stride=128)
    params["register"].update(experiment="tiny-test", model_name="tiny-model")
    # The same numbers on every CPU kind (above too): bf16 is tested where it is asked for (test_device).
    params["inference"].update(precision="fp32")
    return params


def make_project(proj: Path, model_dir: Path, data_file: Path) -> Path:
    """A git + DVC project in `proj` holding this repo's pipeline code and params for the tiny model."""
    proj.mkdir()
    for name in ("ftpipe", "stages", "flows", "scorers"):
        shutil.copytree(ROOT / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", proj / "dvc.yaml")
    (proj / "data" / "raw").mkdir(parents=True)  # prepare_data's landing-folder dep
    (proj / "data" / "raw" / ".gitkeep").touch()
    # Data files live under data/raw/, the one place DVC hashes them (the stage refuses others).
    shutil.copy(data_file, proj / "data" / "raw" / "tiny.jsonl")
    params = tiny_params(model_dir, Path("data/raw/tiny.jsonl"))
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for ignore in (".gitignore", "models/.gitignore", "data/.gitignore"):  # the repo's, DVC's lines included
        (proj / ignore).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / ignore, proj / ignore)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=proj, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=proj, check=True)
    subprocess.run(git + ["add", "-A"], cwd=proj, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "tiny project"], cwd=proj, check=True)
    return proj


@pytest.fixture(scope="session")
def project_template(tmp_path_factory, tiny_model_dir, tiny_data) -> Path:
    """`project`'s starting point, made once per run: make_project starts DVC three times (~0.8 s)."""
    build = lambda folder: make_project(folder / "project", tiny_model_dir, tiny_data)  # noqa: E731
    return once_per_run(tmp_path_factory, "project-template", build) / "project"


@pytest.fixture
def project(tmp_path, project_template, monkeypatch) -> Path:
    """A git + DVC project holding this repo's pipeline code and params for the tiny model (a copy of
    one made by make_project: it holds no path of its own, its data is under data/raw/)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Path(shutil.copytree(project_template, tmp_path / "project", symlinks=True))


class Background:
    """A command started now whose output (into `log`) a fixture or test collects later: a server,
    migrations, the session's flow run."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         text=True, start_new_session=True)

    def result(self, timeout: float = 1200) -> str:
        """What it printed; fails the fixture that asked if it failed."""
        returncode = self.proc.wait(timeout=timeout)
        output = self.log.read_text()
        assert returncode == 0, output[-3000:]
        return output

    def stop(self) -> None:
        from ftpipe.processes import stop_group

        stop_group(self.proc, signal.SIGTERM, timeout=30)


def _flow_run(folder: Path, model_dir: Path, data_file: Path) -> None:
    """`python -m flows.pipeline` on a new tiny project in folder/project, as `make run` starts it: no
    Prefect server configured (the flow starts its temporary one), no internet, Python's default
    warnings and no telemetry opt-outs. What it printed (stdout + stderr) goes beside the project."""
    proj = make_project(folder / "project", model_dir, data_file)
    env = {**stage_env(), "PREFECT_HOME": str(folder / "prefect-home")}
    for name in ("PREFECT_API_URL", "PYTHONWARNINGS", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK",
                 "DVC_NO_ANALYTICS", "MLFLOW_DISABLE_TELEMETRY", "HF_HUB_DISABLE_TELEMETRY"):
        env.pop(name, None)
    run = Background([sys.executable, "-m", "flows.pipeline", "--project-dir", str(proj)], proj, env,
                     folder / FLOW_OUTPUT)
    try:
        run.result()
    finally:
        run.stop()


@pytest.fixture(scope="session")
def flow_run(tmp_path_factory, tiny_model_dir, tiny_data, prefect_home_started) -> tuple[Path, str]:
    """The session's one whole pipeline run (conftest's _flow_run): the tiny project after it and what
    the run printed. Made once per test run (once_per_run), shared read-only by every test that reads
    it; a test that changes a project works on a copy (`finished_project`). `prefect_home_started`:
    that Prefect home's migrations run beside it."""
    build = lambda folder: _flow_run(folder, tiny_model_dir, tiny_data)  # noqa: E731
    folder = once_per_run(tmp_path_factory, "flow", build)
    return folder / "project", (folder / FLOW_OUTPUT).read_text()


@pytest.fixture(scope="session")
def built_project(flow_run) -> Path:
    """The tiny project after one whole pipeline run: the flow's, which runs each stage through
    `dvc repro` (test_flow_run: a `dvc repro` afterwards finds nothing to do and keeps the lock)."""
    return flow_run[0]


@pytest.fixture(scope="session")
def prefect_home_started(tmp_path_factory):
    """`prefect_home_template`'s migrations, started in the background (by `flow_run` too)."""
    home = tmp_path_factory.mktemp("prefect-home-template")
    env = {**stage_env(), "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    run = Background([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], home, env,
                     home.parent / "prefect-home-template.log")
    yield home, run
    run.stop()


@pytest.fixture(scope="session")
def prefect_home_template(prefect_home_started) -> Path:
    """A Prefect home whose database is already migrated. A new home costs each flow process (or
    server) about 8 s of migrations before it runs anything; tests copy this one (`prefect_home`)."""
    home, run = prefect_home_started
    run.result(timeout=300)
    return home


@pytest.fixture
def prefect_home(prefect_home_template, tmp_path) -> Path:
    """tmp_path/prefect-home: a test's own Prefect home, migrated (a copy of the template)."""
    return Path(shutil.copytree(prefect_home_template, tmp_path / "prefect-home"))


class PrefectServer:
    """A running Prefect API: `url` for PREFECT_API_URL, `home` the Prefect home its database is in."""

    def __init__(self, url: str, home: Path) -> None:
        self.url, self.home = url, home


@pytest.fixture(scope="session")
def prefect_server(prefect_home_template, tmp_path_factory):
    """One Prefect server per test process, on 127.0.0.1, for the flow processes of tests that are not
    about the temporary server a flow starts without one (test_flow_run, test_faults' SIGTERM test
    and test_flow_errors are): each such process then saves the ~6 s of starting its own. Started as
    Prefect starts that temporary server (prefect.server.api.server.SubprocessASGIServer: uvicorn,
    ephemeral mode, so the same services), on a copy of the migrated home."""
    import socket
    import time
    import urllib.request

    import prefect

    from ftpipe.processes import stop_group

    home = Path(shutil.copytree(prefect_home_template, tmp_path_factory.mktemp("prefect-server") / "home"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**stage_env(), "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = home.parent / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
                                   "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                                   "--port", str(port), "--log-level", "error", "--lifespan", "on"],
                                  cwd=home, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180  # a loaded machine can take long
        while True:
            assert server.poll() is None, f"the Prefect server exited with {server.returncode}: {log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"{url}/health did not answer in 180 s"
                time.sleep(0.2)
        yield PrefectServer(url, home)
    finally:
        stop_group(server, signal.SIGTERM, timeout=20)


def prefect_files(*homes: Path) -> list[Path]:
    """Every file under the Prefect homes given (database, its journal, result storage, logs)."""
    return [p for home in homes for p in home.rglob("*") if p.is_file()]


@pytest.fixture
def finished_project(built_project, tmp_path, monkeypatch) -> Path:
    """A copy of `built_project` (MLflow store included) for a test to change as it likes."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Path(shutil.copytree(built_project, tmp_path / "project", symlinks=True))


def stage_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def dvc(proj: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=proj, env=stage_env(),
                          capture_output=True, text=True)


def killed_at_first_checkpoint(proj: Path, name: str) -> None:
    """`python -m stages.<name>` started in `proj` and killed (-9) as soon as its first complete
    checkpoint is under checkpoints/<name>/; fails if the run ends before one."""
    import time

    proc = subprocess.Popen([sys.executable, "-m", f"stages.{name}"], cwd=proj, env=stage_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(proj.glob(f"checkpoints/{name}/*/checkpoint-*/trainer_state.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def stage(proj: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=proj, env=stage_env(),
                          capture_output=True, text=True)


def register_in_process(proj: Path) -> dict:
    """The register stage's main() run in this process, in `proj` (what `python -m stages.register`
    runs, without a new interpreter's imports): the registration.json it wrote. Tests of its error
    lines and exit codes run it as its own process (`stage`)."""
    import mlflow

    from ftpipe.tracking import HTTP_DEFAULTS
    from stages import register

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(proj)
        for name in ("MLFLOW_TRACKING_URI", *HTTP_DEFAULTS):  # the stage sets them; undone on exit
            patch.delenv(name, raising=False)
        try:
            register.main()
        finally:
            mlflow.set_tracking_uri(None)  # the stage's global URI points into this test's project
    return json.loads((proj / "reports" / "registration.json").read_text())


def set_param(proj: Path, section: str, key: str, value) -> None:
    path = proj / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
