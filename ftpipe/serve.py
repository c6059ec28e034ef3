"""Serve a registered model over REST with `mlflow models serve`, on 127.0.0.1 only.

    python -m ftpipe.serve                      # models:/<register.model_name>@champion on port 5001
    python -m ftpipe.serve --alias challenger --port 5002

The registry is the project's (mlruns.db beside it) unless MLFLOW_TRACKING_URI says otherwise. The
model runs in this environment (`--env-manager local`: its pinned packages are these), and the
server's workers are found on this interpreter's PATH. A request:

    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"inputs": ["What is the capital of France?"]}'

answers `{"predictions": ["..."]}`: the chat template applied to each prompt, greedy decoding,
at most 64 new tokens (the settings register logged with the model).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ftpipe.errors import run_cli
from ftpipe.params import RegisterParams, load_section
from ftpipe.secrets import redact

HOST = "127.0.0.1"


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ftpipe.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--alias", default="champion", help="registered model alias to serve (default: champion)")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args(argv)
    from ftpipe import device

    name = load_section("register", RegisterParams).model_name
    placement = device.inference()
    env = environment(Path("."), placement.device)
    uri = f"models:/{name}@{args.alias}"
    print(f"serve: {uri} from {redact(env['MLFLOW_TRACKING_URI'])} on http://{HOST}:{args.port}/invocations "
          f"({placement.device}; the weights in the dtype they were registered in)", flush=True)
    os.execve(sys.executable, command(uri, args.port), env)


if __name__ == "__main__":
    run_cli(main)
