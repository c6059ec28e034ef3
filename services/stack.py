"""The team stack: PostgreSQL, an S3-compatible store and an MLflow server over both, on 127.0.0.1.

    python -m services.stack {start,status,save,stop,remote} [--dir .stack]   # COMMAND --help: its options

PostgreSQL 16 from the `pgserver` wheel (TCP with a password kept in DIR/stack.json, mode 600; or
`--postgres-uri`), moto's S3 server (buckets `mlflow` and `dvc`; it keeps objects in memory, so what was
written after the last `save` or `stop` is lost if it dies) and `mlflow server` proxying artifacts, so
clients need MLFLOW_TRACKING_URI only. All data lies under DIR; nothing printed carries a password or key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ftpipe.credentials import MASK, redact
from ftpipe.errors import PipelineError, run_cli
from ftpipe.io import read_json, write_json

DEFAULT_DIR = Path(".stack")
STATE_FILE = "stack.json"
HOST = "127.0.0.1"
# MLflow's own default; S3 on MinIO's customary port; PostgreSQL one above its default, so a system
# PostgreSQL on 5432 is not in the way.
DEFAULT_PORTS = {"postgres": 5433, "s3": 9000, "mlflow": 5000}
SERVERS = ("postgres", "s3", "mlflow")  # start order; stop runs it backwards
MLFLOW_BUCKET, DVC_BUCKET = "mlflow", "dvc"
DATABASE, PG_SUPERUSER = "mlflow", "postgres"
PG_SYSTEM_USER = "pgserver"  # the user pgserver itself creates to run PostgreSQL as root
S3_REGION = "us-east-1"
S3_ACCESS_KEY, S3_SECRET_KEY = "stack", "stack-dummy-secret"  # moto accepts any: not a secret to protect
# A server's start, MLflow's first included (it creates its tables in PostgreSQL), took 8-25 s on 2 shared
# cores; the limit leaves room for a loaded machine.
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 20  # then SIGKILL
# Each worker is a process holding MLflow (~250 MB); two serve a team's clients on a 2-core machine.
WORKERS = 2


@dataclass
class Stack:
    """What DIR/stack.json holds: ports, the PostgreSQL URI (with its password: never printed as is)
    and the running servers {name: {"pid", "started"}} (started: the process's start time)."""

    dir: Path
    ports: dict[str, int]
    postgres_uri: str
    external_postgres: bool = False
    processes: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.ports['mlflow']}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def pgdata(self) -> Path:
        return self.dir / "postgres"

    def masked(self, text: str) -> str:
        """`text` with URI credentials and this stack's PostgreSQL password masked."""
        password = urlsplit(self.postgres_uri).password
        return redact(text.replace(password, MASK) if password else text)


def load(directory: Path) -> Stack | None:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    state = read_json(path)
    return Stack(**{**state, "dir": Path(directory)})


def _write(stack: Stack) -> None:
    """DIR/stack.json, mode 600 from its first byte (it holds the PostgreSQL password), put in place atomically."""
    path = stack.dir / STATE_FILE
    tmp = path.with_name(f".{STATE_FILE}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump({**asdict(stack), "dir": None}, handle, indent=2)
    os.replace(tmp, path)


def loopback_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a server or client of the stack: a proxy set in the environment is
    bypassed for 127.0.0.1, so the stack's traffic never leaves the machine."""
    env = {**os.environ, **(extra or {})}
    for name in ("NO_PROXY", "no_proxy"):
        env[name] = ",".join(filter(None, [env.get(name, ""), HOST, "localhost"]))
    return env


# --- processes ----------------------------------------------------------------------------------

def _process(stack: Stack, name: str):
    """The psutil.Process of a recorded server if it still runs (a zombie or a reused pid: None)."""
    import psutil

    entry = stack.processes.get(name)
    if not entry:
        return None
    try:
        proc = psutil.Process(int(entry["pid"]))
        if abs(proc.create_time() - entry["started"]) > 1 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.Error:
        return None
    return proc


def _group(pgid: int) -> list:
    """Live (non-zombie) processes of process group `pgid`: a server and the workers it forked."""
    import psutil

    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (OSError, psutil.Error):
            continue
    return members


def _stop_group(pgid: int) -> None:
    """SIGTERM to the whole group, SIGKILL to what is left after STOP_TIMEOUT_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _group(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _group(pgid):
            return


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((HOST, port)) == 0


def _check_free(stack: Stack, names: tuple[str, ...]) -> None:
    for name in names:
        if _listening(stack.ports[name]):
            raise PipelineError(f"port {stack.ports[name]} on {HOST} (--{name}-port) is in use by another program; "
                                f"choose another with --{name}-port")


def _spawn(stack: Stack, name: str, command: list[str], env: dict[str, str]) -> None:
    """Start a server detached (its own session, its output in DIR/logs/<name>.log) and record it."""
    import psutil

    logs = stack.dir / "logs"
    logs.mkdir(mode=0o700, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=stack.dir,
                                start_new_session=True)
    stack.processes[name] = {"pid": proc.pid, "started": psutil.Process(proc.pid).create_time()}
    _write(stack)


def _last_log_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"


def _wait_ready(stack: Stack, name: str, ready: Callable[[], bool], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if _process(stack, name) is None:
            raise PipelineError(f"{name} server exited while starting: {stack.masked(_last_log_line(log))} (log: {log})")
        if time.monotonic() > deadline:
            raise PipelineError(f"{name} server did not answer on port {stack.ports[name]} within {START_TIMEOUT_S} s "
                                f"(log: {log})")
        time.sleep(0.3)


# --- PostgreSQL ---------------------------------------------------------------------------------

def _pgserver():
    """The pgserver package, its logger silenced: it logs a failed command's whole output as an error,
    and the stack reports each failure as one line of its own."""
    import logging
    import warnings

    with warnings.catch_warnings():  # platformdirs: "XDG_RUNTIME_DIR is not set" (pgserver's lock folder, unused here)
        warnings.simplefilter("ignore")
        import pgserver

    logger = logging.getLogger("pgserver")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return pgserver


def _pg_system_user() -> str | None:
    """The user PostgreSQL runs as: pgserver's unprivileged one when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    from pgserver.utils import ensure_user_exists

    ensure_user_exists(PG_SYSTEM_USER)
    return PG_SYSTEM_USER


def _start_postgres(stack: Stack) -> None:
    pgserver = _pgserver()
    user = _pg_system_user()
    stack.pgdata.mkdir(exist_ok=True)
    if user:
        import pwd

        from pgserver.utils import ensure_prefix_permissions

        ensure_prefix_permissions(stack.pgdata)  # the server's user must traverse the folders above its data
        entry = pwd.getpwnam(user)
        os.chown(stack.pgdata, entry.pw_uid, entry.pw_gid)
    if not (stack.pgdata / "PG_VERSION").exists():
        _initdb(stack, user)
    log = stack.pgdata / "server.log"
    # pg_ctl starts the server in a session of its own and returns once it accepts connections.
    # -k '': no Unix socket, TCP on 127.0.0.1 only.
    try:
        pgserver.pg_ctl(["-w", "-t", "60", "-l", str(log), "-o", f"-h {HOST} -p {stack.ports['postgres']} -k ''", "start"],
                        pgdata=stack.pgdata, user=user)
    except subprocess.CalledProcessError:
        raise PipelineError(f"PostgreSQL in {stack.pgdata} did not start: {_last_log_line(log)} (log: {log})") from None
    import psutil

    pid = int((stack.pgdata / "postmaster.pid").read_text().split()[0])
    stack.processes["postgres"] = {"pid": pid, "started": psutil.Process(pid).create_time()}
    _write(stack)
    _create_database(stack)


def _initdb(stack: Stack, user: str | None) -> None:
    """A new cluster: trust on no socket (there is none), scram-sha-256 password over TCP."""
    pgserver = _pgserver()
    password = urlsplit(stack.postgres_uri).password
    pwfile = stack.dir / ".pgpass-init"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    if user:
        import pwd

        os.chown(pwfile, pwd.getpwnam(user).pw_uid, -1)
    try:
        pgserver.initdb(["-U", PG_SUPERUSER, f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=trust",
                         "--encoding=utf8"], pgdata=stack.pgdata, user=user)
    finally:
        pwfile.unlink()


def _connect(uri: str, setting: str):
    """A psycopg2 connection; a refusal is one line naming the setting and the URI (password masked)."""
    import psycopg2

    try:
        return psycopg2.connect(uri, connect_timeout=5)
    except psycopg2.Error as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PipelineError(f"PostgreSQL {setting} {redact(uri)} refused the connection: {redact(reason)}") from None


def _create_database(stack: Stack) -> None:
    parts = urlsplit(stack.postgres_uri)
    connection = _connect(parts._replace(path="/postgres").geturl(), "of the stack")
    connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if cursor.fetchone() is None:
                cursor.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        connection.close()


def _stop_postgres(stack: Stack) -> None:
    pgserver = _pgserver()
    proc = _process(stack, "postgres")
    if proc is None:
        return
    try:  # a fast shutdown: sessions are ended, the data is checkpointed
        pgserver.pg_ctl(["-w", "-t", str(STOP_TIMEOUT_S), "-m", "fast", "stop"], pgdata=stack.pgdata, user=_pg_system_user())
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        pass
    if _process(stack, "postgres") is not None:
        _stop_group(proc.pid)  # pg_ctl started the postmaster as its group's leader


# --- S3 (moto) ----------------------------------------------------------------------------------

def s3_client(stack: Stack):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=stack.s3_endpoint, aws_access_key_id=S3_ACCESS_KEY,
                        aws_secret_access_key=S3_SECRET_KEY, region_name=S3_REGION,
                        config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=120,
                                      proxies={}))


def _object_file(bucket: str, key: str) -> str:
    return hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()


def _listing(s3) -> dict[str, dict[str, str]]:
    """{bucket: {key: ETag}} of every object the store holds."""
    found: dict[str, dict[str, str]] = {}
    for bucket in (b["Name"] for b in s3.list_buckets()["Buckets"]):
        found[bucket] = {obj["Key"]: obj["ETag"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                         for obj in page.get("Contents", [])}
    return found


def save_s3(stack: Stack) -> tuple[int, int]:
    """Every object of every bucket into DIR/s3/; (objects copied now, objects held). An object whose
    ETag index.json already records is not copied again; the index is replaced only when every
    object is on disk, and files of objects no longer in the store are removed after it."""
    s3 = s3_client(stack)
    folder = stack.dir / "s3"
    objects = folder / "objects"
    objects.mkdir(parents=True, exist_ok=True)
    index = folder / "index.json"
    saved = read_json(index) if index.is_file() else {}
    current = _listing(s3)
    copied = 0
    for bucket, keys in current.items():
        for key, etag in keys.items():
            path = objects / _object_file(bucket, key)
            if saved.get(bucket, {}).get(key) == etag and path.is_file():
                continue
            tmp = path.with_name(f".{path.name}.tmp")
            s3.download_file(bucket, key, str(tmp))
            os.replace(tmp, path)
            copied += 1
    write_json(index, current)
    keep = {_object_file(bucket, key) for bucket, keys in current.items() for key in keys}
    for path in objects.iterdir():
        if path.name not in keep:
            path.unlink()
    return copied, len(keep)


def _restore_s3(stack: Stack) -> int:
    """Load DIR/s3/ into the (empty) store; the number of objects."""
    s3 = s3_client(stack)
    index = stack.dir / "s3" / "index.json"
    saved = read_json(index) if index.is_file() else {}
    for bucket, keys in saved.items():
        s3.create_bucket(Bucket=bucket)
        for key in keys:
            s3.upload_file(str(stack.dir / "s3" / "objects" / _object_file(bucket, key)), bucket, key)
    existing = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    for bucket in {MLFLOW_BUCKET, DVC_BUCKET} - existing:
        s3.create_bucket(Bucket=bucket)
    if saved:  # the ETag of a multipart upload depends on its part size: record the new ones
        write_json(index, _listing(s3))
    return sum(len(keys) for keys in saved.values())


def _start_s3(stack: Stack) -> int:
    command = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(stack.ports["s3"])]
    _spawn(stack, "s3", command, loopback_env())
    _wait_ready(stack, "s3", lambda: _listening(stack.ports["s3"]), stack.dir / "logs" / "s3.log")
    return _restore_s3(stack)


# --- MLflow -------------------------------------------------------------------------------------

def _healthy(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    try:
        with opener.open(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _start_mlflow(stack: Stack, workers: int) -> None:
    # MLflow's job runner (GenAI judges, prompt optimization: unused here) forks eight more processes,
    # about 1 GB together: off unless the environment turns it on.
    jobs = os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # The PostgreSQL URI (with its password) goes in the environment: in argv `ps` would show it.
    env = loopback_env({"MLFLOW_BACKEND_STORE_URI": stack.postgres_uri, "MLFLOW_S3_ENDPOINT_URL": stack.s3_endpoint,
                        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
                        "AWS_DEFAULT_REGION": S3_REGION, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": jobs})
    command = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(stack.ports["mlflow"]),
               "--workers", str(workers), "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/"]
    _spawn(stack, "mlflow", command, env)
    _wait_ready(stack, "mlflow", lambda: _healthy(stack.tracking_uri), stack.dir / "logs" / "mlflow.log")


# --- commands -----------------------------------------------------------------------------------

def _running(stack: Stack) -> dict[str, bool]:
    names = [name for name in SERVERS if not (name == "postgres" and stack.external_postgres)]
    return {name: _process(stack, name) is not None and _listening(stack.ports[name]) for name in names}


def start(directory: Path, *, ports: dict[str, int | None], postgres_uri: str | None = None,
          workers: int = WORKERS) -> Stack:
    """Start whatever of the stack is not running; a failure stops what this call started."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    stack = load(directory)
    if stack is None:
        password = secrets.token_urlsafe(24)
        stack = Stack(dir=directory, ports=dict(DEFAULT_PORTS),
                      postgres_uri=f"postgresql://{PG_SUPERUSER}:{password}@{HOST}:{DEFAULT_PORTS['postgres']}/{DATABASE}")
    stack.ports.update({name: port for name, port in ports.items() if port})
    if postgres_uri:
        stack.postgres_uri, stack.external_postgres = postgres_uri, True
    elif not stack.external_postgres:
        stack.postgres_uri = urlsplit(stack.postgres_uri)._replace(
            netloc=f"{PG_SUPERUSER}:{urlsplit(stack.postgres_uri).password}@{HOST}:{stack.ports['postgres']}").geturl()
    running = _running(stack)
    if any(running.values()):
        if all(running.values()):
            return stack
        up = ", ".join(name for name, on in running.items() if on)
        raise PipelineError(f"team stack in {directory} is partly running ({up}); "
                            f"stop it first: python -m services.stack stop --dir {directory}")
    stack.processes = {}
    _check_free(stack, tuple(running))
    if stack.external_postgres:
        _connect(stack.postgres_uri, "--postgres-uri").close()  # before anything starts
    _write(stack)
    try:
        if not stack.external_postgres:
            _start_postgres(stack)
        _start_s3(stack)
        _start_mlflow(stack, workers)
    except BaseException:
        _stop_servers(stack)
        raise
    return stack


def _stop_servers(stack: Stack) -> None:
    for name in reversed(SERVERS):
        if name == "postgres":
            _stop_postgres(stack)
        elif (proc := _process(stack, name)) is not None:
            _stop_group(proc.pid)  # started with its own session: pid == process group id
    stack.processes = {}
    _write(stack)


def stop(directory: Path) -> list[str]:
    """Stop MLflow, save S3 to disk, stop moto and PostgreSQL; lines saying what happened."""
    stack = _require(directory)
    lines = []
    if (proc := _process(stack, "mlflow")) is not None:
        _stop_group(proc.pid)  # first: nothing is written while S3 is saved
    if _process(stack, "s3") is not None:
        copied, held = save_s3(stack)
        lines.append(f"s3: {held} objects saved in {stack.dir / 's3'} ({copied} copied now)")
    elif (stack.dir / "s3" / "index.json").is_file():
        lines.append(f"s3: was not running; {stack.dir / 's3'} holds the objects of the last save")
    _stop_servers(stack)
    lines.append(f"team stack in {stack.dir} stopped")
    return lines


def status(directory: Path) -> list[str]:
    """One line per server, then the export line; PipelineError naming what does not run."""
    stack = _require(directory)
    running = _running(stack)
    where = {
        "postgres": f"{stack.masked(stack.postgres_uri)}" + ("" if stack.external_postgres else f", data in {stack.pgdata}"),
        "s3": f"{stack.s3_endpoint}, buckets {MLFLOW_BUCKET} (MLflow artifacts) and {DVC_BUCKET} (DVC remote), "
              f"saved in {stack.dir / 's3'}",
        "mlflow": stack.tracking_uri,
    }
    lines = []
    for name in SERVERS:
        if name not in running:
            lines.append(f"{name:<9} external  {where[name]}")
            continue
        pid = f"pid {stack.processes[name]['pid']}" if running[name] else ""
        lines.append(f"{name:<9} {'running' if running[name] else 'stopped':<9} {pid:<10} {where[name]}")
    down = [name for name, on in running.items() if not on]
    if down:
        print("\n".join(lines))
        raise PipelineError(f"team stack in {stack.dir}: {', '.join(down)} not running; "
                            f"start it with: python -m services.stack start --dir {stack.dir}")
    return [*lines, f"export MLFLOW_TRACKING_URI={stack.tracking_uri}"]


def configure_remote(directory: Path, *, project: Path, name: str) -> list[str]:
    """This project's default DVC remote on the stack's `dvc` bucket: url and endpoint in .dvc/config
    (committed), the dummy credentials in .dvc/config.local (git-ignored by DVC)."""
    stack = _require(directory)
    url = f"s3://{DVC_BUCKET}/"
    for args in (["remote", "add", "--force", "--default", name, url],
                 ["remote", "modify", name, "endpointurl", stack.s3_endpoint],
                 ["remote", "modify", name, "region", S3_REGION],
                 ["remote", "modify", "--local", name, "access_key_id", S3_ACCESS_KEY],
                 ["remote", "modify", "--local", name, "secret_access_key", S3_SECRET_KEY]):
        proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=loopback_env(),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise PipelineError(f"DVC remote '{name}' in {project}: `dvc {' '.join(args[:3])}` failed: {redact(reason)}")
    return [f"DVC remote '{name}' = {url} at {stack.s3_endpoint} (default); credentials in .dvc/config.local",
            "commit .dvc/config; then `dvc push` / `dvc pull`"]


def _require(directory: Path) -> Stack:
    stack = load(Path(directory).resolve())
    if stack is None:
        raise PipelineError(f"no team stack in {directory} ({STATE_FILE} missing): "
                            f"start one with: python -m services.stack start --dir {directory}")
    return stack


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.stack", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for command, what in (("start", "start what is not running; print what runs"),
                          ("status", "what runs, and the MLFLOW_TRACKING_URI to export"),
                          ("save", "copy S3's objects to the stack's folder now"),
                          ("stop", "save S3, then stop every server"),
                          ("remote", "make the stack's S3 this project's default DVC remote")):
        sub = commands.add_parser(command, help=what, description=what)
        sub.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="the stack's folder (default: .stack)")
    start_args = commands.choices["start"]
    for name in SERVERS:
        start_args.add_argument(f"--{name}-port", type=int, help=f"default {DEFAULT_PORTS[name]} (the first start's ports are kept)")
    start_args.add_argument("--postgres-uri", help="an existing PostgreSQL database instead of the bundled server")
    start_args.add_argument("--workers", type=int, default=WORKERS, help=f"MLflow server worker processes (default {WORKERS})")
    commands.choices["remote"].add_argument("--name", default="stack", help="DVC remote name (default: stack)")
    commands.choices["remote"].add_argument("--project", type=Path, default=Path("."), help="DVC project (default: .)")
    args = parser.parse_args(argv)

    if args.command == "start":
        ports = {name: getattr(args, f"{name}_port") for name in SERVERS}
        start(args.dir, ports=ports, postgres_uri=args.postgres_uri, workers=args.workers)
        lines = status(args.dir)
    elif args.command == "status":
        lines = status(args.dir)
    elif args.command == "save":
        stack = _require(args.dir)
        if _process(stack, "s3") is None:
            raise PipelineError(f"S3 server of the team stack in {stack.dir} is not running: nothing to save")
        copied, held = save_s3(stack)
        lines = [f"s3: {held} objects saved in {stack.dir / 's3'} ({copied} copied now)"]
    elif args.command == "stop":
        lines = stop(args.dir)
    else:
        lines = configure_remote(args.dir, project=args.project, name=args.name)
    print("\n".join(lines))


if __name__ == "__main__":
    run_cli(main)
