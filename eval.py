"""Evaluate models: answer accuracy, and how far each model's distribution moved (SPEC §2, §5).

    python eval.py --model M [--model M2 ...] --data test.jsonl [--limit N] [--out results.json]
                   [--ddt [--base M0] [--general-prompts FILE]]

Accuracy. Each question is put in the model's chat template and answered greedily (batched,
KV-cached `model.generate`). The final answer is read with data.py's `find_answer` ('#### N',
then \\boxed{...}, then the last number) and compared numerically with `answers_match`, the
same verifier hinted_decode.py uses. For k correct out of n we report k/n with the Wilson 95%
interval
    (p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n),   p̂ = k/n, z = 1.96,
which, unlike p̂ ± z·sqrt(p̂(1−p̂)/n), stays inside [0, 1] and is not empty at k = 0 or k = n.
Two models on the same questions are compared by the exact McNemar test: of the n_A questions
only model A answers right and the n_B only B does, under "equally accurate" each of these
n_A + n_B discordant questions is a fair coin, so p = min(1, 2·P[Bin(n_A + n_B, 1/2) ≤ min(n_A, n_B)]).
Pairing removes the questions both get right or both get wrong, which an unpaired comparison of
two intervals counts as noise.
Each output stops at EOS, at --max-new-tokens ("length"), or by the repetition rule of
SPEC §4 ("repetition": some 30-token window seen 5 times, checked every 100 tokens): the
stop rule of model.generate, applied while decoding, so a looping row leaves the batch.

Distribution metrics (--ddt), all float32, full vocabulary, logits formed chunk by chunk:
  * φ of the data: each model scores the reference solutions y of the data set under the
    plain prompt x: φ_t = log p_t(y_t) + H_t (ddt.token_stats), per sequence mean φ and the
    calibrated z = Σφ_t / sqrt(Σ V_t) (ddt.sequence_scores). Mean φ near 0 means the data is
    in-distribution for that model (authors' rule of thumb: below about −0.1 it is not).
  * Drift from a base model (--base M0): the base answers a set of everyday instructions
    greedily (GENERAL_PROMPTS, or --general-prompts); on those answers, at every response
    position t,  KL_t(base ‖ model) = Σ_v p_base(v) (log p_base(v) − log p_model(v))
    (ddt.log_probs, ddt.row_dot), averaged over all answer tokens. This is the "forgetting"
    that IDFT is meant to reduce.

Outputs, for --out R.json: R.json (command, model paths, data hash, versions, every metric);
R.<model>.jsonl per model, one row per question with the output, the extracted answer, the
rule that found it, the verdict and the stop reason (and the reference's φ with --ddt); with
several models also R.md (comparison table, also printed) and R.png (accuracy with its
interval, and the drift). tokens/s counts the output tokens per second of decoding (prefill
included in the time; under torchrun: all output tokens per second of the slowest rank).

Data parallel: `torchrun --nproc_per_node N eval.py ...` splits every step (the base's answers,
the answers, φ, the drift) by batches, batch k to rank k mod N (data.shard), on cuda:LOCAL_RANK
or the CPU; the results are gathered back in input order (data.gather_in_order), so every
file rank 0 writes equals a one-process run's, timing fields aside.
"""

import argparse
import json
import math
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from data import (ArgumentParser, Ranks, UserError, answers_match, atomic_write, check_input, check_output,
                  encode_example, every_rank, file_sha256, find_answer, gather_in_order, load_examples, lock_output,
                  positive_int, print_error, print_shares, rank_device, shard, start_ranks)
from ddt import STATS_CHUNK, float32_logits, log_probs, response_hidden, row_dot, score_examples, spread
from hub import resolve_model_dir
from model import CheckpointError, Transformer, generate
from tokenizer import Tokenizer

Z95 = 1.959963984540054  # two-sided 95% normal quantile
Z80 = 0.8416212335729143  # one-sided 80% normal quantile (power of a planned test)

GENERAL_PROMPTS = [
    "Give me three tips for getting better sleep.",
    "Write a short, friendly email declining a meeting invitation.",
    "What is the difference between weather and climate?",
    "Suggest a simple vegetarian dinner I can cook in 30 minutes.",
    "Explain what a credit score is in two sentences.",
    "How do I politely ask a neighbour to turn their music down?",
    "List five things to pack for a weekend camping trip.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "What are some good ways to start learning a new language?",
    "Explain how a vaccine works to a ten-year-old.",
    "Give me a packing list for a business trip of two days.",
    "How can I keep basil fresh for longer?",
    "Write a two-line birthday message for a coworker.",
    "What should I look for when buying a used bicycle?",
    "Describe the water cycle briefly.",
    "How do I make a budget for the month?",
    "Suggest three indoor activities for a rainy afternoon with kids.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Explain the rules of tic-tac-toe.",
    "Write a short thank-you note to a teacher.",
    "What are the health benefits of walking every day?",
    "How do I remove a coffee stain from a white shirt?",
    "Give me a simple recipe for pancakes.",
    "What is photosynthesis?",
    "Recommend a good routine for a morning stretch of five minutes.",
    "How do I back up the photos on my phone?",
    "Explain what inflation means for everyday shopping.",
    "Write a polite complaint about a late delivery.",
    "What are three ways to save energy at home?",
    "Translate 'good morning, how are you?' into Spanish and French.",
    "How often should I water a cactus?",
    "Give me a short motivational quote and explain it.",
    "What is the difference between a virus and a bacterium?",
    "Plan a one-day sightseeing itinerary for Paris.",
    "How do I prepare for a job interview?",
    "Write a limerick about a cat who loves boxes.",
    "Why do we have leap years?",
    "What are good questions to ask a doctor at a check-up?",
    "Explain how to change a flat bicycle tire.",
    "Suggest a name for a small bakery and say why it fits.",
    "What is the best way to memorize a short speech?",
    "Describe a healthy breakfast.",
    "How do magnets work?",
    "Give three tips for writing a clear email.",
    "What should I do if I lock myself out of my house?",
    "Explain what a password manager is and why it helps.",
    "How can I reduce stress before an exam?",
    "Write a short story of four sentences about a lost umbrella.",
]


# ---- Answers, stops and intervals -------------------------------------------------------------


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (see the module docstring)."""
    if n == 0:
        return 0.0, 1.0
    p, d = k / n, 1 + z * z / n
    center = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    # at k = 0 (k = n) the bound is exactly 0 (1); say so rather than trust the rounding
    return 0.0 if k == 0 else center - half, 1.0 if k == n else center + half


def mcnemar_p_value(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test (see the module docstring): the p-value of `only_a` questions
    answered right by model A alone against `only_b` by model B alone."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired_comparison(correct_a: list[bool], correct_b: list[bool]) -> dict:
    """A against B on the same questions: both verdict lists in the same question order."""
    if len(correct_a) != len(correct_b):
        raise ValueError(f"{len(correct_a)} and {len(correct_b)} verdicts: not the same questions")
    n = len(correct_a)
    only_a = sum(a and not b for a, b in zip(correct_a, correct_b))
    only_b = sum(b and not a for a, b in zip(correct_a, correct_b))
    discordant_share = (only_a + only_b) / n if n else 0.0
    return {"n": n, "only_a": only_a, "only_b": only_b, "difference": (only_a - only_b) / n if n else 0.0,
            "p_value": mcnemar_p_value(only_a, only_b),
            "detectable_difference": detectable_difference(n, discordant_share)}


def detectable_difference(n: int, discordant_share: float) -> float | None:
    """Smallest accuracy difference δ a paired test on n questions detects with 80% power at
    two-sided 5%, given the share ψ of questions the two models disagree on:
    δ ≈ (z_0.975 + z_0.8) · sqrt(ψ / n) (normal approximation to McNemar's test). None when
    no difference is detectable: δ ≥ ψ (the models disagree on too few questions for even a
    one-sided split of them to be significant), or the models never disagree."""
    if not n or not discordant_share:
        return None
    delta = (Z95 + Z80) * math.sqrt(discordant_share / n)
    return delta if delta < discordant_share else None


@dataclass
class Generation:
    tokens: list[int]  # the output up to its stop, the stop token included when produced
    stop: str  # "eos", "length" or "repetition" (model.finish_reason)


def generate_all(model, prompts: list[list[int]], stop_ids, max_new_tokens: int, batch_size: int,
                 desc: str, ranks=None) -> tuple[list[Generation], float]:
    """Greedy outputs for all prompts, in input order, and the seconds spent decoding (under
    torchrun: by the slowest rank; each rank decodes its data.shard of the batches).

    Prompts are batched longest first so rows of a batch need little left padding; padding is
    masked, so the batch a prompt lands in does not change its output.
    """
    ranks = ranks or Ranks()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    mine = shard(order, ranks, batch_size)
    results, seconds = [None] * len(prompts), 0.0
    with tqdm(total=len(mine), desc=desc, unit="q", file=sys.stderr) as bar:
        for start in range(0, len(mine), batch_size):
            batch = mine[start:start + batch_size]
            t0 = time.perf_counter()
            outs, stops = generate(model, [prompts[i] for i in batch], max_new_tokens, stop_ids=stop_ids)
            if model.embed_tokens.weight.is_cuda:
                torch.cuda.synchronize()  # kernels run asynchronously: wait before reading the clock
            seconds += time.perf_counter() - t0
            for i, out, stop in zip(batch, outs, stops):
                results[i] = Generation(out, stop)
            bar.update(len(batch))
    print_shares(len(mine), ranks)
    for i, generation in zip(order, gather_in_order([results[i] for i in mine], ranks, batch_size)):
        results[i] = generation
    return results, max(every_rank(seconds, ranks))


# ---- Distribution metrics ---------------------------------------------------------------------


def token_kl(base_logits: torch.Tensor, model_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_base ‖ p_model) = Σ_v p_base (log p_base − log p_model) per row of two [n, |V|] logit
    chunks, in float32."""
    log_p_base, p_base = log_probs(base_logits)
    log_p_model, _ = log_probs(model_logits)
    return row_dot(p_base, log_p_base.sub_(log_p_model))


@torch.no_grad()
def kl_from_base(base, model, seqs, pad_id: int, batch_size: int, chunk: int = STATS_CHUNK):
    """Per-sequence (Σ_t KL_t(base ‖ model), number of response tokens) over (ids, n_prompt) rows."""
    sums, counts = [], []
    for start in tqdm(range(0, len(seqs), batch_size), desc="  KL from base", file=sys.stderr):
        batch = seqs[start:start + batch_size]
        h_base, _, mask = response_hidden(base, batch, pad_id)
        h_model, _, _ = response_hidden(model, batch, pad_id)
        kl = torch.cat([token_kl(base_logits, model_logits) for base_logits, model_logits in
                        zip(float32_logits(base, h_base, chunk), float32_logits(model, h_model, chunk))])
        sums += spread(mask, kl).sum(-1).tolist()
        counts += mask.sum(-1).tolist()
    return sums, counts


# ---- One model --------------------------------------------------------------------------------


def evaluate_model(model, tok, examples, args, ranks=None) -> tuple[dict, list[dict]]:
    """Accuracy and output statistics of one model: (summary, one row per example)."""
    prompts = [tok.encode_chat(ex.prompt, add_generation_prompt=True) for ex in examples]
    stops = tok.stop_ids
    gens, seconds = generate_all(model, prompts, stops, args.max_new_tokens, args.batch_size, "  answers", ranks)
    rows = []
    for ex, g in zip(examples, gens):
        text = tok.decode([t for t in g.tokens if t not in stops])
        pred, rule = find_answer(text)
        rows.append({"id": ex.id, "line": ex.line, "question": ex.prompt[-1]["content"], "output": text,
                     "gold": ex.answer, "pred": pred, "rule": rule, "correct": answers_match(pred, ex.answer),
                     "stop": g.stop, "n_tokens": len(g.tokens)})
    n, k = len(rows), sum(r["correct"] for r in rows)
    decoded = sum(len(g.tokens) for g in gens)
    summary = {
        "n": n, "correct": k, "accuracy": k / n, "ci95": list(wilson_interval(k, n)),
        "no_answer_share": sum(r["pred"] is None for r in rows) / n,
        "length_limit_share": sum(r["stop"] == "length" for r in rows) / n,
        "repetition_share": sum(r["stop"] == "repetition" for r in rows) / n,
        "avg_output_tokens": sum(r["n_tokens"] for r in rows) / n,
        "decoded_tokens": decoded, "decode_seconds": seconds,
        "tokens_per_s": decoded / seconds if seconds > 0 else None,
    }
    return summary, rows


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def phi_summary(rows: list[dict]) -> dict:
    n = sum(r["n_tokens"] for r in rows)
    return {
        "nll_token_mean": -sum(r["logp_sum"] for r in rows) / n,  # answer NLL per token
        "phi_token_mean": sum(r["phi_sum"] for r in rows) / n,  # Σ over all tokens / number of tokens
        "phi_seq_mean": mean([r["phi_mean"] for r in rows]),  # mean of per-sequence averages
        "z_mean": mean([r["z"] for r in rows]),
        "share_flagged_p05": mean([r["p_value"] < 0.05 for r in rows if r["p_value"] is not None]),
        "share_phi_pos": sum(r["share_phi_pos"] * r["n_tokens"] for r in rows) / n,
        "n_tokens": n,
    }


def load(path: Path, args):
    """(model, tokenizer) from a resolved model directory."""
    model = Transformer.from_pretrained(path, dtype=getattr(torch, args.dtype), device=rank_device(args.device))
    return model, Tokenizer.from_pretrained(path)


def general_prompts(path) -> list[list[dict]]:
    """Chat prompts for the drift measurement: built-in, a .jsonl data file (its prompts), or
    a text file with one instruction per line."""
    if path is None:
        return [[{"role": "user", "content": p}] for p in GENERAL_PROMPTS]
    if str(path).endswith(".jsonl"):
        return [ex.prompt for ex in load_examples(path)]
    if not Path(path).is_file():
        raise UserError(f"{path}: file not found")
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{path}: no prompts (file is empty)")
    return [[{"role": "user", "content": line}] for line in lines]


# ---- Reporting --------------------------------------------------------------------------------


def fmt(x, spec=".3f"):
    return "–" if x is None else format(x, spec)


def markdown_table(results: list[dict]) -> str:
    cols = ["model", "accuracy", "95% CI", "no answer", "length limit", "repetition", "avg tokens", "tokens/s"]
    has_phi, has_kl = any("phi" in r for r in results), any("kl_from_base" in r for r in results)
    cols += ["φ mean (refs)", "z mean (refs)"] * has_phi + ["KL(base‖model)"] * has_kl
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = [r["name"], f"{r['accuracy']:.3f} ({r['correct']}/{r['n']})",
                 f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]", fmt(r["no_answer_share"]),
                 fmt(r["length_limit_share"]), fmt(r["repetition_share"]), fmt(r["avg_output_tokens"], ".1f"),
                 fmt(r["tokens_per_s"], ".1f")]
        if has_phi:
            cells += [fmt(r["phi"]["phi_token_mean"], ".4f"), fmt(r["phi"]["z_mean"], ".2f")]
        if has_kl:
            cells.append(fmt(r.get("kl_from_base", {}).get("kl_token_mean"), ".4f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(results: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in results]
    acc = [r["accuracy"] for r in results]
    err = [[a - r["ci95"][0] for a, r in zip(acc, results)], [r["ci95"][1] - a for a, r in zip(acc, results)]]
    kl = [r.get("kl_from_base", {}).get("kl_token_mean") for r in results]
    panels = 2 if any(k is not None for k in kl) else 1
    fig, axes = plt.subplots(1, panels, figsize=(min(1.6 * len(names), 8) * panels + 2, 4), squeeze=False)
    axes[0, 0].bar(names, acc, yerr=err, capsize=4, color="tab:blue")
    axes[0, 0].set(ylabel="accuracy (95% Wilson CI)", ylim=(0, 1), title="Accuracy")
    if panels == 2:
        axes[0, 1].bar(names, [k or 0.0 for k in kl], color="tab:orange")
        axes[0, 1].set(ylabel="mean per-token KL(base ‖ model)", title="Drift from base")
    for ax in axes[0]:
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def versions() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "code_commit": commit}


def slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", Path(name).name or name).strip("._") or "model"


# ---- Command line -----------------------------------------------------------------------------


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", action="append", required=True,
                    help="HF directory, hub id or the bundled model name; repeat to compare models")
    ap.add_argument("--data", required=True, help="JSONL with questions and gold answers (data.py formats)")
    ap.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N examples only")
    ap.add_argument("--out", default="eval_results.json", help="results JSON; per-model outputs go next to it")
    ap.add_argument("--max-new-tokens", type=positive_int, default=512, help="longest answer")
    ap.add_argument("--batch-size", type=positive_int, default=16, help="sequences per forward")
    ap.add_argument("--ddt", action="store_true", help="also compute φ of the reference solutions per model")
    ap.add_argument("--end-of-turn", action=argparse.BooleanOptionalAction, default=True,
                    help="with --ddt: score each reference's end-of-turn token too, as training sees it; "
                         "--no-end-of-turn scores the text alone, like the authors' demo and its −0.05 / −0.1 "
                         "thresholds")
    ap.add_argument("--base", default=None, help="with --ddt: measure each model's KL(base ‖ model)")
    ap.add_argument("--general-prompts", default=None,
                    help="instructions for the KL drift: text file, one per line, or JSONL (default: built-in 50)")
    ap.add_argument("--general-max-new-tokens", type=positive_int, default=256, help="longest base answer for the KL drift")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="weights dtype (default: bfloat16 on CUDA, float32 on CPU); statistics are float32")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def check_args(args):
    if args.base and not args.ddt:
        raise UserError("--base needs --ddt (the drift is one of the distribution metrics)")
    if args.general_prompts and not args.base:
        raise UserError("--general-prompts needs --base (they are only used for the KL drift)")
    check_input(args.data, "--data")
    check_output(args.out, "--out")


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        check_args(args)
        with lock_output(args.out):
            return run(args, argv if argv is not None else sys.argv[1:])
    except (UserError, CheckpointError) as e:
        return print_error(e)
    except KeyboardInterrupt:
        print("\ninterrupted: results not written (outputs of the models already evaluated are kept)",
              file=sys.stderr)
        return 130


def run(args, argv) -> int:
    ranks = start_ranks()  # under torchrun: each process answers and scores its data.shard of the batches
    examples = load_examples(args.data)[:args.limit]
    for ex in examples:
        if ex.answer is None:
            raise UserError(f"{ex.source}:{ex.line}: no gold answer (no '#### N', \\boxed{{}} or number in the "
                            "response, and no 'final_answer' field)")
    out = Path(args.out)
    # resolve every name first, so a typo in the last --model fails now, not after hours
    model_dirs = [resolve_model_dir(name).resolve() for name in args.model]
    base_dir = resolve_model_dir(args.base).resolve() if args.base else None
    base = base_tok = drift_seqs = None
    if args.base:
        chats = general_prompts(args.general_prompts)
        base, base_tok = load(base_dir, args)
        print(f"base {args.base}: greedy answers to the general prompts", file=sys.stderr)
        prompts = [base_tok.encode_chat(m, add_generation_prompt=True) for m in chats]
        gens, _ = generate_all(base, prompts, base_tok.stop_ids, args.general_max_new_tokens, args.batch_size,
                               "  base", ranks)
        drift_seqs = [(p + g.tokens, len(p)) for p, g in zip(prompts, gens)]

    results = []
    for i, (name, path) in enumerate(zip(args.model, model_dirs)):
        print(f"model {name}", file=sys.stderr)
        model, tok = (base, base_tok) if path == base_dir else load(path, args)
        if base is not None and (tok.vocab_size, model.config.vocab_size) != (base_tok.vocab_size,
                                                                             base.config.vocab_size):
            raise UserError(f"{name}: KL from --base {args.base} needs the same tokenizer and vocabulary")
        summary, rows = evaluate_model(model, tok, examples, args, ranks)
        if args.ddt:
            skip_ids = () if args.end_of_turn else (tok.eos_id,)
            print(f"  φ of the references: {'with' if args.end_of_turn else 'without'} the end-of-turn token",
                  file=sys.stderr)
            seqs = [encode_example(tok, ex) for ex in shard(examples, ranks, args.batch_size)]
            phi_rows = gather_in_order(score_examples(model, seqs, tok.pad_id, args.batch_size, progress=True,
                                                      skip_ids=skip_ids), ranks, args.batch_size)
            for row, phi in zip(rows, phi_rows):
                row["ref_phi"] = phi
            summary["phi"] = phi_summary(phi_rows)
        if base is not None:
            sums, counts = (gather_in_order(part, ranks, args.batch_size) for part in kl_from_base(
                base, model, shard(drift_seqs, ranks, args.batch_size), base_tok.pad_id, args.batch_size))
            summary["kl_from_base"] = {"kl_token_mean": sum(sums) / sum(counts),
                                       "kl_prompt_max": max(s / c for s, c in zip(sums, counts)),
                                       "n_tokens": sum(counts), "n_prompts": len(counts)}
        label = slug(name) if [slug(m) for m in args.model].count(slug(name)) == 1 else f"{i}-{slug(name)}"
        outputs = out.with_name(f"{out.stem}.{label}.jsonl")
        if ranks.main:
            atomic_write(outputs, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        results.append({"name": name, "path": str(path), "outputs": str(outputs), **summary})
        tps = fmt(summary["tokens_per_s"], ".1f")
        print(f"  accuracy {summary['accuracy']:.3f} ({summary['correct']}/{summary['n']}), "
              f"95% CI [{summary['ci95'][0]:.3f}, {summary['ci95'][1]:.3f}], {tps} tokens/s", file=sys.stderr)
        del model  # free it before the next one loads (the base stays referenced by `base`)

    if not ranks.main:  # rank 0 writes the results
        return 0
    table = markdown_table(results)
    print(table, end="")
    record = {
        "command": "python eval.py " + shlex.join(argv), "versions": versions(),
        "data": {"path": str(args.data), "sha256": file_sha256(args.data),
                 "n_examples": len(examples), "limit": args.limit},
        "settings": {k: getattr(args, k) for k in ("max_new_tokens", "batch_size", "device", "dtype", "end_of_turn",
                                                     "general_max_new_tokens", "general_prompts")},
        "base": None if base is None else {"name": args.base, "path": str(base_dir), "n_prompts": len(drift_seqs)},
        "models": results,
    }
    if len(results) > 1:
        record["table"] = str(out.with_suffix(".md"))
        record["chart"] = str(out.with_suffix(".png"))
        atomic_write(out.with_suffix(".md"), table)
        bar_chart(results, out.with_suffix(".png"))
    atomic_write(out, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
