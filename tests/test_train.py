"""train.py on a tiny random model: the loss, the step, accumulation, resume, DDP, bad data."""

import itertools
import json
import math
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import idft
import train
from data import encode_example, load_examples
from model import Transformer
from plumbing.metrics import read_metrics
from plumbing.report import plot_run
from test_model import CASES, make_hf
from tokenizer import Tokenizer

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

QUESTIONS = [
    ("Natalia sold 48 clips in April and half as many in May. How many in total?",
     "In May she sold 48 / 2 = 24 clips.\nIn total she sold 48 + 24 = 72 clips.\n#### 72"),
    ("What is 7 times 6?", "7 * 6 = 42\n#### 42"),
    ("A box has 3 red and 5 blue balls. How many balls?", "3 + 5 = 8\n#### 8"),
    ("Tom had 10 apples and ate 4. How many are left? Give the result as your final answer.",
     "He has 10 - 4 = 6 apples left, because eating removes them one at a time from the basket.\n#### 6"),
    ("What is 100 divided by 4?", "100 / 4 = 25\n#### 25"),
    ("Sam reads 12 pages a day for 5 days. How many pages?", "12 * 5 = 60 pages.\n#### 60"),
    ("What is 9 plus 16?", "9 + 16 = 25\n#### 25"),
    ("A class has 30 students; 12 are boys. How many girls?", "30 - 12 = 18 girls.\n#### 18"),
]


def write_data(path, rows):
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    return path


def run(args, tmp_path, *extra):
    return train.main([*map(str, args), *map(str, extra)])


def base_args(tiny_model_dir, data, out, **kw):
    args = ["--model", tiny_model_dir, "--data", data, "--out", out, "--lr", "3e-3", "--lr-warmup-ratio", "0",
            "--batch-size", "4", "--micro-batch-size", "2", "--max-len", "256", "--seed", "0"]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", v]
    return [str(a) for a in args]


def final_weights(out):
    latest = (out / "latest").read_text().strip()
    return load_file(out / latest / "model.safetensors")


def losses(out):
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


def mean_token_prob(model_dir, data):
    """Mean p_t(y_t) over the response tokens of `data`, computed here with transformers."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tok = Tokenizer.from_pretrained(model_dir)
    probs = []
    with torch.no_grad():
        for ex in load_examples(data):
            ids, n_prompt = encode_example(tok, ex)
            p = hf(torch.tensor([ids])).logits[0, :-1].softmax(-1)
            probs.append(p[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][n_prompt - 1:])
    return torch.cat(probs).mean().item()


@pytest.mark.parametrize("method", ["sft", "dft", "eaft", "idft", "idft_v1"])
def test_loss_goes_down(method, tiny_model_dir, tmp_path):
    # One batch, seen every step: it must be learned. Each method's weighted loss is logged and
    # must fall; DFT's logged value −p·log p is not monotone in p (it rises up to p = 1/e), so
    # for every method the test also checks the data's mean token probability p_t(y_t) — the
    # quantity all five gradients −w ∇log p push up — against the untrained model.
    data = write_data(tmp_path / "d.jsonl", QUESTIONS[:4])
    out = tmp_path / "run"
    assert train.main(base_args(tiny_model_dir, data, out, loss=method, max_steps=8)) == 0
    curve = losses(out)
    assert len(curve) == 8
    if method != "dft":
        assert curve[-1] < 0.5 * curve[0], curve
    before, after = mean_token_prob(tiny_model_dir, data), mean_token_prob(out / (out / "latest").read_text().strip(), data)
    assert after > 5 * before, (before, after)


def test_sft_step_matches_handwritten_reference(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "d.jsonl", QUESTIONS[:4])
    out = tmp_path / "run"
    lr, wd = 1e-3, 0.01
    assert train.main(base_args(tiny_model_dir, data, out, loss="sft", max_steps=1, lr=lr, grad_clip=0,
                                weight_decay=wd)) == 0
    # The reference: transformers' model, mean cross-entropy over response tokens, plain AdamW.
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    total, count = 0.0, 0
    for ex in load_examples(data):
        ids, n_prompt = encode_example(tok, ex)
        logits = hf(torch.tensor([ids])).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        total, count = total + nll[n_prompt - 1:].sum(), count + len(ids) - n_prompt
    (total / count).backward()
    assert losses(out) == [pytest.approx((total / count).item(), rel=1e-5)]  # Adam hides a scale bug: check it here
    matrices = [p for p in hf.parameters() if p.ndim >= 2]
    vectors = [p for p in hf.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": wd}, {"params": vectors, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    opt.step()
    ours = final_weights(out)
    params = dict(hf.named_parameters())
    compared = total_elements = 0
    for name, tensor in ours.items():
        # Adam's first step is ±lr wherever |g| ≫ eps; a wrong mask or shift flips signs (2e-3
        # apart). Where |g| is within float32 summation noise of eps (1e-8) the step's size is
        # decided by that noise, so those few elements are left out of the comparison.
        p = params[name] if name in params else params["model.embed_tokens.weight"]  # tied output
        clear = p.grad.abs() > 1e-6
        compared, total_elements = compared + int(clear.sum()), total_elements + clear.numel()
        assert torch.allclose(tensor[clear], p.detach()[clear], atol=1e-5, rtol=0), name
    assert compared > 0.9 * total_elements, (compared, total_elements)


def test_gradient_accumulation_with_uneven_lengths(tiny_model_dir, tmp_path):
    rows = [QUESTIONS[0], QUESTIONS[1], QUESTIONS[3], QUESTIONS[6]]  # response lengths differ a lot
    data = write_data(tmp_path / "d.jsonl", rows)
    common = dict(loss="idft", max_steps=1, grad_clip=0)  # unpacked: padded micro-batches of uneven widths
    assert train.main(base_args(tiny_model_dir, data, tmp_path / "whole", **common, micro_batch_size=4) + ["--no-pack"]) == 0
    assert train.main(base_args(tiny_model_dir, data, tmp_path / "micro", **common, micro_batch_size=1) + ["--no-pack"]) == 0
    whole, micro = final_weights(tmp_path / "whole"), final_weights(tmp_path / "micro")
    for name in whole:
        assert torch.allclose(whole[name], micro[name], atol=1e-6, rtol=0), name
    assert losses(tmp_path / "whole") == pytest.approx(losses(tmp_path / "micro"), rel=1e-6)


def test_interrupt_and_resume_is_bit_for_bit(tiny_model_dir, tmp_path, monkeypatch):
    data = write_data(tmp_path / "d.jsonl", QUESTIONS)  # 2 steps per epoch: the run crosses epochs
    args = dict(loss="idft", max_steps=6, warmup_ratio=0.3, transition_ratio=0.3, save_every=100)
    assert train.main(base_args(tiny_model_dir, data, tmp_path / "straight", **args)) == 0

    # Ctrl-C during step 3 (raised where the step begins): train.py saves step 3 and exits 130.
    real_lr = train.learning_rate

    def interrupt_at_3(step, *a):
        if step == 3:
            raise KeyboardInterrupt
        return real_lr(step, *a)

    monkeypatch.setattr(train, "learning_rate", interrupt_at_3)
    out = tmp_path / "resumed"
    assert train.main(base_args(tiny_model_dir, data, out, **args)) == 130
    assert (out / "latest").read_text().strip().endswith("step-0000003")
    monkeypatch.setattr(train, "learning_rate", real_lr)
    assert train.main(base_args(tiny_model_dir, data, out, **args)) == 2  # no silent restart over a run
    assert train.main(base_args(tiny_model_dir, data, out, **args) + ["--resume"]) == 0

    straight, resumed = final_weights(tmp_path / "straight"), final_weights(out)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert losses(out) == losses(tmp_path / "straight")
    lams = [r["lambda"] for r in read_metrics(out) if "lambda" in r]
    assert len(set(lams)) > 2  # the schedule moves during these 6 steps: a restart at step 0 would show
    assert lams == [r["lambda"] for r in read_metrics(tmp_path / "straight") if "lambda" in r]


def test_checkpoint_loads_in_transformers(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "d.jsonl", QUESTIONS[:4])
    out = tmp_path / "run"
    assert train.main(base_args(tiny_model_dir, data, out, max_steps=2)) == 0
    ckpt = out / (out / "latest").read_text().strip()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "trainer_state.pt"):
        assert (ckpt / f).is_file(), f
    from model import Transformer

    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    ours = Transformer.from_pretrained(ckpt)
    tokens = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max() < 1e-4
    assert plot_run(out).is_file()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    data = write_data(tmp_path / "d.jsonl", QUESTIONS[:4])
    out = tmp_path / "run"
    real, real_lr = train.idft.chunked_loss_sum, train.learning_rate
    step = {"n": 0}

    def poisoned(*a, **k):
        loss, n, toks = real(*a, **k)
        return (loss * float("nan") if step["n"] >= 2 else loss), n, toks  # NaN from step 3 on

    def learning_rate(n, *a):
        step["n"] = n  # 0-based: the step about to run
        return real_lr(n, *a)

    monkeypatch.setattr(train.idft, "chunked_loss_sum", poisoned)
    monkeypatch.setattr(train, "learning_rate", learning_rate)
    assert train.main(base_args(tiny_model_dir, data, out, max_steps=5, save_every=1)) == 1
    assert (out / "latest").read_text().strip().endswith("step-0000002")


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_processes_equal_one(sharding, tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "d.jsonl", QUESTIONS)
    held_out = write_data(tmp_path / "e.jsonl", QUESTIONS[:3])  # evaluation calls the model's parts directly
    knobs = dict(max_steps=2, micro_batch_size=1, eval_data=held_out, eval_every=1)
    common = base_args(tiny_model_dir, data, tmp_path / "ddp", **knobs) + sharding
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *common]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train.main(base_args(tiny_model_dir, data, tmp_path / "single", **knobs)) == 0
    evals = [[r["eval_loss"] for r in read_metrics(tmp_path / d) if "eval_loss" in r] for d in ("single", "ddp")]
    assert len(evals[0]) == 2 and evals[1] == pytest.approx(evals[0], rel=1e-5)
    one, two = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for name in one:
        assert torch.allclose(one[name], two[name], atol=2e-6, rtol=0), name
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    # the logged φ/γ statistics are those of every token of the step, not rank 0's share
    one_rows, two_rows = ([r for r in read_metrics(tmp_path / d) if "loss" in r] for d in ("single", "ddp"))
    keys = [k for k in one_rows[0] if k.startswith(("phi_", "gamma_")) or k == "n_valid"]
    assert {"phi_mean", "phi_std", "phi_min", "phi_max", "phi_median", "phi_hist", "gamma_mean", "gamma_hist",
            "n_valid"} <= set(keys)
    assert len(one_rows) == len(two_rows) == 2
    for one_row, two_row in zip(one_rows, two_rows):
        for key in keys:
            assert two_row[key] == pytest.approx(one_row[key], rel=1e-4, abs=1e-6), key


# ---- Packing -----------------------------------------------------------------------------------


class GradientRecorder:
    """An optimizer for train.train_step that keeps the step's accumulated gradients instead of stepping."""

    def __init__(self, params):
        self.params, self.grads = list(params), None

    def step(self):
        self.grads = [p.grad.clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def random_sequences(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [train.Sequence(torch.randint(1, vocab, (n,), generator=g).tolist(), max(1, n // 3)) for n in lengths]


@pytest.mark.parametrize("case", list(CASES))
def test_packed_step_equals_unpacked_step(case, tmp_path):
    """One step's examples give the same loss, gradients and φ_t packed into rows (positions
    restarting per sequence, attention within each sequence) as one per padded row, for every
    family: GQA, biases, q/k norm, Llama-3 RoPE scaling (positions past its original 16)."""
    make_hf(case, tmp_path)
    model = Transformer.from_pretrained(tmp_path).train()
    head = train.LossHead(model, "idft", dict(beta=1.0, gamma_min=0.1, gamma_max=2.0, b=None, top_k=None))
    seqs = random_sequences([5, 37, 12, 64, 9, 23, 41, 3, 17, 30], vocab=97)
    results = {}
    for layout, pack_len, micro in (("unpacked", None, 10), ("packed", 64, 1), ("packed, 3 rows", 64, 3)):
        recorder = GradientRecorder(head.parameters())
        micro_batches = train.step_batches(seqs, 0, 10, 0, 0, 1, micro, pack_len)
        result = train.train_step(head, recorder, micro_batches, 0.7, 0, "cpu", nullcontext(), 0, 1, pack_len)
        results[layout] = result, recorder.grads
    (ref, ref_grads) = results["unpacked"]
    assert len(train.step_batches(seqs, 0, 10, 0, 0, 1, 1, 64)) == 4  # 4 rows: several micro-batches
    for layout in ("packed", "packed, 3 rows"):
        result, grads = results[layout]
        assert result.loss == pytest.approx(ref.loss, rel=1e-6), layout
        for g, g_ref in zip(grads, ref_grads):
            assert (g - g_ref).abs().max() <= 1e-5 * g_ref.abs().max(), layout
        assert torch.allclose(result.phi.sort().values, ref.phi.sort().values, atol=1e-5)
        assert result.n_tokens == ref.n_tokens == sum(len(s.ids) - 1 for s in seqs)
        assert result.padding_share < ref.padding_share


def test_pack_and_deal_keep_the_steps_examples():
    """Packing changes the layout, never the selection: every example of the step lands in one
    row exactly once, rows hold at most --max-len inputs, each rank runs as many micro-batches of
    at most --micro-batch-size rows."""
    seqs = random_sequences([int(x) for x in torch.randint(2, 60, (50,), generator=torch.Generator().manual_seed(1))],
                            vocab=97)
    for step, world, micro in itertools.product((0, 3), (1, 2, 3), (1, 2, 4)):
        unpacked = [s for r in range(world) for mb in train.step_batches(seqs, step, 12, 5, r, world, micro)
                    for row in mb for s in row]
        packed = [train.step_batches(seqs, step, 12, 5, r, world, micro, 64) for r in range(world)]
        assert len({len(mbs) for mbs in packed}) == 1  # the same number of forwards on every rank
        assert all(len(mb) <= micro for mbs in packed for mb in mbs)
        rows = [row for mbs in packed for mb in mbs for row in mb]
        assert all(sum(len(s.ids) for s in row) <= 64 + 1 for row in rows)
        assert sorted(map(id, (s for row in rows for s in row))) == sorted(map(id, unpacked))
        assert len(unpacked) == 12


def test_packing_wastes_under_5_percent_on_chain_of_thought_lengths():
    """Best-fit decreasing on a step of 128 long, uneven sequences (log-normal lengths, median 500
    tokens, rows of 2048): under 5% of the input slots are padding (at most one row's worth is
    inevitable), where one sequence per row padded to the longest of its micro-batch of 4 wastes
    far more."""
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        lengths = (torch.randn(128, generator=g) * 0.8 + math.log(500)).exp().clamp(32, 2048).long().tolist()
        seqs = [train.Sequence([1] * n, 1) for n in lengths]
        tokens = sum(n - 1 for n in lengths)
        packed = train.pack(seqs, 2048)
        assert 1 - tokens / (len(packed) * 2048) < 0.05
        assert len(packed) < 1.1 * tokens / 2049 + 1  # near the fewest rows possible
        micro = [lengths[i:i + 4] for i in range(0, 128, 4)]  # the unpacked layout, not sorted
        assert 1 - tokens / sum(4 * (max(m) - 1) for m in micro) > 0.3


def test_padding_share_is_logged(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "d.jsonl", QUESTIONS)
    shares = {}
    for layout in ("--pack", "--no-pack"):
        out = tmp_path / layout.strip("-")
        assert train.main(base_args(tiny_model_dir, data, out, max_steps=2, batch_size=8) + [layout]) == 0
        shares[layout] = [r["padding_share"] for r in read_metrics(out) if "loss" in r]
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    tokens = sum(len(encode_example(tok, ex)[0]) - 1 for ex in load_examples(data))  # every example, every step
    for share in shares["--pack"]:
        rows = tokens / ((1 - share) * 256)  # the logged share must describe whole rows of --max-len 256
        assert rows == pytest.approx(round(rows), abs=1e-6) and round(rows) * 257 >= tokens + 8
    assert max(shares["--pack"]) < min(shares["--no-pack"])


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "answer": "a"\n', r"d.jsonl:2: .*JSON"),
    ('{"question": "q"}\n', r"d.jsonl:2: .*answer"),
    ('{"question": "q", "answer": ""}\n', r"d.jsonl:2: .*answer"),
    ('{"question": 7, "answer": "a"}\n', r"d.jsonl:2: .*question"),
])
def test_bad_data_is_a_clear_error(line, message, tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "ok", "answer": "fine #### 1"}) + "\n" + line)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *base_args(tiny_model_dir, data, tmp_path / "o")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")
    import re
    assert re.search(message, proc.stderr), proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.bundled
def test_bundled_model_trains_two_steps_on_generated_data(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_gsm8k.py"), "--out-dir", tmp_path / "data",
                    "--n-train", "8", "--n-test", "4", "--n-heldout", "4"], env=env, check=True, timeout=300)
    out = tmp_path / "run"
    code = train.main(["--data", str(tmp_path / "data" / "train.jsonl"), "--out", str(out), "--max-steps", "2",
                       "--batch-size", "2", "--micro-batch-size", "1", "--max-len", "512", "--save-every", "2"])
    assert code == 0
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert len(rows) == 2
    # step 1's logged loss is the plain reference loss (full logits, autograd path) of step 1's
    # batch under the untouched bundled model: the memory-lean path and the bookkeeping agree
    from hub import BUNDLED_NAME
    from model import Transformer

    tok, model = Tokenizer.from_pretrained(BUNDLED_NAME), Transformer.from_pretrained(BUNDLED_NAME)
    seqs, _ = train.tokenize_dataset(tmp_path / "data" / "train.jsonl", tok, 512)
    [micro_batch] = train.step_batches(seqs, 0, 2, 0, 0, 1, micro_batch_size=2)  # one sequence per row, unpacked
    batch = train.collate(micro_batch, tok.pad_id, "cpu")
    with torch.no_grad():  # the run packed the same two sequences into rows of --max-len
        loss_sum, n_valid, _ = idft.loss_sum(model(batch.inputs), batch.targets, batch.mask, "idft")
    assert rows[0]["loss"] == pytest.approx(loss_sum.item() / n_valid, rel=1e-5)


def test_compiled_step_equals_eager(tiny_model_dir, tmp_path):
    # The GPU default (torch.compile of model + chunked loss) must train the same model; CPU
    # inductor exercises the same graph capture, the checkpointed chunked loss included.
    data = write_data(tmp_path / "d.jsonl", QUESTIONS)
    # lr 1e-4: Adam moves every weight by about ±lr, so a gradient element near zero whose sign
    # differs by rounding would show as a 2e-4 difference; a wrong graph moves most elements.
    args = dict(max_steps=2, grad_clip=0, lr=1e-4)
    assert train.main(base_args(tiny_model_dir, data, tmp_path / "eager", **args)) == 0
    assert train.main(base_args(tiny_model_dir, data, tmp_path / "compiled", **args) + ["--compile"]) == 0
    eager, compiled = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    for name in eager:
        off = (eager[name] - compiled[name]).abs() > 1e-6
        assert off.float().mean() < 1e-3, (name, int(off.sum()), off.numel())


# ---- CUDA only (scripts/gpu_check.sh runs these) --------------------------------------------

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# bfloat16 keeps 8 significant bits: each product and partial sum is rounded by up to 2^-9 relative,
# and a mean loss over a few hundred tokens of a tiny model lands within about 1% of float32
BF16_LOSS_RTOL = 2e-2


@pytest.mark.cuda
@CUDA
def test_compiled_bf16_step_equals_eager_on_cuda(tiny_model_dir, tmp_path):
    """The CUDA default (torch.compile + bfloat16 autocast) trains as the eager bfloat16 step does."""
    data = write_data(tmp_path / "d.jsonl", QUESTIONS)
    args = dict(max_steps=2, grad_clip=0, lr=1e-4, dtype="bfloat16")
    assert train.main(base_args(tiny_model_dir, data, tmp_path / "eager", **args) + ["--no-compile"]) == 0
    assert train.main(base_args(tiny_model_dir, data, tmp_path / "compiled", **args) + ["--compile"]) == 0
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=BF16_LOSS_RTOL)
    # Adam moves every weight by about ±lr per step: the two runs must move them the same way
    start = load_file(tiny_model_dir / "model.safetensors")
    eager, compiled = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    for name in eager:
        before = start[name]
        same = ((eager[name] - before).sign() == (compiled[name] - before).sign()).float().mean()
        assert same > 0.9, (name, float(same))


@pytest.mark.cuda
@CUDA
def test_bf16_loss_is_float32_loss_within_tolerance_on_cuda(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "d.jsonl", QUESTIONS)
    for dtype in ("float32", "bfloat16"):
        assert train.main(base_args(tiny_model_dir, data, tmp_path / dtype, max_steps=1, dtype=dtype)) == 0
    assert losses(tmp_path / "bfloat16")[0] == pytest.approx(losses(tmp_path / "float32")[0], rel=BF16_LOSS_RTOL)


@pytest.mark.cuda
@CUDA
def test_one_process_nccl_ddp_step_equals_plain_step_on_cuda(tiny_model_dir, tmp_path):
    """torchrun with one process on CUDA: NCCL process group, DDP wrapper, same training."""
    data = write_data(tmp_path / "d.jsonl", QUESTIONS)
    common = dict(max_steps=2, dtype="float32")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(ROOT / "train.py"), *base_args(tiny_model_dir, data, tmp_path / "ddp", **common), "--no-compile"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train.main(base_args(tiny_model_dir, data, tmp_path / "plain", **common) + ["--no-compile"]) == 0
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    plain, ddp = final_weights(tmp_path / "plain"), final_weights(tmp_path / "ddp")
    for name in plain:
        assert torch.allclose(plain[name], ddp[name], atol=1e-6, rtol=0), name


@pytest.mark.cuda
@CUDA
def test_packed_bf16_step_equals_unpacked_bf16_step_on_cuda(tmp_path):
    """On CUDA in bfloat16 packed rows run FlashAttention's variable-length kernel: the step's
    loss and gradients agree with the unpacked step's (flash, causal) within bfloat16 rounding."""
    make_hf("qwen3_qk_norm", tmp_path)
    model = Transformer.from_pretrained(tmp_path, device="cuda").train()
    head = train.LossHead(model, "idft", dict(beta=1.0, gamma_min=0.1, gamma_max=2.0, b=None, top_k=None))
    seqs = random_sequences([5, 37, 12, 64, 9, 23, 41, 3, 17, 30], vocab=97)
    results = {}
    for pack_len in (None, 64):
        recorder = GradientRecorder(head.parameters())
        micro_batches = train.step_batches(seqs, 0, 10, 0, 0, 1, 2, pack_len)
        result = train.train_step(head, recorder, micro_batches, 0.7, 0, "cuda",
                                  torch.autocast("cuda", dtype=torch.bfloat16), 0, 1, pack_len)
        results[pack_len] = result, torch.cat([g.flatten() for g in recorder.grads])
    (packed, g_packed), (unpacked, g_unpacked) = results[64], results[None]
    assert packed.loss == pytest.approx(unpacked.loss, rel=BF16_LOSS_RTOL)
    assert torch.nn.functional.cosine_similarity(g_packed, g_unpacked, dim=0) > 0.99
