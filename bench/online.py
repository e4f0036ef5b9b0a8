"""What being online costs: an online step's generation against the offline pipeline, per problem.

    offline pipeline  python hinted_decode.py --data D --out O       the rewriting done once, up front:
                      seconds per problem (its own clock, after loading)
    online            python train.py --data D --online               each step rewrites its problems with
                      the current weights (gen_seconds in metrics.jsonl), then trains (train_seconds)

Same model, problems, decoding (greedy, β_mix 3, --max-new-tokens), batch of 8 problems decoded
together, one process with one thread (bench/common.py). Both sides run the same rule
(hinted_decode.rewrite_batch), so their seconds per problem should agree; what the online mode adds
is that generation every step: the step costs (generation + training) / training times an offline
step on data of the same size.

    python bench/online.py                 # bundled SmolLM2-135M, 16 gsm_symbolic problems, 2 steps of 8
    python bench/online.py --problems 4    # a quicker look
Writes bench/results/online-cpu.json.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, gsm_examples, model_dir, new_report, write_report


def run(script: str, flags: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / script), *flags], env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"failed: {script} {' '.join(flags)}")
    return proc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=16, help="problems: the pipeline's, and 2 online steps' worth")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args(argv)
    batch = args.problems // 2
    with tempfile.TemporaryDirectory() as scratch:
        path, name = model_dir(False, Path(scratch))  # a real model: a random one never verifies an answer
        data = Path(scratch) / "problems.jsonl"
        data.write_text("".join(json.dumps({"id": ex.id, "question": ex.prompt[-1]["content"], "answer": ex.response})
                                + "\n" for ex in gsm_examples(args.problems)))
        common = ["--model", str(path), "--data", str(data)]
        offline = run("hinted_decode.py", [*common, "--out", str(Path(scratch) / "hd.jsonl"), "--max-new-tokens",
                                           str(args.max_new_tokens), "--batch-size", str(batch), "--quiet"])
        n, seconds = map(float, re.search(r"(\d+) examples in ([\d.]+) s", offline.stdout).groups())
        run("train.py", [*common, "--out", str(Path(scratch) / "run"), "--online", "--max-steps", "2",
                         "--batch-size", str(batch), "--micro-batch-size", str(batch), "--online-batch-size",
                         str(batch), "--online-max-new-tokens", str(args.max_new_tokens)])
        steps = [json.loads(line) for line in (Path(scratch) / "run" / "metrics.jsonl").read_text().splitlines()]
    gen = [s["gen_seconds"] / batch for s in steps]
    train = [s.get("train_seconds") for s in steps]  # None: nothing verified, no update
    trained = [t for t in train if t is not None]
    results = {
        "offline_pipeline": {"problems": int(n), "seconds": seconds, "seconds_per_problem": seconds / n},
        "online": {"steps": len(steps), "problems_per_step": batch, "gen_seconds_per_problem": gen,
                   "train_seconds_per_step": train,
                   "trained_per_step": [s["online_trained"] for s in steps]},
    }
    ratios = {"online_generation_over_offline_pipeline": (sum(gen) / len(gen)) / (seconds / n)}
    if trained:
        ratios["online_step_over_training_alone"] = ((sum(s["gen_seconds"] for s in steps) / len(steps))
                                                     + sum(trained) / len(trained)) / (sum(trained) / len(trained))
    print(f"offline pipeline {seconds / n:.2f} s per problem; online generation "
          f"{', '.join(f'{g:.2f}' for g in gen)} s per problem (steps 1, 2): "
          f"{ratios['online_generation_over_offline_pipeline']:.2f}x"
          + (f"; an online step takes {ratios['online_step_over_training_alone']:.1f}x its training alone"
             if trained else "; no step trained (nothing verified)"))
    report = new_report("cpu", {"model": name, "problems": args.problems,
                                "batch": batch, "max_new_tokens": args.max_new_tokens,
                                "decoding": "greedy, pipeline defaults (beta_mix 3, linear), one thread"})
    report.update(results=results, ratios=ratios)
    write_report("online", "cpu", False, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
