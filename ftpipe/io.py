"""Atomic output writing and line-checked JSONL reading.

Every stage writes into a hidden temporary sibling and renames it into place only when all of it
is written, so a failure or a kill never leaves a partial output where DVC or a user would read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ftpipe.errors import PipelineError

TMP_MARK = ".tmp-"  # .<name>.tmp-<pid>: the writing process's id, so a dead writer's leftovers are known


def _tmp_sibling(target: Path) -> Path:
    return target.parent / f".{target.name}{TMP_MARK}{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale_tmp(folders: Iterable[Path]) -> list[Path]:
    """Remove temporary outputs left in `folders` by writers that are gone (kill -9 mid-save can
    leave a half-written model of hundreds of MB); return what was removed."""
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            name, _, pid = entry.name.rpartition(TMP_MARK)
            if not (entry.name.startswith(".") and name and pid.isdigit()):
                continue
            if int(pid) == os.getpid() or not _alive(int(pid)):
                remove_path(entry)
                removed.append(entry)
    return removed


def remove_path(path: Path) -> None:
    """Remove a file, link or folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# (temporary, target) pairs written inside all_or_nothing(), put in place at its end; None outside it.
_staged: list[tuple[Path, Path]] | None = None


def _put_in_place(tmp: Path, target: Path) -> None:
    if _staged is not None:
        if (tmp, target) not in _staged:  # the same output written twice: one temporary file
            _staged.append((tmp, target))
        return
    if target.is_dir() and not target.is_symlink():
        remove_path(target)
    os.replace(tmp, target)


@contextlib.contextmanager
def all_or_nothing() -> Iterator[None]:
    """Outputs written inside the block (write_text, write_json, atomic_dir) are put in place
    together at its end, with SIGTERM and SIGINT held off meanwhile; if the block fails, none is.
    A stage's outputs (a model and its reports) so never mix two runs."""
    global _staged
    outer, _staged = _staged, []
    staged = _staged
    try:
        yield
    except BaseException:
        for tmp, _ in staged:
            remove_path(tmp)
        raise
    finally:
        _staged = outer
    with _signals_deferred():
        for tmp, target in staged:
            _put_in_place(tmp, target)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT off while the block runs, then deliver one that came to the handler
    in place before. Python runs signal handlers in the main thread whichever thread the kernel
    picked (torch's worker threads among them), so a thread's signal mask could not hold them off."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if pending:
        signal.raise_signal(pending[0])


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `target`, on failure it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_tmp([target.parent])
    tmp = _tmp_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        remove_path(tmp)
        raise
    _put_in_place(tmp, target)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        tmp.write_bytes(data)
        _put_in_place(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def dumps_jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file of objects; a bad line fails with `file:line: reason`."""
    return [row for _, row in iter_jsonl(path)]


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; a bad line fails with `file:line: reason`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                # utf-8-sig on the first line: editors that save "UTF-8 with BOM" prepend U+FEFF.
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise PipelineError(f"{path}:{number}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PipelineError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise PipelineError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: invalid JSON ({exc})") from None
