"""Files that survive crashes: atomic writes, append-only logs, one writer per output, checks.

- `atomic_write`: readers see the old file or the new one, never half of one.
- Append-only JSONL logs (hinted decoding's records, train.py's metrics) are written one line
  at a time and flushed, so a crash leaves at most one torn last line, which a resume drops
  (`read_log`, `drop_torn_tail`) and redoes.
- `OutputLock`: one run per output at a time (fcntl.flock; released by the OS however the
  process ends).
- `check_input` / `check_output`: the files named on a command line exist, or can be written,
  before any model is loaded; `changed_settings` names what differs from a run's saved settings.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path

from plumbing.cli import UserError


def atomic_write(path, content) -> None:
    """Write `content` to `path` through a temp file in the same directory and os.replace.
    `content` is text, or a function that writes the file at the temporary path it is given
    (safetensors, PNG, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same dir: os.replace stays atomic
    try:
        if callable(content):
            content(str(tmp))
        else:
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.write(content)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_marked_block(path, name: str, text: str) -> None:
    """Rewrite the generated part of a hand-written file (README.md): everything between the
    lines `<!-- name:begin -->` and `<!-- name:end -->` becomes `text`; the rest is kept."""
    path = Path(path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = path.read_text(encoding="utf-8")
    if old.count(begin) != 1 or old.count(end) != 1 or old.index(begin) > old.index(end):
        raise UserError(f"{path}: expected one '{begin}' line followed by one '{end}' line")
    head, rest = old.split(begin, 1)
    atomic_write(path, head + begin + "\n" + text.strip("\n") + "\n" + end + rest.split(end, 1)[1])


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---- Append-only JSONL logs ----------------------------------------------------------------


def read_log(path, writer: str) -> tuple[list[dict], int]:
    """The complete records of an append-only JSONL file, each with its 1-based line number under
    "_line", and the byte length up to the end of the last complete line.

    A last line without its newline is what a crash in the middle of a write leaves: it is not a
    record (`drop_torn_tail` cuts it off before appending). Any other line that is not a JSON
    object is an error naming the file and line; `writer` names the program that writes the file.
    """
    path = Path(path)
    if not path.exists():
        return [], 0
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    records = []
    for lineno, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{lineno}: not a JSON record (was this file written by {writer}?)")
        records.append({**record, "_line": lineno})
    return records, end


def drop_torn_tail(path, end: int) -> None:
    """Cut a torn last line (bytes past `end`, from read_log) off before appending, saying so."""
    path = Path(path)
    if path.exists() and path.stat().st_size > end:
        print(f"{path}: dropping an incomplete last line ({path.stat().st_size - end} bytes) "
              "left by an interrupted run", file=sys.stderr)
        os.truncate(path, end)


def append_record(f, record: dict) -> None:
    """One record per line, flushed at once: an interruption loses at most the line being written."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()


# ---- Inputs and outputs named on a command line ---------------------------------------------


def check_input(path, flag: str | None = None) -> Path:
    """An input file that exists and is a file; the error names the flag when one is given."""
    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    if path.is_dir():
        raise UserError(f"{where}: is a directory; expected a JSONL file")
    if not path.is_file():
        raise UserError(f"{where}: file not found")
    return path


def check_output(path, flag: str, kind: str = "file") -> Path:
    """Refuse an output path that cannot be written as `kind` ("file" or "dir"): checked before
    any model is loaded, so a wrong --out fails in a second, not after the compute."""
    path = Path(path)
    if path.exists():
        if kind == "file" and path.is_dir():
            raise UserError(f"{flag} {path}: is a directory; expected a file")
        if kind == "dir" and not path.is_dir():
            raise UserError(f"{flag} {path}: is a file; expected a directory")
    parent = path if kind == "dir" and path.exists() else path.parent
    while not parent.exists():  # the first existing ancestor must be a writable directory
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {parent} is not writable")
    return path


def changed_settings(saved: dict, current: dict) -> list[str]:
    """'--flag: was A, now B' for every setting of `current` that differs from `saved`."""
    return [f"--{key.replace('_', '-')}: was {saved.get(key)!r}, now {value!r}"
            for key, value in current.items() if saved.get(key) != value]


# ---- One writer per output ------------------------------------------------------------------


class OutputLock:
    """One writer per output: an advisory lock (fcntl.flock) on the hidden file .NAME.lock next to
    `path`, held while the `with` block runs; a second run on the same output stops at once. The
    OS releases the lock when the process ends, however it ends, so a crash leaves no stale lock
    (at most a lock file that the next run takes over). The file is removed on exit; a run that
    locked a file which was removed meanwhile sees it is no longer the one at that path."""

    def __init__(self, path):
        self.path = Path(path)
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        self.file = None

    def __enter__(self):
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.lock_path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not self.lock_path.exists() or self.lock_path.stat().st_ino != os.fstat(f.fileno()).st_ino:
                raise BlockingIOError  # the holder removed it as we opened it; a new one may be held
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise UserError(f"{self.path} is in use by another run (pid {holder}); wait for it to finish "
                            "or choose another output") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self.file = f
        return self

    def __exit__(self, *exc):
        self.lock_path.unlink(missing_ok=True)  # while still held, so no one holds a removed file
        self.file.close()  # closing the file releases the lock


def lock_output(path):
    """OutputLock(path), taken by the process of rank 0 only under torchrun: the ranks of one run
    are one writer (the others write nothing there, or only through rank 0's run)."""
    return OutputLock(path) if int(os.environ.get("RANK", 0)) == 0 else contextlib.nullcontext()
