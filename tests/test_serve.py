"""Serving a registered model over REST: `python -m ftpipe.serve` runs `mlflow models serve` on
127.0.0.1 and answers a chat prompt as the merged model does with the same greedy settings."""

from __future__ import annotations

import json
import os
import sys
import urllib.request

import pytest
from conftest import Background
from test_retrain import free_port, wait_http

from ftpipe.serve import HOST, command

PROMPTS = ["say red cat number 3", "say blue dog number 12"]


def greedy_replies(merged_dir, template: str) -> list[str]:
    """What the merged model answers with the settings register logs: its prompt template, greedy, 64 new tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    replies = []
    for prompt in PROMPTS:
        ids = tokenizer(template.format(prompt=prompt), return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=64, do_sample=False)
        replies.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return replies


@pytest.mark.slow
def test_the_served_champion_answers_as_the_merged_model(tmp_path, tiny_model_dir, talking_model):
    import mlflow

    from ftpipe.chat import render
    from ftpipe.models import load_tokenizer
    from stages import register

    proj = tmp_path / "project"
    proj.mkdir()
    (proj / "params.yaml").write_text("register:\n  model_name: talker\n")
    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlruns.db'}")
    try:
        with mlflow.start_run():  # logged as the register stage logs the fine-tuned model
            version = register.log_model("talker", tiny_model_dir, talking_model)
        mlflow.MlflowClient().set_registered_model_alias("talker", "champion", version)
    finally:
        mlflow.set_tracking_uri(None)

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the project's own store
    server = Background([sys.executable, "-m", "ftpipe.serve", "--port", str(port)], proj, env, tmp_path / "serve.log")
    try:
        wait_http(f"http://{HOST}:{port}/ping", 180, server.proc)
        request = urllib.request.Request(f"http://{HOST}:{port}/invocations", data=json.dumps({"inputs": PROMPTS}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = json.loads(response.read())["predictions"]
    finally:
        server.stop()
    log = (tmp_path / "serve.log").read_text()
    assert f"serve: models:/talker@champion from sqlite:///{proj / 'mlruns.db'} on http://127.0.0.1:{port}" in log
    template = render(load_tokenizer(tiny_model_dir), [{"role": "user", "content": "{prompt}"}], generation_prompt=True)
    expected = greedy_replies(talking_model / "merged", template)
    print("served:", predictions)
    assert predictions == expected, log[-2000:]
    assert all(p.strip() and any(ch.isalpha() for ch in p) for p in predictions)  # words, not newlines


def test_the_server_binds_loopback_only():
    cmd = command("models:/m@champion", 5001)
    assert cmd[cmd.index("-h") + 1] == HOST == "127.0.0.1" and "--env-manager" in cmd
    assert cmd[cmd.index("--env-manager") + 1] == "local"
