"""Examples -> records: sharded over ranks, appended as they are made, resumable, merged in order.

`map_sharded(items, work, ranks, batch_size)` is the one loop of the example-parallel tools
(hinted_decode.py, eval.py, ddt.py): this rank runs `work` on its share of the items
(ranks.shard), batch by batch, and every rank gets all results back in input order.

`RecordLog` is the resumable output of hinted_decode.py: records go to OUT.jsonl (and, for
records that `is_side` picks, OUT.<side>.jsonl) one line at a time, flushed; under torchrun
rank r appends to OUT.part-r-of-N.jsonl instead. A rerun with any number of processes skips
every example found in any of these files, after checking that each record was made from the
example as it is now in --data; the settings that shape the records are stored in
OUT.settings.json once the model has loaded, before the first record, and an OUT is only
extended with the same ones (a settings file of ours that describes no record yet is replaced).
`merge` rewrites every record into the final files in input order and removes the parts;
`extend` does all of it for a pipeline.
"""

import glob
import json
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from plumbing.cli import UserError
from plumbing.files import append_record, atomic_write, changed_settings, drop_torn_tail, read_log
from plumbing.ranks import every_rank, gather_in_order, print_shares, shard


def map_sharded(items: list, work, ranks, batch_size: int, desc: str | None = None, unit: str = "ex") -> list:
    """work(batch) -> one result per item of the batch, run on this rank's share of `items` in
    batches of `batch_size`; every rank's results, in input order, on every rank. `desc`: show a
    progress bar (rank 0's share)."""
    mine = shard(items, ranks, batch_size)
    results = []
    with tqdm(total=len(mine), desc=desc, unit=unit, disable=desc is None, file=sys.stderr) as bar:
        for i in range(0, len(mine), batch_size):
            results += work(mine[i:i + batch_size])
            bar.update(min(batch_size, len(mine) - i))
    print_shares(len(mine), ranks)
    return gather_in_order(results, ranks, batch_size)


class RecordLog:
    """The files of one resumable output OUT.jsonl (see the module docstring). `writer` names the
    program in messages; records for which is_side(record) holds go to OUT.<side>.jsonl."""

    def __init__(self, out, writer: str, side: str, is_side):
        self.out, self.writer, self.side, self.is_side = Path(out), writer, side, is_side

    def side_path(self) -> Path:
        return self.out.with_name(f"{self.out.stem}.{self.side}{self.out.suffix or '.jsonl'}")

    def settings_path(self) -> Path:
        return self.out.with_name(self.out.stem + ".settings.json")

    def part_path(self, ranks) -> Path:
        """Where rank r of a W-process run appends its records, main and side: OUT.part-r-of-W.jsonl."""
        return self.out.with_name(f"{self.out.stem}.part-{ranks.rank}-of-{ranks.world}{self.out.suffix or '.jsonl'}")

    def files(self) -> list[Path]:
        """Every file that may hold records: OUT.jsonl, its side file and the part files of
        unfinished multi-process runs, of any number of processes."""
        out = self.out
        part = re.compile(rf"{re.escape(out.stem)}\.part-\d+-of-\d+{re.escape(out.suffix or '.jsonl')}")
        parts = sorted(p for p in out.parent.glob(glob.escape(out.stem) + ".part-*") if part.fullmatch(p.name))
        return [out, self.side_path(), *parts]

    def written_files(self) -> list[Path]:
        """Every file a run on this output writes, or deletes: the inputs may not be among them."""
        return [*self.files(), self.settings_path()]

    # ---- Settings ---------------------------------------------------------------------------

    def check_settings(self, settings: dict, has_records: bool):
        """Refuse to extend an output made with other settings (or with unknown ones), and a
        settings file that another program wrote. Ours without records (a run stopped before
        its first one) binds nothing: the new settings replace it."""
        path = self.settings_path()
        if not path.exists():
            if has_records:
                raise UserError(f"--out {self.out}: holds records but no {path.name}, so the settings they were "
                                "made with are unknown; choose another --out")
            return
        try:
            saved = json.loads(path.read_bytes())["settings"]
        except (ValueError, RecursionError, KeyError, TypeError):  # not JSON, or not ours
            saved = None
        if not isinstance(saved, dict):
            raise UserError(f"{path}: not written by {self.writer} (no 'settings'); choose another --out")
        changed = changed_settings(saved, settings)
        if changed and has_records:
            raise UserError(f"--out {self.out} was made with other settings: {'; '.join(changed)}; rerun with "
                            "those or choose another --out")

    def write_settings(self, settings: dict):
        atomic_write(self.settings_path(), json.dumps({"settings": settings}, indent=1) + "\n")

    # ---- Records ----------------------------------------------------------------------------

    def done(self, examples: list, same) -> dict[str, dict]:
        """The records already written, by example id. same(example, record) says whether the
        record was made from the example as it is now; files written by another program, from
        another --data or from an edited one are refused."""
        by_id = {ex.id: ex for ex in examples}
        done = {}
        for path in self.files():
            for rec in read_log(path, self.writer)[0]:
                where = f"{path}:{rec.pop('_line')}"
                if "id" not in rec or "prompt" not in rec:
                    raise UserError(f"{where}: not a {self.writer} record (no 'id' or 'prompt' field)")
                ex = by_id.get(str(rec["id"]))
                if ex is None or not same(ex, rec):
                    raise UserError(f"{where}: record {rec['id']!r} is not an example of --data {examples[0].source} "
                                    "as it is now (written from another file, or an edited one?); choose another --out")
                if ex.id in done and done[ex.id] != rec:  # an identical copy: a merge was interrupted
                    raise UserError(f"{where}: example {ex.id!r} is recorded twice; choose another --out")
                done[ex.id] = rec
        return done

    @contextmanager
    def appending(self, ranks):
        """append(record): one flushed line in this process's file(s); a torn last line left by a
        crash is cut off first (its example is simply done again)."""
        main, side = (self.out, self.side_path()) if ranks.world == 1 else (self.part_path(ranks),) * 2
        for path in {main, side}:
            drop_torn_tail(path, read_log(path, self.writer)[1])
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with open(main, "a", encoding="utf-8", newline="\n") as f_main, \
                open(side, "a", encoding="utf-8", newline="\n") as f_side:
            yield lambda record: append_record(f_side if self.is_side(record) else f_main, record)

    def merge(self, examples: list, same) -> list[dict]:
        """Once every process has finished: all records of all files, one per example in input
        order, rewritten into OUT.jsonl and its side file, the part files removed. So the final
        files do not depend on the number of processes, on batches or on interruptions."""
        files = self.files()
        order = {ex.id: i for i, ex in enumerate(examples)}
        records = sorted(self.done(examples, same).values(), key=lambda r: order[str(r["id"])])

        def write(tmp, side: bool):
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                for r in records:
                    if bool(self.is_side(r)) == side:
                        append_record(f, r)

        atomic_write(self.out, lambda tmp: write(tmp, side=False))
        atomic_write(self.side_path(), lambda tmp: write(tmp, side=True))
        for part in files[2:]:
            part.unlink()
        return records

    # ---- A whole resumable pipeline -----------------------------------------------------------

    def extend(self, examples: list, every_example: list, same, settings: dict, ranks, batch_size: int, start_work,
               desc: str | None = None):
        """Record every example of `examples` not yet recorded: start_work() -> work (called only
        when there is work to do: it loads the model), then work(batch, write) on this rank's
        share, where write(record) appends a record the moment it is made. Returns (every record
        in input order on rank 0, None on the others; examples run; seconds), or None when
        interrupted (the records written so far are kept, and a rerun continues)."""
        done = self.done(every_example, same)
        self.check_settings(settings, has_records=bool(done))
        todo = [ex for ex in examples if ex.id not in done]
        print(f"{len(examples)} examples, {len(examples) - len(todo)} already in {self.out}, {len(todo)} to do",
              file=sys.stderr)
        seconds = 0.0
        if todo:
            work = start_work()  # the model loads, and is checked, before anything is written
            if ranks.main:
                self.write_settings(settings)
            every_rank(None, ranks)  # the settings are on disk before the first record of any rank
            start, written = time.perf_counter(), []
            with self.appending(ranks) as append:
                def write(record):
                    append(record)
                    written.append(record)

                try:
                    map_sharded(todo, lambda batch: work(batch, write), ranks, batch_size, desc=desc)
                except KeyboardInterrupt:
                    where = self.out if ranks.world == 1 else self.part_path(ranks)
                    print(f"\ninterrupted: {len(written)} new records kept in {where}; rerun the same command to "
                          "continue", file=sys.stderr)
                    return None
            seconds = time.perf_counter() - start
        return (self.merge(every_example, same) if ranks.main else None), len(todo), seconds
