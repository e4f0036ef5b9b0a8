"""hinted_decode.py, eval.py and ddt.py under `torchrun --nproc_per_node 2` (CPU, gloo, tiny
models) against one process: the same files record for record, each process about half the
work, one voice, and an interrupted 2-process pipeline that resumes to the same files."""

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_model, write_tiny_tokenizer

import ddt
import eval as evaluate
import hinted_decode
from plumbing.ranks import Ranks, gather_in_order, shard

torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1): float sums reduce in the same order
ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [(f"q{i}", f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?",
              f"{i} + {i + 2} = {2 * i + 2}\n#### {2 * i + 2}") for i in range(1, 8)]  # 7: shares of 4 and 3


def torchrun(script, *args, nproc=2, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / script), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def shares(stderr):
    """The per-process example counts rank 0 reports, one pair per data-parallel step."""
    return [[int(a), int(b)] for a, b in re.findall(r"data parallel: 2 processes did (\d+) \+ (\d+) examples", stderr)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp_model")
    write_tiny_model(out, write_tiny_tokenizer(out), tie_word_embeddings=False)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("dp_data") / "d.jsonl"
    path.write_text("".join(json.dumps({"id": i, "question": q, "answer": a}) + "\n" for i, q, a in QUESTIONS))
    return path


def test_shard_takes_every_world_th_batch_and_gather_restores_the_order(monkeypatch):
    from plumbing import ranks as ranks_module

    for n, world, batch_size in itertools.product(range(12), (1, 2, 3, 5), (1, 2, 4)):
        items = list(range(n))
        parts = [shard(items, Ranks(r, world), batch_size) for r in range(world)]
        assert sorted(sum(parts, [])) == items
        for r, part in enumerate(parts):
            assert all(i // batch_size % world == r for i in part)
        monkeypatch.setattr(ranks_module, "every_rank", lambda value, ranks: parts)  # what all_gather_object returns
        assert gather_in_order(parts[0], Ranks(0, world), batch_size) == items


# ---- hinted_decode.py ---------------------------------------------------------------------------

def pipeline_args(model_dir, data, out, *extra):
    # sampling, so that the per-example seeds are what makes the runs agree
    return ["--data", data, "--out", out, "--model", model_dir, "--max-new-tokens", "8", "--batch-size", "2",
            "--temperature", "1.0", "--top-p", "0.9", "--seed", "3", "--quiet", *map(str, extra)]


def outputs(out):
    return out.read_bytes(), hinted_decode.record_log(out).side_path().read_bytes()


@pytest.fixture(scope="module")
def one_process(model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out.jsonl"
    assert hinted_decode.main(list(map(str, pipeline_args(model_dir, data, out)))) == 0
    return outputs(out)


def test_pipeline_two_processes_equal_one(model_dir, data, tmp_path, one_process):
    out = tmp_path / "out.jsonl"
    proc = torchrun("hinted_decode.py", *pipeline_args(model_dir, data, out))
    assert outputs(out) == one_process
    kept, failed = (b.decode().splitlines() for b in one_process)
    ids = [json.loads(line)["id"] for line in kept + failed]
    assert sorted(ids) == [q[0] for q in QUESTIONS] and len(kept + failed) == 7
    assert shares(proc.stderr) == [[4, 3]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.failed.jsonl", "out.jsonl", "out.settings.json"]  # no parts left
    assert proc.stdout.count("sources:") == 1 and proc.stdout.count("wrote") == 1  # only rank 0 talks


def test_interrupted_two_process_pipeline_resumes_to_the_same_files(model_dir, data, tmp_path, one_process):
    """Kill a 2-process run once its part files hold some records, then resume it twice from
    copies of what it left: with 2 processes, and with 1 (the split of another world size)."""
    out = tmp_path / "run" / "out.jsonl"
    out.parent.mkdir()
    # batch 1 and long outputs: a slow run, so the kill lands mid-way
    slow = pipeline_args(model_dir, data, out, "--batch-size", "1", "--max-new-tokens", "150")
    proc = torchrun("hinted_decode.py", *slow, wait=False)
    parts = [out.with_name(f"out.part-{r}-of-2.jsonl") for r in (0, 1)]
    deadline = time.time() + 240
    while sum(p.read_text().count("\n") for p in parts if p.exists()) < 2 and proc.poll() is None:
        assert time.time() < deadline, "no records appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun stops both workers at once, mid-write if it happens
    proc.communicate(timeout=60)
    written = sum(p.read_text().count("\n") for p in parts if p.exists())
    assert 2 <= written < 7 and not out.exists(), "the kill should land mid-way"
    shutil.copytree(out.parent, tmp_path / "copy")

    full = pipeline_args(model_dir, data, out, "--batch-size", "1", "--max-new-tokens", "150")
    proc = torchrun("hinted_decode.py", *full)
    assert sum(shares(proc.stderr)[0]) == 7 - written  # only what was missing was done
    single = pipeline_args(model_dir, data, tmp_path / "copy" / "out.jsonl", "--batch-size", "1",
                           "--max-new-tokens", "150")
    assert hinted_decode.main(list(map(str, single))) == 0
    reference = tmp_path / "ref" / "out.jsonl"
    assert hinted_decode.main(list(map(str, pipeline_args(model_dir, data, reference, "--batch-size", "1",
                                                          "--max-new-tokens", "150")))) == 0
    assert outputs(out) == outputs(tmp_path / "copy" / "out.jsonl") == outputs(reference)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.failed.jsonl", "out.jsonl", "out.settings.json"]


# ---- eval.py and ddt.py -------------------------------------------------------------------------

NOT_COMPARED = ("decode_seconds", "tokens_per_s", "outputs")  # clocks, and the path of the per-model rows


def eval_files(out, model_dir):
    record = json.loads(out.read_text())
    for m in record["models"]:
        for key in NOT_COMPARED:
            m.pop(key)
    rows = out.with_name(f"{out.stem}.{evaluate.slug(str(model_dir))}.jsonl").read_text()
    return record["models"], record["base"]["n_prompts"], rows


def test_eval_two_processes_equal_one(model_dir, data, tmp_path, capsys):
    args = ["--model", model_dir, "--data", data, "--max-new-tokens", "6", "--batch-size", "2", "--ddt",
            "--base", model_dir, "--general-max-new-tokens", "6"]
    assert evaluate.main(list(map(str, args + ["--out", tmp_path / "one" / "r.json"]))) == 0
    proc = torchrun("eval.py", *args, "--out", tmp_path / "two" / "r.json")
    one, two = eval_files(tmp_path / "one" / "r.json", model_dir), eval_files(tmp_path / "two" / "r.json", model_dir)
    assert two == one
    # the base's 25 batches of general prompts, the answers, the references' φ, the drift KL
    assert shares(proc.stderr) == [[26, 24], [4, 3], [4, 3], [26, 24]], proc.stderr
    assert proc.stdout.count("| model |") == 1  # one table, from rank 0


def test_ddt_two_processes_equal_one(model_dir, data, tmp_path):
    args = ["--model", model_dir, "--data", data, "--batch-size", "2"]
    assert ddt.main(list(map(str, args + ["--out", tmp_path / "one.jsonl"]))) == 0
    proc = torchrun("ddt.py", *args, "--out", tmp_path / "two.jsonl")
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert shares(proc.stderr) == [[4, 3]]
    assert proc.stdout.count("examples,") == 1
