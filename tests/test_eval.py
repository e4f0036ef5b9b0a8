"""Tests for eval.py: scoring, intervals, stops, aggregation, files, φ and KL.

Answer extraction itself is data.py's and is tested in test_data.py; here a fake generator
that writes known answers (right, wrong, looping, endless) drives eval's own logic through
the real command line, and the distribution metrics are checked against float64 brute force.
"""

import copy
import hashlib
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import eval as ev
from conftest import write_tiny_model
from data import load_examples
from model import Transformer, finish_reason
from tokenizer import Tokenizer

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

QUESTIONS = [  # (question, gold): prompts of different lengths, so batches need left padding
    ("What is 2 + 3?", "5"),
    ("Natalia sold 48 clips in April and half as many in May. How many clips did she sell altogether?", "72"),
    ("A box holds 12 eggs. How many eggs are in 7 boxes?", "84"),
    ("Tom has $1,250 and spends $250.50. How much is left?", "999.5"),
    ("Half of 9?", "4.5"),
    ("What is 10 - 15?", "-5"),
    ("How many days are in 3 weeks?", "21"),
]


def write_data(path, questions=QUESTIONS):
    with open(path, "w") as f:
        for q, a in questions:
            f.write(json.dumps({"question": q, "answer": f"We compute it.\n#### {a}"}) + "\n")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def second_model_dir(tiny_model_dir, tmp_path_factory):
    """Same tokenizer and shape as tiny_model_dir, other random weights: a 'fine-tuned' model."""
    out = tmp_path_factory.mktemp("tiny_model_2")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((tiny_model_dir / f).read_bytes())
    write_tiny_model(out, Tokenizer.from_pretrained(tiny_model_dir).vocab_size, seed=1)
    return out


def decoded(ids, max_new_tokens, stop_ids):
    """What decoding returns for an intended reply: (tokens, finish), the stop rule applied token
    by token (model.finish_reason, itself checked in test_model.py)."""
    out = []
    for t in ids:
        out.append(t)
        if reason := finish_reason(out, stop_ids, max_new_tokens):
            return out, reason
    raise AssertionError("a fake reply must end with EOS or reach the token limit")


def fake_generate(tok, replies):
    """A stand-in for model.generate: reply[question] (a callable gold -> token ids) for the
    question found in each prompt. It also checks that eval sends the chat-templated prompt."""
    examples = {q: a for q, a in QUESTIONS}

    def generate(model, prompts, max_new_tokens, stop_ids=(), **kw):
        assert stop_ids == tok.stop_ids and kw.get("temperature", 0.0) == 0.0  # greedy, every stop id
        outs = []
        for p in prompts:
            q = next(q for q in examples if q in tok.decode(p))
            assert p == tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)
            outs.append(decoded(replies(q, examples[q]), max_new_tokens, stop_ids))
        return [ids for ids, _ in outs], [reason for _, reason in outs]

    return generate


def run_eval(*args):
    return ev.main([str(a) for a in args])


# ---- small pieces -----------------------------------------------------------------------------


def wilson_brute_force(k, n, z=ev.Z95):
    """The Wilson interval is {p : (k/n − p)² ≤ z² p(1 − p)/n}: find its ends by bisection."""
    inside = lambda p: (k / n - p) ** 2 <= z * z * p * (1 - p) / n + 1e-15
    def edge(lo, hi):  # lo outside, hi inside (or the reverse): shrink to the boundary
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if inside(mid) == inside(lo) else (lo, mid)
        return (lo + hi) / 2
    p = k / n
    return (0.0 if k == 0 else edge(0.0, p)), (1.0 if k == n else edge(1.0, p))


@pytest.mark.parametrize("k,n", [(0, 1), (0, 7), (1, 7), (3, 7), (7, 7), (50, 100), (1, 1000), (999, 1000)])
def test_wilson_interval(k, n):
    lo, hi = ev.wilson_interval(k, n)
    ref_lo, ref_hi = wilson_brute_force(k, n)
    assert lo == pytest.approx(ref_lo, abs=1e-9) and hi == pytest.approx(ref_hi, abs=1e-9)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_general_prompts_builtin_and_from_file(tmp_path):
    builtin = ev.general_prompts(None)
    assert 45 <= len(builtin) <= 60 and len({m[0]["content"] for m in builtin}) == len(builtin)
    (tmp_path / "p.txt").write_text("Say hi.\n\n  Name a color.  \n")
    assert ev.general_prompts(tmp_path / "p.txt") == [[{"role": "user", "content": "Say hi."}],
                                                      [{"role": "user", "content": "Name a color."}]]
    assert ev.general_prompts(write_data(tmp_path / "d.jsonl"))[0] == [{"role": "user", "content": QUESTIONS[0][0]}]


# ---- accuracy through the command line, with a controlled generator --------------------------


@pytest.mark.parametrize("kind", ["right", "wrong"])
def test_fake_model_accuracy(kind, tiny_model_dir, tmp_path, monkeypatch, capsys):
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    def reply(q, gold):
        answer = gold if kind == "right" else str(float(gold) + 1)
        return tok.encode(f"Let me think step by step.\nThe result is {answer}.\n#### {answer}") + [tok.eos_id]
    monkeypatch.setattr(ev, "generate", fake_generate(tok, reply))
    data, out = write_data(tmp_path / "test.jsonl"), tmp_path / "res" / "results.json"
    assert run_eval("--model", tiny_model_dir, "--data", data, "--out", out, "--batch-size", 3) == 0

    record = json.loads(out.read_text())
    [m] = record["models"]
    n = len(QUESTIONS)
    assert (m["n"], m["correct"], m["accuracy"]) == ((n, n, 1.0) if kind == "right" else (n, 0, 0.0))
    assert m["ci95"] == list(ev.wilson_interval(m["correct"], n))
    assert m["no_answer_share"] == m["length_limit_share"] == m["repetition_share"] == 0.0
    rows = read_jsonl(m["outputs"])
    assert [r["id"] for r in rows] == [ex.id for ex in load_examples(data)]  # input order kept
    assert m["avg_output_tokens"] == sum(r["n_tokens"] for r in rows) / n
    for r, (q, gold) in zip(rows, QUESTIONS):
        assert r["question"] == q and r["gold"] == gold and r["rule"] == "####" and r["stop"] == "eos"
        assert r["correct"] == (kind == "right") and "<|im_end|>" not in r["output"]
    # provenance
    assert record["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert record["command"].startswith("python eval.py --model ") and str(data) in record["command"]
    assert m["path"] == str(tiny_model_dir.resolve()) and record["versions"]["torch"] == torch.__version__
    assert "| model |" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.json", f"results.{tiny_model_dir.name}.jsonl"]


def test_fake_model_stops_and_shares(tiny_model_dir, tmp_path, monkeypatch):
    """One question each: right, right-but-after-a-loop (cut away), endless, no number, wrong."""
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    loop = (tok.encode(" ab") * 150)[:150]
    def reply(q, gold):
        i = [x for x, _ in QUESTIONS].index(q)
        return [tok.encode(f"#### {gold}") + [tok.eos_id],
                loop + tok.encode(f" #### {gold}") + [tok.eos_id],  # the stop at 100 tokens cuts the answer
                list(range(3, 303)),  # 300 distinct tokens, no EOS: hits the limit
                tok.encode("I do not know.") + [tok.eos_id],
                ][i] if i < 4 else tok.encode(f"#### {gold}1") + [tok.eos_id]
    monkeypatch.setattr(ev, "generate", fake_generate(tok, reply))
    data, out = write_data(tmp_path / "test.jsonl"), tmp_path / "results.json"
    assert run_eval("--model", tiny_model_dir, "--data", data, "--out", out, "--max-new-tokens", 300) == 0
    [m] = json.loads(out.read_text())["models"]
    rows = read_jsonl(m["outputs"])
    assert [r["stop"] for r in rows[:4]] == ["eos", "repetition", "length", "eos"]
    assert [r["correct"] for r in rows] == [True] + [False] * 6
    assert rows[1]["n_tokens"] == 100 and rows[2]["n_tokens"] == 300
    assert rows[1]["pred"] is rows[3]["pred"] is None  # the loop's answer was cut away; "I do not know."
    n = len(QUESTIONS)
    assert (m["repetition_share"], m["length_limit_share"], m["no_answer_share"]) == (1 / n, 1 / n, 2 / n)
    # decoding stopped where the rule fired: tokens/s counts the tokens of the outputs
    assert m["decoded_tokens"] == sum(len(decoded(reply(q, a), 300, {tok.eos_id})[0]) for q, a in QUESTIONS)

    # --limit takes the first N
    assert run_eval("--model", tiny_model_dir, "--data", data, "--out", out, "--limit", 2) == 0
    [m] = json.loads(out.read_text())["models"]
    assert m["n"] == 2 and [r["question"] for r in read_jsonl(m["outputs"])] == [q for q, _ in QUESTIONS[:2]]


# ---- the real (tiny) model --------------------------------------------------------------------


def test_batching_does_not_change_results(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "test.jsonl")
    rows = {}
    for bs in (1, 3, 16):
        out = tmp_path / f"b{bs}.json"
        assert run_eval("--model", tiny_model_dir, "--data", data, "--out", out, "--batch-size", bs,
                        "--max-new-tokens", 24) == 0
        [m] = json.loads(out.read_text())["models"]
        rows[bs] = read_jsonl(m["outputs"])
    assert rows[1] == rows[3] == rows[16]
    # and eval's batch-1 output is model.generate's own, one prompt at a time
    model, tok = Transformer.from_pretrained(tiny_model_dir), Tokenizer.from_pretrained(tiny_model_dir)
    for r, (q, _) in zip(rows[1], QUESTIONS):
        prompt = tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)
        [ids], [stop] = ev.generate(model, [prompt], 24, stop_ids={tok.eos_id})
        assert r["output"] == tok.decode([t for t in ids if t != tok.eos_id]) and r["stop"] == stop


def sequences(tok, n=5):
    """(prompt + response ids, n_prompt) rows of different lengths."""
    seqs = []
    for i, (q, a) in enumerate(QUESTIONS[:n]):
        prompt = tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)
        seqs.append((prompt + tok.encode(f"Step {i}: " * (i + 1) + f"#### {a}") + [tok.eos_id], len(prompt)))
    return seqs


def float64_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).double()[0], -1)


def test_kl_from_base_matches_float64_and_is_zero_for_itself(tiny_model_dir, second_model_dir):
    base = Transformer.from_pretrained(tiny_model_dir)
    other = Transformer.from_pretrained(second_model_dir)
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    seqs = sequences(tok)
    sums, counts = ev.kl_from_base(base, base, seqs, tok.pad_id, batch_size=2, chunk=7)
    assert sums == [0.0] * len(seqs)
    assert counts == [len(ids) - n for ids, n in seqs]

    sums, counts = ev.kl_from_base(base, other, seqs, tok.pad_id, batch_size=2, chunk=7)
    base64_, other64 = copy.deepcopy(base).double(), copy.deepcopy(other).double()
    for (ids, n), s in zip(seqs, sums):
        lp, lq = float64_logprobs(base64_, ids)[n - 1:-1], float64_logprobs(other64, ids)[n - 1:-1]
        ref = (lp.exp() * (lp - lq)).sum().item()  # Σ_t Σ_v p log(p/q)
        assert s == pytest.approx(ref, rel=1e-4) and s > 0


def test_reference_phi_matches_float64(tiny_model_dir):
    model, tok = Transformer.from_pretrained(tiny_model_dir), Tokenizer.from_pretrained(tiny_model_dir)
    seqs = sequences(tok)
    rows = ev.score_examples(model, seqs, tok.pad_id, batch_size=2, chunk=5)
    m64 = copy.deepcopy(model).double()
    for (ids, n), row in zip(seqs, rows):
        lp = float64_logprobs(m64, ids)[n - 1:-1]
        y = torch.tensor(ids[n:])
        H = -(lp.exp() * lp).sum(-1)
        phi = lp.gather(-1, y[:, None])[:, 0] + H
        V = (lp.exp() * (lp + H[:, None]) ** 2).sum(-1)
        assert row["n_tokens"] == len(y)
        assert row["logp_sum"] == pytest.approx(lp.gather(-1, y[:, None]).sum().item(), rel=1e-4)  # minus the NLL
        assert row["phi_mean"] == pytest.approx(phi.mean().item(), rel=1e-4, abs=1e-5)
        assert row["z"] == pytest.approx((phi.sum() / V.sum().sqrt()).item(), rel=1e-4, abs=1e-5)


def test_compare_models_with_ddt_and_drift(tiny_model_dir, second_model_dir, tmp_path, capsys):
    data = write_data(tmp_path / "test.jsonl")
    (tmp_path / "general.txt").write_text("Say hello.\nName three fruits.\nWhat is rain?\n")
    out = tmp_path / "cmp.json"
    assert run_eval("--model", tiny_model_dir, "--model", second_model_dir, "--data", data, "--out", out,
                    "--max-new-tokens", 12, "--ddt", "--base", tiny_model_dir,
                    "--general-prompts", tmp_path / "general.txt", "--general-max-new-tokens", 10) == 0
    record = json.loads(out.read_text())
    same, other = record["models"]
    assert record["base"]["n_prompts"] == 3
    assert same["kl_from_base"]["kl_token_mean"] == 0.0 and other["kl_from_base"]["kl_token_mean"] > 0
    assert same["kl_from_base"]["n_tokens"] == other["kl_from_base"]["n_tokens"] <= 3 * 10
    for m in (same, other):
        assert m["phi"]["n_tokens"] == sum(r["ref_phi"]["n_tokens"] for r in read_jsonl(m["outputs"]))
        assert math.isfinite(m["phi"]["phi_token_mean"])
        refs = [r["ref_phi"] for r in read_jsonl(m["outputs"])]
        assert m["phi"]["nll_token_mean"] == pytest.approx(-sum(r["logp_sum"] for r in refs) / m["phi"]["n_tokens"])
    table = (tmp_path / "cmp.md").read_text()
    assert table == capsys.readouterr().out and "KL(base‖model)" in table
    assert len(table.strip().splitlines()) == 4  # header, rule, two models
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("args,message", [
    (["--data", "missing.jsonl"], "missing.jsonl: file not found"),
    (["--limit", "0"], "argument --limit: expected an integer > 0, got 0"),
    (["--batch-size", "-1"], "argument --batch-size: expected an integer > 0, got -1"),
    (["--base", "x"], "--base needs --ddt"),
    (["--general-prompts", "x.txt"], "--general-prompts needs --base"),
    (["--model", "no/such/dir/here"], "no/such/dir/here"),
    (["--data", "nogold.jsonl"], "nogold.jsonl:2: no gold answer"),
    (["--ddt", "--base", "BASE", "--general-prompts", "empty.txt"], "empty.txt: no prompts"),
])
def test_bad_input(args, message, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_data(tmp_path / "test.jsonl")
    (tmp_path / "nogold.jsonl").write_text('{"prompt": "q", "response": "7"}\n{"prompt": "hi", "response": "hello"}\n')
    (tmp_path / "empty.txt").write_text("\n")
    def offline(*a, **k):
        raise OSError("no network in tests")
    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    args = [str(tiny_model_dir) if a == "BASE" else a for a in args]
    defaults = {"--model": str(tiny_model_dir), "--data": "test.jsonl"}
    full = args + [x for k, v in defaults.items() if k not in args for x in (k, v)]
    assert ev.main(full) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "eval_results.json").exists()


# ---- the real bundled model -------------------------------------------------------------------


@pytest.mark.bundled
def test_bundled_model_end_to_end(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_gsm8k", ROOT / "scripts" / "make_gsm8k.py")
    make_gsm8k = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_gsm8k)
    assert make_gsm8k.main(["--out-dir", str(tmp_path), "--n-train", "1", "--n-test", "5", "--n-heldout", "1",
                            "--heldout-templates", "1"]) == 0
    out = tmp_path / "bundled.json"
    assert run_eval("--model", "smollm2-135m-instruct", "--data", tmp_path / "test.jsonl", "--out", out,
                    "--max-new-tokens", 256, "--batch-size", 5, "--ddt") == 0
    [m] = json.loads(out.read_text())["models"]
    rows = read_jsonl(m["outputs"])
    assert m["n"] == len(rows) == 5 and m["tokens_per_s"] > 0
    assert all(r["output"].strip() for r in rows)  # a real instruct model writes text, not an instant EOS
    assert -5 < m["phi"]["phi_token_mean"] < 1
    print(capsys.readouterr().out)  # the table, visible with -s
