"""Examples/s of the hinted-decoding pipeline under torchrun: 2 processes against 1.

    1 process x 1 thread     python hinted_decode.py --data D --out O ...    (OMP_NUM_THREADS=1)
    2 processes x 1 thread   torchrun --nproc_per_node 2 hinted_decode.py ... (each OMP_NUM_THREADS=1)

The whole command is timed (start-up, model loading, the merge of the part files included),
and the pipeline's own clock too (the "N examples in S s" line: decoding, scoring and writing,
after the model is loaded). Same problems, same flags, greedy; the final files of the 1 x 1
and 2 x 1 runs must be identical byte for byte (checked: same threads per process, so the
same float rounding). One process with 2 threads is not a fair third line on this shared
2-core machine: a neighbour's busy process stalls every OpenMP barrier (bench/common.py); a
trial run of 4 problems x 8 tokens took 234 s that way against 14 s with one thread.

    python bench/data_parallel.py     # bundled SmolLM2-135M, 16 gsm_symbolic problems, 128 new tokens
Writes bench/results/data_parallel-cpu.json.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, gsm_examples, new_report, write_report

MODES = {  # name: (processes, threads per process)
    "1 process x 1 thread": (1, 1),
    "2 processes x 1 thread": (2, 1),
}


def write_problems(n: int, path: Path) -> None:
    rows = [{"id": ex.id, "question": ex.prompt[-1]["content"], "answer": ex.response} for ex in gsm_examples(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_pipeline(processes: int, threads: int, flags: list[str], out: Path) -> dict:
    """Run the pipeline once; its wall seconds, its own seconds, and its final files."""
    script = [str(ROOT / "hinted_decode.py"), *flags, "--out", str(out)]
    cmd = ([sys.executable, *script] if processes == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *script])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    n, seconds = re.search(r"(\d+) examples in ([\d.]+) s", proc.stdout).groups()
    shares = re.search(r"processes did ([\d + ]+) examples", proc.stderr)
    return {"processes": processes, "threads_per_process": threads, "wall_seconds": wall,
            "pipeline_seconds": float(seconds), "examples": int(n), "examples_per_s_wall": int(n) / wall,
            "examples_per_s_pipeline": int(n) / float(seconds),
            "examples_per_process": [int(k) for k in shares.group(1).split(" + ")] if shares else [int(n)],
            "files": (out.read_bytes(), out.with_name(out.stem + ".failed.jsonl").read_bytes())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8, help="examples decoded together per process")
    args = ap.parse_args(argv)
    report = new_report("cpu", {"model": "SmolLM2-135M-Instruct (bundled GGUF, dequantized), float32",
                                "problems": args.problems, "max_new_tokens": args.max_new_tokens,
                                "batch_size": args.batch_size, "decoding": "greedy, pipeline defaults (beta 3, linear)"})
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "problems.jsonl"
        write_problems(args.problems, data)
        flags = ["--data", str(data), "--max-new-tokens", str(args.max_new_tokens), "--batch-size",
                 str(args.batch_size), "--device", "cpu", "--quiet"]
        for i, (name, (processes, threads)) in enumerate(MODES.items()):
            results[name] = run_pipeline(processes, threads, flags, Path(scratch) / f"out{i}.jsonl")
            r = results[name]
            print(f"{name:24s} wall {r['wall_seconds']:7.1f} s  {r['examples_per_s_wall']:.3f} examples/s   "
                  f"pipeline {r['pipeline_seconds']:7.1f} s  {r['examples_per_s_pipeline']:.3f} examples/s   "
                  f"per process {r['examples_per_process']}", flush=True)
    files = {name: r.pop("files") for name, r in results.items()}
    identical = files["2 processes x 1 thread"] == files["1 process x 1 thread"]
    base = results["1 process x 1 thread"]
    speedup = {name: {"wall": r["examples_per_s_wall"] / base["examples_per_s_wall"],
                      "pipeline": r["examples_per_s_pipeline"] / base["examples_per_s_pipeline"]}
               for name, r in results.items()}
    print(f"2 processes vs 1: {speedup['2 processes x 1 thread']['pipeline']:.2f}x (pipeline), "
          f"{speedup['2 processes x 1 thread']['wall']:.2f}x (wall); final files identical: {identical}")
    report.update(results=results, speedup_over_one_process=speedup, files_identical_1_vs_2_processes=identical)
    write_report("data_parallel", "cpu", False, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
