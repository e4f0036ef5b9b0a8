"""train.py's run logs: RUN/metrics.jsonl (one JSON line per logged step, and per evaluation) and,
with --online, RUN/online.jsonl (one line per problem per step: what was generated and kept).

Lines are appended one at a time. A kill can leave a torn last line; a resume drops it, and the
lines of steps the restored weights have not seen (`keep_until`), so the logs always describe
the weights on disk, and the steps that follow are logged again exactly as they were.
"""

import json
from pathlib import Path

from plumbing.files import append_record, atomic_write, drop_torn_tail, read_log

KEYS = ("loss", "eval_loss", "lr", "grad_norm", "lambda", "phi_mean", "entropy_mean", "gamma_mean", "tokens_per_s",
        "online_trained", "online_phi_mean")
ONLINE_SOURCES = ("own", "hinted", "reference", "dropped")  # the online yield, one curve each


def read_metrics(out: Path) -> list[dict]:
    """The complete lines of RUN/metrics.jsonl (a torn last line, left by a kill, is not one)."""
    return read_lines(out / "metrics.jsonl")


def read_lines(path: Path) -> list[dict]:
    records, _ = read_log(path, "train.py")
    return [{k: v for k, v in r.items() if k != "_line"} for r in records]


def append_metrics(out: Path, record: dict):
    append_records(out / "metrics.jsonl", [record])


def append_records(path: Path, records: list[dict]):
    with open(path, "a", encoding="utf-8", newline="\n") as f:
        for record in records:
            append_record(f, record)


def keep_until(path: Path, step: int):
    """After a resume, drop a torn last line and the lines of steps the restored weights have not seen."""
    if not path.exists():
        return
    drop_torn_tail(path, read_log(path, "train.py")[1])
    kept = [r for r in read_lines(path) if r["step"] <= step]
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))


def curves(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of the logged quantities; eval rows are lines of their own. The online
    yield is one panel: {"online yield": [(source, [(step, count), ...]), ...]}."""
    series = {key: [(r["step"], r[key]) for r in rows if r.get(key) is not None] for key in KEYS}
    panels = {key: points for key, points in series.items() if points}
    online = [(s, [(r["step"], r[f"online_{s}"]) for r in rows if f"online_{s}" in r]) for s in ONLINE_SOURCES]
    if any(points for _, points in online):
        panels["online yield (problems per step)"] = online
    return panels
