"""train.py's RUN/metrics.jsonl: one JSON line per logged step (and per evaluation), appended.

A kill can leave a torn last line; a resume drops it, and the lines of steps the restored
weights have not seen, so the log always describes the weights on disk.
"""

import json
from pathlib import Path

from plumbing.files import append_record, atomic_write, drop_torn_tail, read_log

KEYS = ("loss", "eval_loss", "lr", "grad_norm", "lambda", "phi_mean", "entropy_mean", "gamma_mean", "tokens_per_s")


def read_metrics(out: Path) -> list[dict]:
    """The complete lines of RUN/metrics.jsonl (a torn last line, left by a kill, is not one)."""
    records, _ = read_log(out / "metrics.jsonl", "train.py")
    return [{k: v for k, v in r.items() if k != "_line"} for r in records]


def append_metrics(out: Path, record: dict):
    with open(out / "metrics.jsonl", "a") as f:
        append_record(f, record)


def keep_metrics_until(out: Path, step: int):
    """After a resume, drop a torn last line and the lines of steps the restored weights have not seen."""
    path = out / "metrics.jsonl"
    drop_torn_tail(path, read_log(path, "train.py")[1])
    kept = [r for r in read_metrics(out) if r["step"] <= step]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))


def curves(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of the logged quantities; eval rows are lines of their own."""
    series = {key: [(r["step"], r[key]) for r in rows if key in r] for key in KEYS}
    return {key: points for key, points in series.items() if points}
