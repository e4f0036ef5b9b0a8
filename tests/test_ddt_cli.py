"""`python ddt.py --model M --data FILE.jsonl`: per-example scores, summary, plot, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers

import ddt
from data import encode_example, load_examples
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
ROWS = [("What is 7 times 6?", "7 * 6 = 42\n#### 42"),
        ("Tom had 10 apples and ate 4. How many are left?", "He has 10 - 4 = 6 apples left.\n#### 6"),
        ("What is 9 plus 16?", "9 + 16 = 25\n#### 25")]


def brute_force_phi(model_dir, data, end_of_turn=True):
    """Average φ and z of each response in float64, with transformers' model as the scorer;
    end_of_turn=False leaves the final end-of-turn token out."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).double()
    tok = Tokenizer.from_pretrained(model_dir)
    out = []
    with torch.no_grad():
        for ex in load_examples(data):
            ids, n_prompt = encode_example(tok, ex)
            assert ids[-1] == tok.eos_id
            if not end_of_turn:
                ids = ids[:-1]
            logp_all = hf(torch.tensor([ids])).logits[0, n_prompt - 1:-1].log_softmax(-1)
            y = torch.tensor(ids[n_prompt:])
            p = logp_all.exp()
            H = -(p * logp_all).sum(-1)
            V = (p * logp_all ** 2).sum(-1) - H ** 2
            phi = logp_all[torch.arange(len(y)), y] + H
            out.append((phi.mean().item(), (phi.sum() / V.sum().sqrt()).item()))
    return out


def test_cli_scores_summary_and_plot(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in ROWS))
    out = tmp_path / "scores.jsonl"
    assert ddt.main(["--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--plot",
                     "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3]
    for row, (phi_mean, z) in zip(rows, brute_force_phi(tiny_model_dir, data)):
        assert abs(row["phi_mean"] - phi_mean) < 1e-4
        assert abs(row["z"] - z) < 1e-3
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_cli_scores_without_the_end_of_turn_token(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in ROWS))
    with_eot, without = tmp_path / "with.jsonl", tmp_path / "without.jsonl"
    assert ddt.main(["--model", str(tiny_model_dir), "--data", str(data), "--out", str(with_eot)]) == 0
    assert "(response + end-of-turn token)" in capsys.readouterr().out
    assert ddt.main(["--model", str(tiny_model_dir), "--data", str(data), "--out", str(without),
                     "--no-end-of-turn"]) == 0
    assert "response text alone" in capsys.readouterr().out
    rows = [json.loads(line) for line in without.read_text().splitlines()]
    rows_eot = [json.loads(line) for line in with_eot.read_text().splitlines()]
    assert [r["n_tokens"] + 1 for r in rows] == [r["n_tokens"] for r in rows_eot]
    for row, (phi_mean, z) in zip(rows, brute_force_phi(tiny_model_dir, data, end_of_turn=False)):
        assert abs(row["phi_mean"] - phi_mean) < 1e-4
        assert abs(row["z"] - z) < 1e-3


def test_summary_shares():
    rows = [{"n_tokens": 5, "phi_mean": m, "z": z, "p_value": float(torch.special.ndtr(torch.tensor(z)))}
            for m, z in [(-0.5, -3.0), (-0.05, -1.0), (0.1, 0.5), (-0.2, -1.7)]]
    s = ddt.summarize(rows, alpha=0.05)
    assert s["share_ood_rule_of_thumb"] == 0.5  # −0.5 and −0.2 are below −0.1
    assert s["share_ood_calibrated"] == 0.5  # z = −3.0 and −1.7 are below Φ⁻¹(0.05) = −1.645
    assert abs(s["z_threshold"] + 1.6448536) < 1e-6


def test_cli_bad_data_is_a_clear_error(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "a #### 1"}\n{"question": "q2"}\n')
    out = tmp_path / "scores.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "ddt.py"), "--model", str(tiny_model_dir), "--data", str(data),
                           "--out", str(out)], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "d.jsonl:2" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
