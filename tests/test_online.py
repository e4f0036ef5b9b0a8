"""train.py --online on a tiny random model: the offline pipeline's rule, resume, two processes, skipped steps."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hinted_decode
import train
from plumbing.metrics import read_lines, read_metrics
from tokenizer import Tokenizer

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = [{"id": f"p{i}", "question": f"What is {i} + {i}? Give the result as your final answer.",
             "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(1, 9)]


def write_problems(path, rows=PROBLEMS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def online_args(model_dir, data, out, *extra, steps=2):
    return [str(a) for a in ("--model", model_dir, "--data", data, "--out", out, "--online", "--max-steps", steps,
                             "--batch-size", 4, "--micro-batch-size", 2, "--lr", "3e-3", "--lr-warmup-ratio", 0,
                             "--online-batch-size", 2, "--online-max-new-tokens", 6, *extra)]


def weights(out):
    return load_file(out / (out / "latest").read_text().strip() / "model.safetensors")


# ---- The rule of the offline pipeline, applied online --------------------------------------------


def fake_decoders(tok):
    """generate / hinted_generate stand-ins whose verdict depends on the problem: own answers are
    right for i ≡ 0 (mod 3), hinted rewrites for i ≡ 1 (mod 3), neither for the rest."""

    def number(prompt):
        return int(re.findall(r"What is (\d+) \+", tok.decode(prompt))[-1])

    def reply(i, right):
        return tok.encode(f"{i} + {i} = {2 * i}\n#### {2 * i if right else 2 * i + 1}") + [tok.eos_id]

    def generate(model, prompts, max_new_tokens, stop_ids=(), **kw):
        return [reply(number(p), number(p) % 3 == 0) for p in prompts], ["eos"] * len(prompts)

    def hinted_generate(model, hints, plains, **kw):
        return [reply(number(p), number(p) % 3 == 1) for p in plains], ["eos"] * len(plains)

    return generate, hinted_generate


def test_an_online_step_keeps_what_the_offline_pipeline_keeps(tiny_model_dir, tmp_path, monkeypatch):
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    generate, hinted_generate = fake_decoders(tok)
    monkeypatch.setattr(hinted_decode, "generate", generate)
    monkeypatch.setattr(hinted_decode, "hinted_generate", hinted_generate)
    data = write_problems(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    assert train.main(online_args(tiny_model_dir, data, out, "--batch-size", 8, "--micro-batch-size", 8,
                                  steps=1)) == 0
    assert hinted_decode.main([str(a) for a in ("--model", tiny_model_dir, "--data", data, "--out",
                                                tmp_path / "hd.jsonl", "--max-new-tokens", 6, "--quiet")]) == 0
    offline = {r["id"]: r for path in ("hd.jsonl", "hd.failed.jsonl") for r in read_lines(tmp_path / path)}
    online = read_lines(out / "online.jsonl")
    assert sorted(r["id"] for r in online) == sorted(offline)  # step 1 of 8 problems at batch 8: all of them
    source = {"on_policy": "own", "hinted": "hinted", "failed": "dropped"}
    for r in online:
        off = offline[r["id"]]
        assert (r["step"], r["source"], r["trained"]) == (1, source[off["source"]], off["source"] != "failed")
        assert (r["response"], r["finish_reason"], r["phi"], r["phi_reference"]) == (
            off["response"], off["finish_reason"], off["phi"], off["phi_reference"])
    [row] = read_metrics(out)
    assert (row["online_own"], row["online_hinted"], row["online_dropped"]) == (2, 3, 3)
    assert row["online_trained"] == 5 and row["online_phi_mean"] == pytest.approx(
        sum(offline[r["id"]]["phi"]["phi_mean"] for r in online if r["trained"]) / 5)
    assert row["n_valid"] == sum(len(tok.encode(offline[r["id"]]["response"])) + 1 for r in online if r["trained"])


# ---- Same guarantees as offline training ---------------------------------------------------------

SAMPLED = ("--online-temperature", "1.0", "--online-fallback", "reference")  # seeds matter; something trains


def test_interrupt_and_resume_is_bit_for_bit(tiny_model_dir, tmp_path, monkeypatch):
    """Ctrl-C in step 3 after its records were written: the resume drops them and makes them again."""
    data = write_problems(tmp_path / "d.jsonl")
    assert train.main(online_args(tiny_model_dir, data, tmp_path / "straight", *SAMPLED, steps=4)) == 0
    real_step = train.train_step
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(train, "train_step", interrupted)
    out = tmp_path / "resumed"
    assert train.main(online_args(tiny_model_dir, data, out, *SAMPLED, steps=4)) == 130
    assert [r["step"] for r in read_lines(out / "online.jsonl")][-1] == 3  # step 3's records, not trained
    monkeypatch.setattr(train, "train_step", real_step)
    assert train.main(online_args(tiny_model_dir, data, out, *SAMPLED, "--resume", steps=4)) == 0
    straight, resumed = weights(tmp_path / "straight"), weights(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert (out / "online.jsonl").read_bytes() == (tmp_path / "straight" / "online.jsonl").read_bytes()
    drop = ("gen_seconds", "train_seconds", "tokens_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(out)] == [
        {k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / "straight")]
    assert len({r["response"] for r in read_lines(out / "online.jsonl") if r["id"] == "p1"}) > 1  # seeds per step


def test_two_processes_equal_one(tiny_model_dir, tmp_path):
    data = write_problems(tmp_path / "d.jsonl")
    args = online_args(tiny_model_dir, data, tmp_path / "two", *SAMPLED, "--online-batch-size", 1)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "train.py"), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train.main(online_args(tiny_model_dir, data, tmp_path / "one", *SAMPLED, "--online-batch-size", 1)) == 0
    # the same records; after step 1 the weights differ by float rounding (DDP sums the gradients in
    # another order), so step 2's φ agree to float32 rounding, everything else exactly
    records = [read_lines(tmp_path / d / "online.jsonl") for d in ("one", "two")]
    assert len(records[0]) == len(records[1]) == 8
    for one_record, two_record in zip(*records):
        for key in ("phi", "phi_reference"):
            assert two_record.pop(key) == pytest.approx(one_record.pop(key), rel=1e-5)
        assert two_record == one_record
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.allclose(one[k], two[k], atol=2e-6, rtol=0) for k in one)
    rows = [read_metrics(tmp_path / d) for d in ("one", "two")]
    assert [r["loss"] for r in rows[1]] == pytest.approx([r["loss"] for r in rows[0]], rel=1e-5)
    assert [r["online_trained"] for r in rows[1]] == [r["online_trained"] for r in rows[0]] == [4, 4]


def test_a_step_with_nothing_kept_is_logged_and_skipped(tiny_model_dir, tmp_path):
    """The tiny random model never answers right: nothing verifies, nothing is trained, no update."""
    data = write_problems(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    assert train.main(online_args(tiny_model_dir, data, out)) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all("loss" not in r for r in rows)
    assert all(r["skipped"] and r["online_dropped"] == 4 and r["online_trained"] == 0 for r in rows)
    before = load_file(tiny_model_dir / "model.safetensors")
    after = weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("line, argv, message", [
    ('{"prompt": "Say hello.", "response": "Hello there!"}', [], r"d.jsonl:1: no gold answer"),
    (json.dumps(PROBLEMS[0]), ["--fsdp"], r"--online decodes with the whole model"),
    (json.dumps(PROBLEMS[0]), ["--online-mode", "piecewise", "--online-piecewise-bounds", "0.6", "0.2"],
     r"--online-piecewise-bounds H1 H2 needs H1 < H2"),
])
def test_bad_online_input_is_one_line_before_any_work(line, argv, message, tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(line + "\n" + "\n".join(json.dumps(p) for p in PROBLEMS[1:]) + "\n")
    assert train.main(online_args(tiny_model_dir, data, tmp_path / "run", *argv)) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_online_flags_need_online(tiny_model_dir, tmp_path, capsys):
    data = write_problems(tmp_path / "d.jsonl")
    assert train.main(["--data", str(data), "--online-beta", "2"]) == 2
    assert "--online-beta needs --online" in capsys.readouterr().err
