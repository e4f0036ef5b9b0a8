"""hinted_decode.py: the batched, KV-cached two-stream decoder against slow independent
references, and the rewrite pipeline (records, resume, bad input) on a tiny random model."""

import json
import math
import os
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_model, write_tiny_tokenizer

import hinted_decode
from data import Example, load_examples
import model as decoding
from hinted_decode import cut_analysis, hint_messages, hinted_generate, main, mixing_weight
from model import ModelConfig, Transformer, generate, repeats

torch.set_num_threads(1)

CHARS = string.printable  # 100 characters: a character-level tokenizer for splitter tests
V = len(CHARS)


class CharTokenizer:
    """Test double: token i is the character CHARS[i]."""

    vocab_size = V

    def decode(self, ids):
        return "".join(CHARS[i] for i in ids)


def tiny_model(seed=0, loop=False):
    """A random model whose next-token distributions are neither uniform nor one-hot
    (normalized entropy h mostly between 0.3 and 0.75). loop=True zeroes the blocks' outputs,
    so the next token depends on the current one only and greedy decoding cycles."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                                    ffn_dim=128, max_seq_len=512)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
        if loop:
            for layer in model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


HINTS = prompts([9, 23, 4, 15], seed=1)
PLAINS = prompts([5, 3, 17, 11], seed=2)
MIXES = {  # chosen so that λ really varies between 0 and 1 on this model
    "linear": dict(beta=1.2, mode="linear"),
    "sigmoid": dict(beta=8.0, mode="sigmoid", sigmoid_center=0.55),
    "piecewise": dict(beta=0.0, mode="piecewise", piecewise_bounds=(0.4, 0.7)),
}


# ---- A slow reference, written from docs/math.md independently of hinted_decode.py ------------


def reference_decode(model, hint, plain, *, beta, mode, max_new_tokens, eos_id=None, splitter=None,
                     tokenizer=None, sigmoid_center=0.5, piecewise_bounds=(0.3, 0.7)):
    """Batch 1, no cache: both full prefixes are recomputed from scratch at every step, float64 mixing."""
    out, switched = [], False
    for step in range(max_new_tokens):
        with torch.no_grad():
            log_p = model(torch.tensor([hint + out]))[0, -1].double().log_softmax(-1)
            log_q = model(torch.tensor([plain + out]))[0, -1].double().log_softmax(-1)
        h = float(-(log_p.exp() * log_p).sum()) / math.log(V)
        if step == 0:
            lam = 0.0
        elif switched:
            lam = 1.0
        elif mode == "linear":
            lam = min(max(beta * h, 0.0), 1.0)
        elif mode == "sigmoid":
            lam = 1.0 / (1.0 + math.exp(-beta * (h - sigmoid_center)))
        else:
            h1, h2 = piecewise_bounds
            lam = 0.0 if h <= h1 else 1.0 if h >= h2 else (h - h1) / (h2 - h1)
        token = int(((1 - lam) * log_p + lam * log_q).argmax())
        out.append(token)
        if token == eos_id:
            break
        if splitter is not None and splitter in tokenizer.decode(out):
            switched = True
    return out


# ---- The mixing rule --------------------------------------------------------------------------


def test_mixing_weight_modes():
    h = torch.tensor([0.0, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0])
    assert torch.allclose(mixing_weight(h, 3.0, "linear"), torch.tensor([0, 0.6, 0.9, 1, 1, 1, 1.0]))
    assert torch.equal(mixing_weight(h, 0.0, "linear"), torch.zeros(7))
    sig = mixing_weight(h, 4.0, "sigmoid", sigmoid_center=0.5)
    assert torch.allclose(sig, torch.tensor([1 / (1 + math.exp(-4 * (x - 0.5))) for x in h.tolist()]))
    pw = mixing_weight(h, 123.0, "piecewise", piecewise_bounds=(0.3, 0.7))
    assert torch.allclose(pw, torch.tensor([0, 0, 0, 0.5, 1, 1, 1.0]))
    with pytest.raises(ValueError, match="mode"):
        mixing_weight(h, 1.0, "cubic")


def test_lambda_really_varies_on_the_test_model(model):
    """Guard for the tests below: a mixture test with λ stuck at 0 or 1 would prove little."""
    with torch.no_grad():
        log_p = model(torch.tensor(HINTS[:1]))[0].log_softmax(-1)
    h = -(log_p.exp() * log_p).sum(-1) / math.log(V)
    for knobs in MIXES.values():
        lam = mixing_weight(h, knobs["beta"], knobs["mode"], knobs.get("sigmoid_center", 0.5),
                            knobs.get("piecewise_bounds", (0.3, 0.7)))
        assert ((lam > 0.05) & (lam < 0.95)).float().mean() > 0.3


# ---- Special cases equal plain greedy decoding ------------------------------------------------


def test_beta_zero_is_greedy_decoding_of_the_hint_prompt(model):
    out, finish = hinted_generate(model, HINTS, PLAINS, beta=0.0, max_new_tokens=25)
    assert out == generate(model, HINTS, 25)[0]
    assert finish == ["length"] * 4


def test_lambda_one_after_the_first_token_is_greedy_decoding_of_the_plain_prompt(model):
    out, _ = hinted_generate(model, HINTS, PLAINS, beta=1e9, max_new_tokens=25)  # λ = clamp(β·h) = 1
    firsts = [ids[0] for ids in generate(model, HINTS, 1)[0]]  # the first token: hint stream alone
    for b in range(4):
        assert out[b] == [firsts[b]] + generate(model, [PLAINS[b] + [firsts[b]]], 24)[0][0]


def test_first_token_from_hint_can_be_turned_off(model):
    out, _ = hinted_generate(model, HINTS, PLAINS, beta=1e9, max_new_tokens=10, first_from_hint=False)
    assert out == generate(model, PLAINS, 10)[0]


def test_splitter_hands_over_to_the_plain_stream_where_it_first_appears(model):
    tok = CharTokenizer()
    knobs = dict(beta=0.5, mode="linear", max_new_tokens=30)  # hint-led, so the switch matters
    hint, plain = HINTS[3], PLAINS[3]
    [free], _ = hinted_generate(model, [hint], [plain], **knobs)
    text = tok.decode(free)
    k = next(k for k in range(2, 20) if text.find(text[k:k + 2]) == k)  # a 2-character string first seen at k
    splitter = text[k:k + 2]
    [split], _ = hinted_generate(model, [hint], [plain], splitter=splitter, tokenizer=tok, **knobs)
    assert split[:k + 2] == free[:k + 2]
    assert split[k + 2:] == generate(model, [plain + free[:k + 2]], 30 - k - 2)[0][0]
    assert split != free  # the switch changed what follows
    assert split == reference_decode(model, hint, plain, splitter=splitter, tokenizer=tok, **knobs)
    # one splitter per example; None never switches
    both, _ = hinted_generate(model, [hint] * 2, [plain] * 2, splitter=[splitter, None], tokenizer=tok, **knobs)
    assert both == [split, free]


def test_splitter_needs_a_tokenizer(model):
    with pytest.raises(ValueError, match="tokenizer"):
        hinted_generate(model, HINTS, PLAINS, beta=1.0, max_new_tokens=2, splitter="####")


# ---- Batched, cached decoding equals single, uncached decoding --------------------------------


@pytest.mark.parametrize("mix", list(MIXES))
def test_batched_cached_run_equals_recomputation_from_scratch(model, mix):
    knobs = MIXES[mix]
    [free], _ = hinted_generate(model, HINTS[:1], PLAINS[:1], max_new_tokens=16, **knobs)
    eos = free[6]  # example 0 stops by step 7; the others whenever they produce this token
    batched, finish = hinted_generate(model, HINTS, PLAINS, max_new_tokens=16, stop_ids={eos}, **knobs)
    for b in range(4):
        ref = reference_decode(model, HINTS[b], PLAINS[b], max_new_tokens=16, eos_id=eos, **knobs)
        assert batched[b] == ref
        single, [reason] = hinted_generate(model, [HINTS[b]], [PLAINS[b]], max_new_tokens=16, stop_ids={eos}, **knobs)
        assert single == [ref] and finish[b] == reason


def test_decoding_never_pairs_a_mask_with_enable_gqa_and_prefill_sees_only_the_prompt(model, monkeypatch):
    """A probe on every SDPA call of generate and hinted_generate (GQA model: 4 query heads, 2 KV
    heads). No call passes both a mask and enable_gqa (in the pinned torch that pair runs CUDA's
    math kernel: float32 scores, K/V copied per query head). A prefill is causal attention over
    one prompt's own tokens: its keys never include the slots of tokens still to come, whatever
    max_new_tokens; a decode step is one token per row against the cache, masked."""
    real = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def probe(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append((attn_mask is not None, enable_gqa, is_causal, q.shape[-2], k.shape[-2]))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", probe)
    prompt_lengths = {len(p) for p in HINTS + PLAINS}
    prefills = {}
    for max_new in (8, 200):
        for prompts, decode in ((HINTS, lambda: generate(model, HINTS, max_new, repetition_stop=False)),
                                (HINTS + PLAINS, lambda: hinted_generate(model, HINTS, PLAINS, beta=1.2,
                                                                         max_new_tokens=max_new, repetition_stop=False))):
            calls.clear()
            decode()
            width = max(len(p) for p in prompts)
            assert not any(masked and gqa for masked, gqa, _, _, _ in calls)
            steps = [c for c in calls if c[0]]
            assert len(steps) == 2 * (max_new - 1)  # two layers, every token after the first
            assert all(q_len == 2 and k_len == width + max_new for _, _, _, q_len, k_len in steps)  # G = 2 queries
            prefill = [c for c in calls if not c[0]]
            assert all(causal and q_len == k_len and k_len in prompt_lengths for _, _, causal, q_len, k_len in prefill)
            prefills.setdefault(max_new, []).append(sorted(k_len for *_, k_len in prefill))
    assert prefills[8] == prefills[200]


def test_dropping_finished_rows_does_not_change_outputs(model, monkeypatch):
    hints, plains = HINTS * 2, PLAINS * 2  # 8 examples
    [free], _ = hinted_generate(model, hints[:1], plains[:1], max_new_tokens=30, beta=1.2)
    knobs = dict(beta=1.2, max_new_tokens=30, stop_ids={free[3]})
    compacted = hinted_generate(model, hints, plains, **knobs)
    monkeypatch.setattr(decoding, "COMPACT_FRACTION", 2.0)  # never compact
    full = hinted_generate(model, hints, plains, **knobs)
    assert compacted == full
    assert 0 < compacted[1].count("eos") < 8  # some rows finished early, others went on


# ---- Stopping ---------------------------------------------------------------------------------


def brute_force_repeats(tokens, window=30, count=5):
    return any(sum(tokens[j:j + window] == tokens[i:i + window] for j in range(len(tokens) - window + 1)) >= count
               for i in range(len(tokens) - window + 1))


def test_repeats_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for period in (1, 3, 7, 8, 20):
        seq = (torch.randint(0, 50, (period,), generator=g).tolist() * 100)[:130]
        for n in (40, 59, 60, 61, 100, 130):
            assert repeats(seq[:n]) == brute_force_repeats(seq[:n])
    assert not repeats([])


def test_repetition_stop_is_checked_every_100_tokens():
    model = tiny_model(seed=0, loop=True)
    out, finish = hinted_generate(model, HINTS[:2], PLAINS[:2], beta=1.2, max_new_tokens=400)
    assert finish == ["repetition", "repetition"]
    for ids in out:
        first = next(n for n in range(100, 401, 100) if brute_force_repeats(ids[:n]))
        assert len(ids) == first == 100
        assert brute_force_repeats(ids[:70])  # it looped long before, but is only checked at 100


def test_eos_and_length_finish_reasons(model):
    free, _ = hinted_generate(model, HINTS, PLAINS, beta=1.2, max_new_tokens=12)
    eos = free[0][4]
    out, finish = hinted_generate(model, HINTS, PLAINS, beta=1.2, max_new_tokens=12, stop_ids={eos})
    for b in range(4):
        if eos in free[b]:
            assert out[b] == free[b][:free[b].index(eos) + 1] and finish[b] == "eos"
        else:
            assert out[b] == free[b] and len(out[b]) == 12 and finish[b] == "length"
    assert "eos" in finish
    one, reason = hinted_generate(model, HINTS, PLAINS, beta=1.2, max_new_tokens=1)
    assert [len(o) for o in one] == [1] * 4 and reason == ["length"] * 4


def test_sampling_is_seeded(model):
    knobs = dict(beta=1.2, max_new_tokens=12, temperature=1.0, top_p=0.9)
    a = hinted_generate(model, HINTS, PLAINS, seed=3, **knobs)
    assert a == hinted_generate(model, HINTS, PLAINS, seed=3, **knobs)
    assert a != hinted_generate(model, HINTS, PLAINS, seed=4, **knobs)


def test_sampling_seed_is_per_example_not_per_batch(model):
    """An example's seed decides its sample, whatever batch it is decoded in (so data-parallel
    ranks and resumed runs draw what one uninterrupted process draws)."""
    knobs = dict(beta=1.2, max_new_tokens=12, temperature=1.0, top_p=0.9)
    seeds = [5, 6, 7, 8]
    together, _ = hinted_generate(model, HINTS, PLAINS, seed=seeds, **knobs)
    alone = [hinted_generate(model, [h], [p], seed=[s], **knobs)[0][0] for h, p, s in zip(HINTS, PLAINS, seeds)]
    assert together == alone
    pair, _ = hinted_generate(model, HINTS[2:], PLAINS[2:], seed=seeds[2:], **knobs)
    assert pair == together[2:]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])])
def test_compiled_hinted_generate_equals_eager(device):
    """The compiled decode step (CUDA graphs on CUDA, inductor on CPU) decodes the eager tokens,
    also while examples finish at different steps and their row pairs leave the batch."""
    model = tiny_model().to(device)
    hints, plains = HINTS * 2, PLAINS[::-1] * 2  # 8 examples
    [free], _ = hinted_generate(model, hints[:1], plains[:1], beta=1.2, max_new_tokens=20)
    knobs = dict(beta=1.2, max_new_tokens=20, stop_ids={free[2], free[9]})
    eager = hinted_generate(model, hints, plains, compile=False, **knobs)
    lengths = {len(out) for out, reason in zip(*eager) if reason == "eos"}
    assert len(lengths) >= 2 and "length" in eager[1]  # examples left at several steps, some went on
    assert hinted_generate(model, hints, plains, compile=True, **knobs) == eager


@pytest.mark.cuda
@CUDA
def test_bfloat16_hinted_decoding_never_runs_the_math_kernel_on_cuda():
    """bfloat16 on CUDA with SDPA's math kernel switched off: the prefills (flash) and the decode
    steps (memory-efficient, G query heads folded per KV head) of hinted decoding all run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_model().to("cuda", torch.bfloat16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out, finish = hinted_generate(model, HINTS, PLAINS, beta=1.2, max_new_tokens=16, compile=False)
    assert [len(o) for o in out] == [16] * 4 and finish == ["length"] * 4


# ---- Prompts ----------------------------------------------------------------------------------


def test_hint_prompt_keeps_the_chat_and_shows_the_reference():
    ex = Example("1", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}],
                 "2 + 3 = 5\n#### 5", "5", 1, "x")
    msgs = hint_messages(ex)
    assert msgs[0] == ex.prompt[0] and msgs[1]["role"] == "user" and len(msgs) == 2
    assert "What is 2+3?" in msgs[1]["content"] and "2 + 3 = 5\n#### 5" in msgs[1]["content"]
    assert "# CoT" in hint_messages(ex, analysis=True)[1]["content"]


def test_cut_analysis_at_the_last_cot_header():
    text = "# Analysis\nThe key step: add.\n# CoT\nFirst try.\n  # CoT\nWe add 2 and 3."
    assert cut_analysis(text) == "# Analysis\nThe key step: add.\n# CoT\nFirst try.\n  # CoT\n"
    assert cut_analysis("# Analysis\nno header here") is None
    assert cut_analysis("# Analysis\nok\n# CoT") == "# Analysis\nok\n# CoT\n"


# ---- The pipeline -----------------------------------------------------------------------------

QUESTIONS = [("q1", "Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = 7\n#### 7"),
             ("q2", "A box holds 6 eggs. How many eggs are in 2 boxes?", "6 * 2 = 12\n#### 12"),
             ("q3", "Sara reads 5 pages a day. How many pages in 3 days?", "5 * 3 = 15\n#### 15"),
             ("q4", "What is 10 minus 4?", "We compute $10 - 4 = 6$, so the answer is \\boxed{6}."),
             ("q5", "Half of 18 is what?", "18 / 2 = 9\n#### 9")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The shared tiny chat model, untied: the tied one only ever repeats its last token."""
    out = tmp_path_factory.mktemp("hinted_model")
    write_tiny_model(out, write_tiny_tokenizer(out), tie_word_embeddings=False)
    return out


def write_data(path, rows=QUESTIONS):
    path.write_text("".join(json.dumps({"id": i, "question": q, "answer": a}) + "\n" for i, q, a in rows))
    return path


def run(tmp_path, model_dir, data, *extra, out="out.jsonl"):
    argv = ["--data", str(data), "--out", str(tmp_path / out), "--model", str(model_dir),
            "--max-new-tokens", "6", "--batch-size", "2", "--quiet", *extra]
    return main(argv)


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()] if Path(path).exists() else []


def all_records(tmp_path, out="out.jsonl"):
    return records(tmp_path / out) + records(tmp_path / out.replace(".jsonl", ".failed.jsonl"))


def test_pipeline_records_and_sources(tmp_path, model_dir, monkeypatch, capsys):
    """A random model verifies nothing, so the verdicts are scripted: q1 is right at once, q2 and
    q4 after hinted decoding, q3 and q5 never. Everything else runs for real."""
    calls = Counter()

    def scripted_accept(text, finish, gold):
        calls[gold] += 1
        return gold == "7" or (gold in ("12", "6") and calls[gold] == 2)

    monkeypatch.setattr(hinted_decode, "accept", scripted_accept)
    assert run(tmp_path, model_dir, write_data(tmp_path / "d.jsonl")) == 0
    kept, failed = records(tmp_path / "out.jsonl"), records(tmp_path / "out.failed.jsonl")
    assert {r["id"]: r["source"] for r in kept} == {"q1": "on_policy", "q2": "hinted", "q4": "hinted"}
    assert {r["id"]: r["source"] for r in failed} == {"q3": "failed", "q5": "failed"}
    for r in kept + failed:
        assert r["finish_reason"] in ("eos", "length", "repetition")
        _, question, reference = next(row for row in QUESTIONS if row[0] == r["id"])
        assert r["prompt"] == [{"role": "user", "content": question}] and r["reference"] == reference
        for stats in (r["phi"], r["phi_reference"]):
            assert set(stats) == {"n_tokens", "phi_mean", "z", "share_phi_gt_-1", "share_phi_gt_-3", "share_phi_gt_-5"}
            assert math.isfinite(stats["phi_mean"]) and 0 <= stats["share_phi_gt_-5"] <= 1
    # the kept records are training data: train.py's loader reads them back, ids and answers intact
    loaded = load_examples(tmp_path / "out.jsonl")
    assert [(e.id, e.answer, e.response) for e in loaded] == [(r["id"], r["final_answer"], r["response"]) for r in kept]
    summary = capsys.readouterr().out
    assert "on_policy 1, hinted 2, failed 2" in summary and "examples/s" in summary


def test_resume_after_interruption_gives_every_example_once(tmp_path, model_dir, monkeypatch):
    data = write_data(tmp_path / "d.jsonl")
    assert run(tmp_path, model_dir, data, out="full.jsonl") == 0  # an uninterrupted run to compare with
    real, n_calls = hinted_decode.hinted_generate, [0]

    def interrupted_on_second_batch(*args, **kwargs):
        n_calls[0] += 1
        if n_calls[0] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(hinted_decode, "hinted_generate", interrupted_on_second_batch)
    assert run(tmp_path, model_dir, data) == 130
    first = all_records(tmp_path)
    assert [r["id"] for r in first] == ["q1", "q2"]  # the first batch; the one in flight is lost
    failed = tmp_path / "out.failed.jsonl"
    before = failed.read_bytes()
    with open(failed, "ab") as f:  # and a crash in the middle of writing a record
        f.write(b'{"id": "q3", "prompt": [{"role": "us')
    monkeypatch.setattr(hinted_decode, "hinted_generate", real)
    assert run(tmp_path, model_dir, data) == 0
    assert failed.read_bytes().startswith(before)  # nothing written before was lost or rewritten
    resumed = all_records(tmp_path)
    assert sorted(r["id"] for r in resumed) == ["q1", "q2", "q3", "q4", "q5"]
    assert sorted(resumed, key=lambda r: r["id"]) == sorted(all_records(tmp_path, "full.jsonl"), key=lambda r: r["id"])
    assert run(tmp_path, model_dir, data) == 0  # a third run has nothing left to do
    assert all_records(tmp_path) == resumed


def test_out_written_from_another_data_file_is_refused(tmp_path, model_dir, capsys):
    assert run(tmp_path, model_dir, write_data(tmp_path / "a.jsonl", QUESTIONS[:2])) == 0
    before = (tmp_path / "out.failed.jsonl").read_bytes()
    other = [("q1", "A different question with id q1?", "1 + 1 = 2\n#### 2")]
    assert run(tmp_path, model_dir, write_data(tmp_path / "b.jsonl", other)) == 2
    assert "another" in capsys.readouterr().err
    assert (tmp_path / "out.failed.jsonl").read_bytes() == before
    data = tmp_path / "a.jsonl"
    assert main(["--data", str(data), "--out", str(data), "--model", str(model_dir)]) == 2
    assert "--data itself" in capsys.readouterr().err
    assert main(["--data", str(data), "--out", str(tmp_path / "out"), "--model", str(model_dir)]) == 2
    assert "name the output NAME.jsonl" in capsys.readouterr().err


def test_out_made_before_the_data_was_edited_is_refused(tmp_path, model_dir, capsys):
    """Same ids and questions, corrected solutions: the old records were verified against the old
    gold answers, so they are not examples of the data as it is now."""
    assert run(tmp_path, model_dir, write_data(tmp_path / "a.jsonl", QUESTIONS[:2])) == 0
    before = all_records(tmp_path)
    fixed = [QUESTIONS[0], ("q2", QUESTIONS[1][1], "6 * 2 = 12, twice.\n#### 12")]
    assert run(tmp_path, model_dir, write_data(tmp_path / "a.jsonl", fixed)) == 2
    assert "an edited one" in capsys.readouterr().err
    assert all_records(tmp_path) == before


def test_a_smaller_limit_on_resume_keeps_every_record(tmp_path, model_dir, capsys):
    data = write_data(tmp_path / "d.jsonl")
    assert run(tmp_path, model_dir, data, "--limit", "4") == 0
    everything = all_records(tmp_path)
    assert run(tmp_path, model_dir, data, "--limit", "2") == 0  # nothing to do, nothing lost
    assert "2 examples, 2 already in" in capsys.readouterr().err
    assert all_records(tmp_path) == everything and len(everything) == 4


def test_the_error_of_a_rank_other_than_0_reaches_the_real_stderr(monkeypatch, capfd):
    from plumbing.cli import print_error

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(sys, "stderr", open(os.devnull, "w"))  # what start_ranks does on rank 1
    assert print_error(ValueError("d.jsonl:3: field 'x'")) == 2
    assert "[rank 1] error: d.jsonl:3: field 'x'" in capfd.readouterr().err


@pytest.mark.parametrize("line, message", [
    ('{"question": "What is 1+1?", "answer": "2\\n#### 2"\n', ":2: not valid JSON"),
    ('{"question": "What is 1+1?", "answer": "I do not know."}\n', ":2: no reference final answer"),
    ('{"messages": [{"role": "system", "content": "Hi."}, {"role": "assistant", "content": "#### 2"}]}\n',
     ":2: no user message"),
])
def test_bad_input_is_an_error_and_writes_nothing(tmp_path, model_dir, capsys, line, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"question": "What is 2+2?", "answer": "#### 4"}) + "\n" + line)
    assert run(tmp_path, model_dir, data) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(data) + message in err
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.failed.jsonl").exists()


def test_command_line_error_exits_2_without_traceback(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text("not json\n")
    r = subprocess.run([sys.executable, "hinted_decode.py", "--data", str(data), "--out", str(tmp_path / "o.jsonl")],
                       check=False, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_analysis_prefix_and_examples_without_header(tmp_path, model_dir, monkeypatch, capsys):
    """The random model writes no '# CoT' header; a scripted cut gives q1 a prefix, which must
    end the hint prompt of its hint stream."""
    from tokenizer import Tokenizer

    cuts = iter(["# CoT\n", None])  # q1's draft gets a prefix, q2's has no header
    monkeypatch.setattr(hinted_decode, "cut_analysis", lambda text: next(cuts))
    seen, real = [], hinted_decode.hinted_generate

    def spy(model, hints, plains, **knobs):
        seen.append(hints)
        return real(model, hints, plains, **knobs)

    monkeypatch.setattr(hinted_decode, "hinted_generate", spy)
    assert run(tmp_path, model_dir, write_data(tmp_path / "d.jsonl", QUESTIONS[:2]), "--analysis") == 0
    tok = Tokenizer.from_pretrained(model_dir)
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0][-len(tok.encode("# CoT\n")):] == tok.encode("# CoT\n")
    [skipped] = [r for r in all_records(tmp_path) if r["finish_reason"] == "no_analysis"]
    assert skipped["id"] == "q2" and skipped["source"] == "failed" and skipped["phi"] is None
    assert "no '# CoT' header" in capsys.readouterr().err


@pytest.mark.bundled
def test_demo_on_the_bundled_model(capsys):
    assert main(["--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    for title in ("reference solution", "the model's own answer", "β_mix = 0 rewrite", "hinted rewrite (β_mix = 3"):
        assert f"=== {title}" in out
    assert out.count("average φ") == 4
