"""Serving a registered model over REST: `python -m services.serve` runs `mlflow models serve` on
127.0.0.1 behind its proxy, answers a chat prompt as the merged model does with the same greedy
settings, and follows the champion alias to a new version without failing a request."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from conftest import Background
from test_retrain import free_port, wait_http

from services.proxy import VERSION_HEADER, Backend, Router, Supervisor, group_alive, make_server
from services.serve import HOST, command, resolve

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


def register_champion(proj, base_dir, adapter_dir) -> str:
    """A new version of `talker`, logged as the register stage logs the fine-tuned model, made champion."""
    import mlflow

    from stages import register

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(proj)  # the store's default artifact folder (./mlruns) is the project's, not this checkout's
        mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlruns.db'}")
        try:
            with mlflow.start_run():
                version = register.log_model("talker", base_dir, adapter_dir)
            mlflow.MlflowClient().set_registered_model_alias("talker", "champion", version)
        finally:
            mlflow.set_tracking_uri(None)
    return version


def ask(port: int, prompts: list[str]) -> tuple[str, list[str]]:
    """(the version that answered, its predictions)."""
    request = urllib.request.Request(f"http://{HOST}:{port}/invocations", data=json.dumps({"inputs": prompts}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.headers[VERSION_HEADER], json.loads(response.read())["predictions"]


@contextlib.contextmanager
def traffic(port: int):
    """Requests sent one after another until the block ends: the version or the error of each."""
    answers, done = [], threading.Event()

    def send() -> None:
        while not done.is_set():
            try:
                answers.append(ask(port, PROMPTS[:1])[0])
            except Exception as exc:  # any failure is what the test looks for
                answers.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        yield answers
    finally:
        done.set()
        sender.join(timeout=120)


def wait_for_line(log, pattern: str, proc: subprocess.Popen, timeout_s: float = 300) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := re.search(pattern, log.read_text()):
            return found
        assert proc.poll() is None, f"serve exited with {proc.returncode}: {log.read_text()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"no line {pattern!r} in {timeout_s:.0f} s: {log.read_text()[-3000:]}")


def wait_gone(pgids: list[int], timeout_s: float = 30) -> list[int]:
    """The process groups still alive after `timeout_s` (orphans reaped by init take a moment)."""
    deadline = time.monotonic() + timeout_s
    while (alive := [g for g in pgids if group_alive(g)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


@pytest.mark.slow
def test_the_served_model_follows_the_champion(tmp_path, tiny_model_dir, talking_model):
    from ftpipe.chat import render
    from ftpipe.models import load_tokenizer

    proj = tmp_path / "project"
    proj.mkdir()
    (proj / "params.yaml").write_text("register:\n  model_name: talker\n")
    untrained = tmp_path / "untrained"  # v2: the random tiny model, whose replies differ from v1's
    untrained.mkdir()
    (untrained / "merged").symlink_to(tiny_model_dir)
    v1 = register_champion(proj, tiny_model_dir, talking_model)

    port, log = free_port(), tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the project's own store
    server = Background([sys.executable, "-m", "services.serve", "--port", str(port), "--poll-s", "1"], proj, env, log)
    groups = []
    try:
        wait_http(f"http://{HOST}:{port}/ping", 180, server.proc)
        groups.append(int(wait_for_line(log, r"v1 answering \(process group (\d+)", server.proc, 10)[1]))
        first = ask(port, PROMPTS)
        started = time.monotonic()
        with traffic(port) as answers:
            v2 = register_champion(proj, tiny_model_dir, untrained)
            switched = wait_for_line(log, r"switched from v1 to v2 \(process group (\d+)", server.proc)
            switch_s = time.monotonic() - started
            groups.append(int(switched[1]))
            sent = len(answers)
            while len(answers) < sent + 3:  # a few answers after the switch too
                time.sleep(0.1)
        old_left = group_alive(groups[0])
        second = ask(port, PROMPTS)

        import mlflow

        mlflow.MlflowClient(f"sqlite:///{proj / 'mlruns.db'}").delete_registered_model_alias("talker", "champion")
        wait_for_line(log, r"warning: talker@champion no longer exists; still serving v2", server.proc, 30)
        without_alias = ask(port, PROMPTS[:1])[0]
    finally:
        server.stop()
    output = log.read_text()
    print(f"switched in {switch_s:.1f} s after the registration began; {len(answers)} requests during it")
    assert server.proc.returncode == 0, output[-3000:]
    assert not old_left, "v1's server outlived the switch"
    assert not wait_gone(groups), f"model servers left after the supervisor stopped: {output[-2000:]}"
    assert f"serve: models:/talker@champion from sqlite:///{proj / 'mlruns.db'} on http://127.0.0.1:{port}" in output

    template = render(load_tokenizer(tiny_model_dir), [{"role": "user", "content": "{prompt}"}], generation_prompt=True)
    assert first == (v1, greedy_replies(talking_model / "merged", template)), output[-2000:]
    assert all(p.strip() and any(ch.isalpha() for ch in p) for p in first[1])  # words, not newlines
    # The random model replies with newlines only, which MLflow's text-generation output strips.
    assert second == (v2, [r.strip() for r in greedy_replies(tiny_model_dir, template)]) and second[1] != first[1]
    failures = [a for a in answers if not isinstance(a, str)]
    assert not failures, failures[:3]
    assert answers == sorted(answers) and {v1, v2} <= set(answers)  # v1 until the switch, then v2 only
    assert without_alias == v2


class Echo(http.server.BaseHTTPRequestHandler):
    """A stand-in model server: answers its port after `delay_s` seconds."""

    delay_s = 0.0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(self.delay_s)
        body = str(self.server.server_address[1]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def echo_server(delay_s: float):
    server = http.server.ThreadingHTTPServer((HOST, 0), type("Slow", (Echo,), {"delay_s": delay_s}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def post(port: int) -> tuple[str, str]:
    with urllib.request.urlopen(urllib.request.Request(f"http://{HOST}:{port}/x", data=b"{}"), timeout=30) as response:
        return response.headers[VERSION_HEADER], response.read().decode()


def test_a_switch_waits_for_the_requests_in_flight():
    """A request that started before a switch is answered by the old server, which the drain keeps
    until that answer is read (then it can be stopped); later requests go to the new one."""
    router = Router()
    proxy = make_server(free_port(), router)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        with echo_server(0) as fast, contextlib.ExitStack() as stack:
            slow = stack.enter_context(echo_server(1.5))
            router.switch(Backend("1", slow))
            in_flight, sent = [], time.monotonic()
            request = threading.Thread(target=lambda: in_flight.append(post(proxy.server_address[1])))
            request.start()
            time.sleep(0.5)  # the request is with the slow server now
            old = router.switch(Backend("2", fast))
            assert post(proxy.server_address[1]) == ("2", str(fast))
            assert router.drain(old, timeout=10)
            assert time.monotonic() - sent >= 1.5  # the drain waited for the slow answer
            stack.close()  # the old server stopped, as the supervisor stops it after the drain
            request.join(timeout=10)
            assert in_flight == [("1", str(slow))]
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_an_unreachable_registry_keeps_the_served_model(monkeypatch, capsys):
    """A registry that does not answer while polling is a warning, never "no champion"."""
    from ftpipe import registry

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refused connection fails at once
    client = registry.connect(f"http://{HOST}:{free_port()}")  # nothing listens there
    router = Router()
    served = Backend("3", free_port())
    router.switch(served)
    supervisor = Supervisor(name="talker", alias="champion", resolve=lambda: resolve(client, "talker", "champion"),
                            command=lambda version, port: ["false"], env={}, router=router)
    supervisor.check()
    out = capsys.readouterr().out
    assert re.fullmatch(r"serve: warning: MLflow tracking server http://127\.0\.0\.1:\d+ unreachable or failing "
                        r"\(reading talker@champion: .+\); still serving v3\n", out), out
    assert router.current is served


def test_no_champion_stops_at_start_with_one_line(tmp_path):
    proj = tmp_path / "project"
    proj.mkdir()
    (proj / "params.yaml").write_text("register:\n  model_name: talker\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run([sys.executable, "-m", "services.serve", "--port", str(free_port())], cwd=proj, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: no models:/talker@champion in sqlite:///{proj / 'mlruns.db'}: register a model and set its champion alias first")


def test_the_server_binds_loopback_only():
    cmd = command("models:/m@champion", 5001)
    assert cmd[cmd.index("-h") + 1] == HOST == "127.0.0.1" and "--env-manager" in cmd
    assert cmd[cmd.index("--env-manager") + 1] == "local"
