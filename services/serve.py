"""Serve a registered model over REST with `mlflow models serve`, on 127.0.0.1 only, following its alias.

    python -m services.serve                      # models:/<register.model_name>@champion on port 5001
    python -m services.serve --alias challenger --port 5002 --poll-s 10

The registry is the project's unless MLFLOW_TRACKING_URI says otherwise; the model runs in this environment.
POST /invocations {"inputs": ["..."]} answers {"predictions": ["..."]} (greedy, the settings register logged),
header `X-Model-Version`. The alias is read every `--poll-s` seconds; when it moves, the new version starts
beside the old one and the proxy (services.proxy) switches once it answers, failing no request.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

from ftpipe.credentials import redact
from ftpipe.errors import PipelineError, Terminated, run_cli
from ftpipe.params import RegisterParams, load_section
from services.proxy import HOST, Router, Supervisor, make_server

POLL_S = 30.0  # a promotion reaches clients within half a minute, for one registry read per poll


def command(model_uri: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-h", HOST, "-p", str(port)]


def environment(project_dir: Path, device: str = "cpu") -> dict[str, str]:
    """The server's environment: the project's store, and `device` (ftpipe.device's decision) as
    MLflow's prediction device (-1: the CPU, 0: the first GPU)."""
    from ftpipe.tracking import tracking_uri

    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = tracking_uri(project_dir)
    env.setdefault("MLFLOW_DEFAULT_PREDICTION_DEVICE", "0" if device == "cuda" else "-1")  # a user's choice wins
    # mlflow starts its server (uvicorn) by name: this environment's, not another on the PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def resolve(client, name: str, alias: str) -> str | None:
    """The version `name`@`alias` names; None if the model or the alias does not exist. Any other
    failure is a one-line PipelineError (RegistryUnreachable when the registry did not answer)."""
    from ftpipe import registry

    with registry.errors(client.tracking_uri, f"reading {name}@{alias}"):
        # A search, not get_model_version_by_alias: no such model or alias is an empty answer here,
        # not an error to tell apart from a registry that failed.
        found = client.search_registered_models(filter_string=f"name = '{name}'")
    version = found[0].aliases.get(alias) if found else None
    return None if version is None else str(version)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--alias", default="champion", help="registered model alias to serve (default: champion)")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--poll-s", type=float, default=POLL_S, help=f"seconds between reads of the alias (default: {POLL_S:g})")
    args = parser.parse_args(argv)
    if args.poll_s <= 0:
        parser.error("--poll-s must be more than 0")
    from ftpipe import device, registry

    name = load_section("register", RegisterParams).model_name
    placement = device.inference()
    env = environment(Path("."), placement.device)
    uri, store = f"models:/{name}@{args.alias}", env["MLFLOW_TRACKING_URI"]
    print(f"serve: {uri} from {redact(store)} on http://{HOST}:{args.port}/invocations "
          f"({placement.device}; the weights in the dtype they were registered in)", flush=True)
    client = registry.connect(store)
    version = resolve(client, name, args.alias)
    if version is None:
        raise PipelineError(f"no {uri} in {redact(store)}: register a model and set its {args.alias} alias first")
    router = Router()
    try:
        proxy = make_server(args.port, router)  # bound before the model loads: a busy port fails at once
    except OSError as exc:
        raise PipelineError(f"cannot serve on {HOST}:{args.port}: {exc.strerror}") from None
    threading.Thread(target=proxy.serve_forever, daemon=True).start()  # 503 until the first model answers
    supervisor = Supervisor(name=name, alias=args.alias, resolve=lambda: resolve(client, name, args.alias),
                            command=lambda v, port: command(f"models:/{name}/{v}", port), env=env, router=router)
    try:
        backend = supervisor.launch(version)
        router.switch(backend)
        print(f"serve: {name}@{args.alias} v{version} answering (process group {backend.proc.pid}, port "
              f"{backend.port}); reading the alias every {args.poll_s:g} s", flush=True)
        while True:  # in the main thread: SIGTERM and Ctrl-C interrupt its sleep
            time.sleep(args.poll_s)
            supervisor.check()
    except (Terminated, KeyboardInterrupt):
        print("serve: stopping every model server", flush=True)  # a stop asked for: exit 0, as a server does
    finally:
        proxy.shutdown()
        proxy.server_close()
        supervisor.stop_all()


if __name__ == "__main__":
    run_cli(main)
