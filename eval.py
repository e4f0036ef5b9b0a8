"""Evaluate models: answer accuracy, and how far each model's distribution moved.

    python eval.py --model M [--model M2 ...] --data test.jsonl [--limit N] [--out results.json]
                   [--ddt [--base M0] [--general-prompts FILE]]

Accuracy. Each question is answered greedily in the model's chat template (batched, KV-cached
`model.generate`, with the stop rule of every decoding loop: end of turn, --max-new-tokens, or
a repeating 30-token window). The final answer is read by data.find_answer ('#### N', then
\\boxed{...}, then the last number) and compared as a number by data.answers_match, the check
hinted_decode.py uses. k correct of n is reported with the Wilson 95% interval

    (p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n),   p̂ = k/n, z = 1.96,

which stays inside [0, 1] and is not empty at k = 0 or k = n.

Distribution metrics (--ddt; float32, full vocabulary, docs/math.md):
  * φ of the data: each model scores the reference solutions under the plain prompt
    (ddt.score_examples): mean φ near 0 means the data is in-distribution for that model.
  * Drift from a base model (--base M0): the base answers everyday instructions greedily
    (GENERAL_PROMPTS, or --general-prompts), and on those answers, per position t,
    KL_t(base ‖ model) = Σ_v p_base(v) (log p_base(v) − log p_model(v)), averaged over all
    answer tokens: the "forgetting" IDFT is meant to reduce.

Outputs for --out R.json: R.json (every metric, the command, versions, the data's sha256),
R.<model>.jsonl (one row per question), and with several models R.md and R.png. None may be an
input, and an existing one is replaced only if eval.py wrote it (R.json and the rows by their
keys, R.md and R.png when R.json lists them). torchrun shares the questions out
(plumbing/records.py); the files equal a one-process run's.
"""

import argparse
import json
import math
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data import answers_match, encode_example, find_answer, load_examples
from ddt import STATS_CHUNK, float32_logits, log_probs, response_hidden, row_sum, score_examples, spread
from hub import resolve_model_dir
from model import Transformer, check_vocabulary, generate, read_config
from plumbing.cli import ArgumentParser, UserError, positive_int, run_cli
from plumbing.files import (atomic_write, check_disjoint, check_input, check_output, check_replaceable, file_sha256,
                            lock_output, lock_path, read_json, written_by)
from plumbing.precision import DTYPES, compute_dtype
from plumbing.report import bar_chart, fmt, markdown_table, versions
from plumbing.ranks import Ranks, every_rank, rank_device, start_ranks
from plumbing.records import map_sharded
from tokenizer import Tokenizer

Z95 = 1.959963984540054  # two-sided 95% normal quantile


# ---- Accuracy ---------------------------------------------------------------------------------


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (see the module docstring)."""
    if n == 0:
        return 0.0, 1.0
    p, d = k / n, 1 + z * z / n
    center = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    # at k = 0 (k = n) the bound is exactly 0 (1); say so rather than trust the rounding
    return 0.0 if k == 0 else center - half, 1.0 if k == n else center + half


@dataclass
class Generation:
    tokens: list[int]  # the output up to its stop, the stop token included when produced
    stop: str  # "eos", "length" or "repetition" (model.finish_reason)


def generate_all(model, prompts: list[list[int]], stop_ids, max_new_tokens: int, batch_size: int,
                 desc: str, ranks=None) -> tuple[list[Generation], float]:
    """Greedy outputs for all prompts, in input order, and the seconds spent decoding (under
    torchrun: by the slowest rank; each rank decodes its share of the batches).

    Prompts are batched longest first so rows of a batch need little left padding; padding is
    masked, so the batch a prompt lands in does not change its output.
    """
    ranks = ranks or Ranks()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    seconds = 0.0

    def work(batch):
        nonlocal seconds
        t0 = time.perf_counter()
        outs, stops = generate(model, [prompts[i] for i in batch], max_new_tokens, stop_ids=stop_ids)
        if model.embed_tokens.weight.is_cuda:
            torch.cuda.synchronize()  # kernels run asynchronously: wait before reading the clock
        seconds += time.perf_counter() - t0
        return [Generation(out, stop) for out, stop in zip(outs, stops)]

    results = [None] * len(prompts)
    for i, generation in zip(order, map_sharded(order, work, ranks, batch_size, desc=desc, unit="q")):
        results[i] = generation
    return results, max(every_rank(seconds, ranks))


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


# ---- Distribution metrics ---------------------------------------------------------------------


def token_kl(base_logits: torch.Tensor, model_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_base ‖ p_model) = Σ_v p_base (log p_base − log p_model) per row of two [n, |V|] logit
    chunks, in float32."""
    return row_sum(lambda lp, lq: lp.exp() * (lp - lq), log_probs(base_logits), log_probs(model_logits))


@torch.no_grad()
def kl_from_base(base, model, seqs, pad_id: int, batch_size: int, chunk: int = STATS_CHUNK):
    """Per-sequence (Σ_t KL_t(base ‖ model), number of response tokens) over (ids, n_prompt) rows."""
    sums, counts = [], []
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start:start + batch_size]
        h_base, _, mask = response_hidden(base, batch, pad_id)
        h_model, _, _ = response_hidden(model, batch, pad_id)
        kl = torch.cat([token_kl(base_logits, model_logits) for base_logits, model_logits in
                        zip(float32_logits(base, h_base, chunk), float32_logits(model, h_model, chunk))])
        sums += spread(mask, kl).sum(-1).tolist()
        counts += mask.sum(-1).tolist()
    return sums, counts


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


def load(path: Path, args, tokenizer=None):
    """(model, tokenizer) from a resolved model directory (its tokenizer: loaded already, or now)."""
    model = Transformer.from_pretrained(path, dtype=getattr(torch, args.dtype), device=rank_device(args.device))
    tokenizer = tokenizer or Tokenizer.from_pretrained(path)
    check_vocabulary(tokenizer, model.config.vocab_size, path)
    return model, tokenizer


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


# ---- The evaluation ---------------------------------------------------------------------------


def run(args, argv) -> int:
    ranks = start_ranks()  # under torchrun: each process answers and scores its share of the batches
    examples = load_examples(args.data)[:args.limit]
    for ex in examples:
        if ex.answer is None:
            raise UserError(f"{ex.source}:{ex.line}: no gold answer (no '#### N', \\boxed{{}} or number in the "
                            "response, and no 'final_answer' field)")
    out = Path(args.out)
    # resolve every name first, so a typo in the last --model fails now, not after hours
    model_dirs = [resolve_model_dir(name).resolve() for name in args.model]
    base_dir = resolve_model_dir(args.base).resolve() if args.base else None
    # and every tokenizer, checked against its model's vocabulary, before the first model computes
    named = [*zip(args.model, model_dirs), *([(args.base, base_dir)] if args.base else [])]
    tokenizers = {path: Tokenizer.from_pretrained(path) for _, path in named}
    for name, path in named:
        check_vocabulary(tokenizers[path], read_config(path).vocab_size, name)
    base = base_tok = drift_seqs = None
    if args.base:
        chats = general_prompts(args.general_prompts)
        base, base_tok = load(base_dir, args, tokenizers[base_dir])
        print(f"base {args.base}: greedy answers to the general prompts", file=sys.stderr)
        prompts = [base_tok.encode_chat(m, add_generation_prompt=True) for m in chats]
        gens, _ = generate_all(base, prompts, base_tok.stop_ids, args.general_max_new_tokens, args.batch_size,
                               "  base", ranks)
        drift_seqs = [(p + g.tokens, len(p)) for p, g in zip(prompts, gens)]

    results = []
    for i, (name, path) in enumerate(zip(args.model, model_dirs)):
        print(f"model {name}", file=sys.stderr)
        model, tok = (base, base_tok) if path == base_dir else load(path, args, tokenizers[path])
        if base is not None and (tok.vocab_size, model.config.vocab_size) != (base_tok.vocab_size,
                                                                             base.config.vocab_size):
            raise UserError(f"{name}: KL from --base {args.base} needs the same tokenizer and vocabulary")
        summary, rows = evaluate_model(model, tok, examples, args, ranks)
        if args.ddt:
            skip_ids = () if args.end_of_turn else (tok.eos_id,)
            print(f"  φ of the references: {'with' if args.end_of_turn else 'without'} the end-of-turn token",
                  file=sys.stderr)
            phi_rows = map_sharded(examples, lambda batch: score_examples(
                model, [encode_example(tok, ex) for ex in batch], tok.pad_id, args.batch_size, skip_ids=skip_ids),
                ranks, args.batch_size, desc="  scoring")
            for row, phi in zip(rows, phi_rows):
                row["ref_phi"] = phi
            summary["phi"] = phi_summary(phi_rows)
        if base is not None:
            sums, counts = zip(*map_sharded(drift_seqs, lambda batch: list(zip(*kl_from_base(
                base, model, batch, base_tok.pad_id, args.batch_size))), ranks, args.batch_size, desc="  KL from base"))
            summary["kl_from_base"] = {"kl_token_mean": sum(sums) / sum(counts),
                                       "kl_prompt_max": max(s / c for s, c in zip(sums, counts)),
                                       "n_tokens": sum(counts), "n_prompts": len(counts)}
        outputs = rows_path(out, args.model, i)
        if ranks.main:
            atomic_write(outputs, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        results.append({"name": name, "path": str(path), "outputs": str(outputs), **summary})
        tps = fmt(summary["tokens_per_s"], ".1f")
        print(f"  accuracy {summary['accuracy']:.3f} ({summary['correct']}/{summary['n']}), "
              f"95% CI [{summary['ci95'][0]:.3f}, {summary['ci95'][1]:.3f}], {tps} tokens/s", file=sys.stderr)
        model = None  # free it before the next one loads (the base stays referenced by `base`)

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
    atomic_write(out, json.dumps(record, indent=2, ensure_ascii=False) + "\n")  # first: it claims the table and chart
    if len(results) > 1:
        atomic_write(out.with_suffix(".md"), table)
        bar_chart(results, out.with_suffix(".png"))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", Path(name).name or name).strip("._") or "model"


def rows_path(out: Path, names: list[str], i: int) -> Path:
    """R.<model>.jsonl, the answers of the i-th --model (with its index when two names share a slug)."""
    slugs = [slug(name) for name in names]
    label = slugs[i] if slugs.count(slugs[i]) == 1 else f"{i}-{slugs[i]}"
    return out.with_name(f"{out.stem}.{label}.jsonl")


RESULTS_KEYS = ("command", "versions", "data", "models")  # eval.py's marks: every results file has these keys,
ROW_KEYS = ("id", "question", "output", "gold", "pred", "correct", "stop")  # and every line of an answers file


def check_outputs(args):
    """Every file eval.py will write: none is an input, and an existing one is replaced only if
    eval.py wrote it (the results and the answers by their keys; the table and the chart when
    the results file names them)."""
    out = Path(args.out)
    rows = [rows_path(out, args.model, i) for i in range(len(args.model))]
    side = [out.with_suffix(".md"), out.with_suffix(".png")] if len(args.model) > 1 else []
    outputs = [out, *rows, *side]
    if len(set(outputs)) < len(outputs):
        raise UserError(f"--out {out}: the results, answers, table and chart would share a file; name it NAME.json")
    check_disjoint([("--out", p) for p in (*outputs, lock_path(out))],
                   [("--data", args.data), ("--general-prompts", args.general_prompts), ("--base", args.base),
                    *(("--model", name) for name in args.model)])
    check_replaceable(out, "--out", "eval.py", lambda p: written_by(p, RESULTS_KEYS))
    for path in rows:
        check_replaceable(path, "--out", "eval.py", lambda p: written_by(p, ROW_KEYS))
    claimed = read_json(out) if side and written_by(out, RESULTS_KEYS) else {}
    names = {Path(str(claimed.get(key))).name for key in ("table", "chart")}
    for path in side:
        check_replaceable(path, "--out", "eval.py", lambda p: p.name in names)


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
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help="weights dtype (default: bfloat16 on CUDA, float32 on CPU); statistics are float32")
    args = ap.parse_args(argv)
    args.dtype = compute_dtype(args.dtype, args.device)
    return args


def check_args(args):
    if args.base and not args.ddt:
        raise UserError("--base needs --ddt (the drift is one of the distribution metrics)")
    if args.general_prompts and not args.base:
        raise UserError("--general-prompts needs --base (they are only used for the KL drift)")
    check_input(args.data, "--data")
    args.out = str(check_output(args.out, "--out"))  # its real path: one output under any spelling
    check_outputs(args)


def main(argv=None) -> int:
    def run_checked(argv):
        args = parse_args(argv)
        check_args(args)
        with lock_output(args.out):
            return run(args, argv if argv is not None else sys.argv[1:])

    return run_cli(run_checked, argv, interrupted="interrupted: results not written (outputs of the models "
                                                  "already evaluated are kept)")


# Everyday instructions for the drift measurement (--base): far from the training task.
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


if __name__ == "__main__":
    sys.exit(main())
