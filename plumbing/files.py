"""Files that survive crashes: atomic writes, append-only logs, one writer per output, checks.

- `atomic_write`: readers see the old file or the new one, never half of one; a failed write (a
  full disk) leaves the old file and no temporary.
- Append-only JSONL logs (hinted decoding's records, train.py's metrics) are written one line
  at a time and flushed, so a crash leaves at most one torn last line, which a resume drops
  (`read_log`, `drop_torn_tail`) and redoes.
- `OutputLock`: one run per real output at a time (fcntl.flock on the output's resolved path;
  released by the OS however the process ends). Every write through this module first checks
  that the process still holds its locks (`check_locks`): a lock file deleted under a running
  job stops that job before its next write.
- Before any model is loaded: `check_input`, the inputs exist; `check_output`, each output can be
  written, known by its real path; `check_disjoint`, no output is an input, lies inside an input
  directory or holds an input; `check_replaceable`, no existing file that the command did not
  write itself is overwritten. `changed_settings` names what differs from a run's saved settings;
  `read_json` reads a JSON file or names it in a one-line error.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path

from plumbing.cli import RunError, UserError


def atomic_write(path, content) -> None:
    """Write `content` to `path` through a temp file in the same directory and os.replace.
    `content` is text, or a function that writes the file at the temporary path it is given
    (safetensors, PNG, ...)."""
    path = Path(path)
    check_locks()
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


def json_problem(error: Exception) -> str:
    """Why json.loads failed, in a few words: a syntax error, bytes that are not UTF-8, nesting
    deeper than Python's recursion limit, an integer longer than Python converts (4300 digits)."""
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at line {error.lineno} column {error.colno}"
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8: {error.reason} at byte {error.start}"
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error).split(":")[0]


def read_json(path) -> dict:
    """The JSON object in `path`, or a one-line UserError naming the file (not JSON, not an object)."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path}: not valid JSON ({json_problem(e)})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, got a JSON {type(value).__name__}")
    return value


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
        except (ValueError, RecursionError):  # not JSON, not UTF-8, too deep, an endless integer
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
    check_locks()
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
    """The real path of an output (symlinks and '..' resolved: every spelling of one output is
    one output), refused if it cannot be written as `kind` ("file" or "dir") or is a symbolic
    link to nothing: checked before any model is loaded, so a wrong --out fails in a second, not
    after the compute."""
    given = Path(path)
    if given.is_symlink() and not given.exists():
        raise UserError(f"{flag} {given}: a symbolic link to {os.readlink(given)}, which does not exist")
    path = given.resolve()
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


def check_disjoint(outputs: list[tuple[str, Path]], inputs: list[tuple[str, Path | None]]) -> None:
    """Refuse an output that would overwrite an input, before any work. `outputs`: (flag, path)
    of everything a command writes, files and the directories whose contents it replaces or
    deletes; `inputs`: (flag, path) of the files and directories it reads (None, or a name that is
    no path on disk such as a hub id: skipped). Compared by real path (symlinks and '..'
    resolved, hard links by inode), an output may not be an input, lie inside an input
    directory, or be a directory that holds an input."""
    for in_flag, given in inputs:
        source = None if given is None else Path(given).resolve()
        if source is None or not source.exists():  # not given, or not a path (a hub id)
            continue
        for out_flag, out in outputs:
            target = Path(out).resolve()
            if target == source or target.exists() and source.exists() and os.path.samefile(target, source):
                problem = f"would overwrite {in_flag} itself ({given})"
            elif source in target.parents:
                problem = f"lies inside {in_flag} {given}"
            elif target in source.parents:
                problem = f"holds {in_flag} {given}, which it would overwrite or delete"
            else:
                continue
            raise UserError(f"{out_flag}: {target} {problem}; choose another {out_flag}")


def written_by(path, keys) -> bool:
    """Does the JSON file (a .jsonl file: its first line) at `path` hold an object with all of
    `keys`, the marker of the program that writes it?"""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            record = json.loads(f.readline() if path.suffix == ".jsonl" else f.read())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(record, dict) and all(key in record for key in keys)


def check_replaceable(path, flag: str, writer: str, ours) -> None:
    """A command overwrites its own earlier outputs and nothing else: refuse an existing file at
    `path` for which ours(path) is False."""
    path = Path(path)
    if path.exists() and not ours(path):
        raise UserError(f"{flag}: {path} exists and was not written by {writer}; move it away or choose another {flag}")


def changed_settings(saved: dict, current: dict) -> list[str]:
    """'--flag: was A, now B' for every setting of `current` that differs from `saved`."""
    return [f"--{key.replace('_', '-')}: was {saved.get(key)!r}, now {value!r}"
            for key, value in current.items() if saved.get(key) != value]


# ---- One writer per output ------------------------------------------------------------------


_held: list["OutputLock"] = []  # the locks this process holds: checked before every write


def check_locks() -> None:
    """Before a write: stop (RunError, exit 1) if a lock this process holds was deleted or
    replaced, since another run may now hold the output: one writer per output."""
    for lock in _held:
        if lock.lost():
            raise RunError(f"{lock.path}: its lock file {lock.lock_path} was deleted or replaced while this run held "
                           "it, so another run may be writing there; stopping before the next write (what was "
                           "written so far is kept)")


def lock_path(path, kind: str = "file") -> Path:
    """The lock file of an output: .NAME.lock beside a file, RUN/.run.lock inside a directory."""
    path = Path(path).resolve()
    return path / ".run.lock" if kind == "dir" else path.with_name(f".{path.name}.lock")


class OutputLock:
    """One writer per output: an advisory lock (fcntl.flock) on a lock file of the output's real
    path, .NAME.lock beside a file or RUN/.run.lock inside a directory (kind "dir"), held while
    the `with` block runs; a second run on the same output, under any spelling, stops at once.
    The OS releases the lock when the process ends, however it ends, so a crash leaves no stale
    lock (at most a lock file that the next run takes over). Deleting the lock file of a running
    job lets a second one in: the first sees it before its next write (`check_locks`) and stops."""

    def __init__(self, path, kind: str = "file"):
        self.path = Path(path).resolve()
        self.lock_path = lock_path(self.path, kind)
        # the directories that taking the lock creates: removed on exit if nothing was written there
        self.made = [d for d in (self.lock_path.parent, *self.lock_path.parent.parents) if not d.exists()]
        self.file = None

    def __enter__(self):
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.lock_path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if self.lost(f):
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
        _held.append(self)
        return self

    def lost(self, f=None) -> bool:
        """Is the file at lock_path no longer the one this process locked (deleted, or replaced)?"""
        held = os.fstat((f or self.file).fileno())
        try:
            now = os.stat(self.lock_path)
        except FileNotFoundError:
            return True
        return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)

    def __exit__(self, *exc):
        _held.remove(self)
        if not self.lost():  # never remove a lock file that another run holds now
            self.lock_path.unlink(missing_ok=True)  # while still held, so no one holds a removed file
        self.file.close()  # closing the file releases the lock
        for d in self.made:  # deepest first; os.rmdir refuses a directory that is not empty
            with contextlib.suppress(OSError):
                d.rmdir()


def lock_output(path, kind: str = "file"):
    """OutputLock(path, kind), taken by the process of rank 0 only under torchrun: the ranks of
    one run are one writer (the others write nothing there, or only through rank 0's run)."""
    return OutputLock(path, kind) if int(os.environ.get("RANK", 0)) == 0 else contextlib.nullcontext()
