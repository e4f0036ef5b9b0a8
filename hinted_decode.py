"""Hinted decoding: rewrite a reference solution into the model's own words (SPEC §4).

One model, two prompts per example, decoded together token by token:

    hint stream   p_t = π_θ(· | hint prompt, y_<t)    the question, the reference solution and
                  an instruction to solve the problem as if for the first time (HINT_TEMPLATE)
    plain stream  q_t = π_θ(· | plain prompt, y_<t)   the question alone, as at training time

At every step, for the B examples still decoding (`hinted_generate`'s loop, in this order):

    h_t = H(p_t) / log|V|                  normalized entropy of the hint stream, in [0, 1]
                                           (ddt.entropy); |V| = the tokenizer's real vocabulary
                                           (regular + special tokens), not the possibly padded
                                           embedding rows, so h = 1 means "uniform over tokens"
    λ_t = clamp(β · h_t, 0, 1)             mode "linear" (default)         `mixing_weight`
        = σ(β · (h_t − c))                 mode "sigmoid", c = sigmoid_center
        = 0 below h1, 1 above h2, linear   mode "piecewise", (h1, h2) = piecewise_bounds (β unused)
    λ_t = 1 once the text so far contains the splitter (`\\boxed{`, or `####` for GSM8K): the
          plain stream alone to the end, so the final answer is the model's own
    λ_t = 0 for the first token: the hint stream alone
    z_t = (1 − λ_t) log p_t + λ_t log q_t  the geometric mixture m ∝ p^(1−λ) q^λ in log space
                                           (`log_mixture`)
    y_t ~ z_t                              argmax at temperature 0, else top-p then temperature
                                           (model.sample_next), appended to *both* streams

Where the hint stream is sure (a number, a key step) it leads; where it hesitates (phrasing,
connectives, length) the model's own plain stream leads. Stops (model.finish_reason, the rule
`generate` uses too): a stop id, max_new_tokens, or some 30-token window seen 5 times (checked
every 100 tokens). β = 0 in linear mode is the "self-distillation" baseline (pure hint stream).

Unlike the authors' demo (two model copies, batch 1, two forwards per token, no KV cache, so
every step recomputes the whole prefix), `hinted_generate` stacks the B hint rows and the B
plain rows of a batch into one batch of 2B rows through one copy of the weights, with a static
KV cache, left padding and per-row positions (model.KVCache): one forward per token for all
rows. When a quarter of the examples still in the batch have finished, their rows are dropped
from the batch and the cache. On CUDA the one-token forward is compiled with CUDA graphs
(model.decode_step).

The pipeline (`python hinted_decode.py --data FILE.jsonl --out OUT.jsonl`):
  1. the model answers every question plainly; answers that verify are kept ("on_policy");
  2. the failures are rewritten by hinted decoding (optionally after a greedy "# Analysis"
  prefix, cut at the last "# CoT" header); 3. rewrites that verify are kept ("hinted"), the
  others are recorded as "failed"; 4. each record carries the φ statistics (ddt.py: average
  φ, z, shares of φ_t above −1/−3/−5) of the new response and of the reference, both scored
  under the plain prompt exactly as training will tokenize them.
"Verify" = the response ended with EOS and data.answers_match(data.extract_answer(response),
gold), the one answer check eval.py uses too. Kept records go to OUT.jsonl, a valid --data
file for train.py; failed ones to OUT.failed.jsonl. Records are appended and flushed one by
one; a rerun skips the example ids already recorded, cuts off a torn last line left by a
crash, and refuses files whose records are not examples of --data. The decoding settings (β,
mode, --max-new-tokens, sampling, model, ...) are stored in OUT.settings.json before the first
record, and an --out is only extended with the same ones. One run at a time per --out (an
advisory lock, data.OutputLock). At the end both files are rewritten in --data order
(`merge_outputs`). Sampling draws each example's tokens from its own generator, seeded from
--seed and the example's id (data.example_seed).

Data parallel (`torchrun --nproc_per_node N hinted_decode.py --data ... --out ...`): rank r
takes batches r, r + N, ... of --data (data.shard), decodes them on cuda:LOCAL_RANK (or the
CPU) and appends to its own OUT.part-r-of-N.jsonl; once all ranks are done, rank 0 merges
every file of --out into OUT.jsonl and OUT.failed.jsonl in --data order and removes the parts.
The final files are the same, record for record, as a one-process run's. A resume with any
number of processes skips every example recorded in any file of --out (final or part, of any
earlier number of processes) and shares out the rest by the same rule. --out must be on a
file system every node sees. Only rank 0 prints (its own progress bar: its share).
`python hinted_decode.py` alone runs a demo on the bundled model.
"""

import argparse
import glob
import json
import math
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from data import (ArgumentParser, Example, UserError, answers_match, append_record, atomic_write, changed_settings,
                  check_input, check_output, drop_torn_tail, encode_example, example_seed, extract_answer, find_answer,
                  fraction, load_examples, lock_output, nonnegative_float, nonnegative_int, positive_int, print_error,
                  print_shares, probability, rank_device, read_log, shard, start_ranks)
from ddt import entropy, log_probs, score_examples
from model import (CheckpointError, KVCache, Transformer, decode_step, finish_reason, generate, last_logits, left_pad,
                   row_generators, sample_next, worth_compacting)

MODES = ("linear", "sigmoid", "piecewise")
PREFILL_ROWS = 16  # prompt rows run through the model at once: bounds the prefill's activations
ANALYSIS_HEADER = "# CoT"  # the analysis prefix is cut at the last line starting with this

HINT_TEMPLATE = """I'm giving you a problem together with a worked solution that is known to be correct.

Problem:
{question}

Worked solution:
{reference}

{task}"""
HINT_TASK = (
    "Now solve the problem yourself, step by step, in your own words, the way you would "
    "if you had never seen the worked solution. Reach the same final answer, and state it "
    "at the end in the same format the worked solution uses. Do not mention, quote or "
    "refer to the worked solution."
)
HINT_TASK_ANALYSIS = (
    "Write two sections. First, under the header '# Analysis', go briefly through the worked "
    "solution and note its key steps. Then, under the header '# CoT', solve the problem "
    "yourself, step by step, in your own words, as if you had never seen the worked solution; "
    "reach the same final answer and state it at the end in the same format the worked "
    "solution uses. The '# CoT' section must not mention the worked solution."
)
SPLITTERS = {"####": "####", "boxed": "\\boxed{"}  # find_answer's rule -> the text that switches streams

DEMO_QUESTION = (
    "A baker makes 36 muffins in the morning and twice as many in the afternoon. She sells 50 "
    "of them. How many muffins does she have left? Give the result as your final answer. "
    "Do not include units."
)
DEMO_REFERENCE = (
    "In the afternoon she makes 2 * 36 = 72 muffins.\n"
    "Altogether she makes 36 + 72 = 108 muffins.\n"
    "After selling 50 she has 108 - 50 = 58 muffins left.\n"
    "#### 58"
)


# ---- The mixing rule ---------------------------------------------------------------------------


def mixing_weight(h: torch.Tensor, beta: float, mode: str = "linear", sigmoid_center: float = 0.5,
                  piecewise_bounds: tuple[float, float] = (0.3, 0.7)) -> torch.Tensor:
    """λ from the hint stream's normalized entropy h ([B] tensor): the weight of the plain stream."""
    if mode == "linear":
        return (beta * h).clamp(0.0, 1.0)
    if mode == "sigmoid":
        return torch.sigmoid(beta * (h - sigmoid_center))
    if mode == "piecewise":
        h1, h2 = piecewise_bounds
        return ((h - h1) / (h2 - h1)).clamp(0.0, 1.0)
    raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")


def log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """z = (1 − λ) log p + λ log q per row ([B, |V|], λ [B]): the geometric mixture m ∝ p^(1−λ) q^λ
    in log space (unnormalized; argmax, top-p and temperature do not need the constant)."""
    return (1.0 - lam)[:, None] * log_p + lam[:, None] * log_q


# ---- Batched two-stream decoding ---------------------------------------------------------------


def prefill(model: Transformer, tokens, cache: KVCache, n_hint: int) -> torch.Tensor:
    """Run the left-padded prompts [R, W] into the cache, PREFILL_ROWS rows at a time, hint rows
    and plain rows apart. A chunk starts at its first slot that is not padding in every row:
    the short plain prompts do not pay for the width of the long hint prompts. Row slices of
    the cache are views, so each chunk writes its rows of the one shared cache."""
    R = tokens.shape[0]
    slots = torch.arange(tokens.shape[1], device=tokens.device)
    out = []
    for lo, hi in ((0, n_hint), (n_hint, R)):
        for r in range(lo, hi, PREFILL_ROWS):
            rows = slice(r, min(r + PREFILL_ROWS, hi))
            start = int(cache.pad[rows].min())
            part = KVCache(cache.k[:, rows], cache.v[:, rows], cache.pad[rows])
            out.append(last_logits(model, tokens[rows, start:], slots[start:], part))
    return torch.cat(out)


@torch.no_grad()
def hinted_generate(model: Transformer, hint_prompts: list[list[int]], plain_prompts: list[list[int]], *,
                    beta: float, mode: str = "linear", max_new_tokens: int, stop_ids=(),
                    temperature: float = 0.0, top_p: float = 1.0, first_from_hint: bool = True,
                    splitter=None, tokenizer=None, seed=None, sigmoid_center: float = 0.5,
                    piecewise_bounds: tuple[float, float] = (0.3, 0.7), repetition_stop: bool = True,
                    compile: bool | None = None) -> tuple[list[list[int]], list[str]]:
    """Hinted decoding of B examples at once.

    hint_prompts[b] / plain_prompts[b]: token ids of example b's two prompts (chat-templated,
    ending where the response starts). splitter: None, one string for every example, or one
    string (or None) per example; it needs `tokenizer` (anything with decode(ids) -> str) to
    read the text. |V| for h is tokenizer.vocab_size, or the model's vocabulary without one.
    repetition_stop=False decodes on through repeated windows (benchmarks with fixed lengths).
    seed: None, an int, or one seed per example (model.row_generators: each example samples
    from its own generator). compile: compile the decode step (default: on CUDA only).

    Returns (tokens, finish): tokens[b] are the new ids, up to and including the stop id when
    one is produced; finish[b] is "eos", "length" or "repetition" (model.finish_reason).
    """
    B = len(hint_prompts)
    if B == 0 or len(plain_prompts) != B:
        raise ValueError(f"need the same non-zero number of hint and plain prompts, got {B} and {len(plain_prompts)}")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    splitters = list(splitter) if isinstance(splitter, (list, tuple)) else [splitter] * B
    if len(splitters) != B:
        raise ValueError(f"got {len(splitters)} splitters for {B} examples")
    if any(splitters) and tokenizer is None:
        raise ValueError("a splitter is matched on the decoded text: pass tokenizer= as well")
    device = model.output_weight.device
    compile = device.type == "cuda" if compile is None else compile
    forward = decode_step(compile)
    stop_ids = frozenset(stop_ids)
    log_vocab = math.log(tokenizer.vocab_size if tokenizer is not None else model.config.vocab_size)
    generators = row_generators(seed, B, device)

    # Rows 0..B−1 are the hint streams, rows B..2B−1 the plain streams, in one left-padded batch.
    tokens, pad = left_pad(list(hint_prompts) + list(plain_prompts), 0, device)
    width = tokens.shape[1]
    cache = model.new_cache(pad, width + max_new_tokens)
    if compile:
        cache.mark_static()
    logits = prefill(model, tokens, cache, B)

    out = [[] for _ in range(B)]
    finish = [None] * B
    switched = [False] * B  # the splitter has appeared: the plain stream alone from now on
    active = list(range(B))  # the example behind each row pair still in the batch
    for step in range(max_new_tokens):
        n = len(active)
        log_p, p = log_probs(logits[:n])  # hint stream p_t
        log_q, _ = log_probs(logits[n:])  # plain stream q_t
        h = entropy(log_p, p) / log_vocab  # the hint stream's normalized entropy, in [0, 1]
        lam = mixing_weight(h, beta, mode, sigmoid_center, piecewise_bounds)
        lam = torch.where(torch.tensor([switched[b] for b in active], device=device), 1.0, lam)
        if step == 0 and first_from_hint:
            lam = torch.zeros_like(lam)  # the first token comes from the hint stream alone
        nxt = sample_next(log_mixture(log_p, log_q, lam), temperature, top_p, generators)
        for b, t in zip(active, nxt.tolist()):
            if finish[b] is not None:  # a finished row that is still in the batch: ignore it
                continue
            out[b].append(t)
            finish[b] = finish_reason(out[b], stop_ids, max_new_tokens, repetition_stop)
            if finish[b] is None and splitters[b] and not switched[b]:
                # the newest text can only complete a first occurrence in its last len(splitter) bytes
                tail = out[b][-len(splitters[b].encode("utf-8")):]
                switched[b] = splitters[b] in tokenizer.decode(tail)
        keep = [i for i, b in enumerate(active) if finish[b] is None]
        if not keep:
            break
        if worth_compacting(n, len(keep)):
            idx = torch.tensor(keep, device=device)
            cache = cache.select(torch.cat([idx, idx + n]), compile)
            nxt, active = nxt[idx], [active[i] for i in keep]
            generators = generators and [generators[i] for i in keep]
        slot = torch.tensor([width + step], device=device)
        logits = forward(model, torch.cat([nxt, nxt])[:, None], slot, cache).float()
    return out, finish


# ---- Prompts -----------------------------------------------------------------------------------


def question_of(example: Example) -> str:
    """The last user message: the question the response answers."""
    return next(m["content"] for m in reversed(example.prompt) if m["role"] == "user")


def hint_messages(example: Example, analysis: bool = False) -> list[dict]:
    """The example's chat with the last user turn replaced by the hint (question + reference)."""
    last_user = max(i for i, m in enumerate(example.prompt) if m["role"] == "user")
    hint = HINT_TEMPLATE.format(question=example.prompt[last_user]["content"], reference=example.response,
                                task=HINT_TASK_ANALYSIS if analysis else HINT_TASK)
    return [*example.prompt[:last_user], {"role": "user", "content": hint}, *example.prompt[last_user + 1:]]


def cut_analysis(text: str) -> str | None:
    """The analysis prefix: text up to and including the last line that starts with the
    '# CoT' header, or None when there is no such header."""
    lines = text.splitlines(keepends=True)
    last = max((i for i, line in enumerate(lines) if line.lstrip().startswith(ANALYSIS_HEADER)), default=None)
    if last is None:
        return None
    prefix = "".join(lines[:last + 1])
    return prefix if prefix.endswith("\n") else prefix + "\n"


def auto_splitter(example: Example) -> str | None:
    """The splitter that matches how the reference states its answer ('####' or '\\boxed{')."""
    return SPLITTERS.get(find_answer(example.response)[1])


def strip_stop(ids: list[int], stop_ids) -> list[int]:
    """The response without the stop token that ended it."""
    return ids[:-1] if ids and ids[-1] in stop_ids else ids


def accept(text: str, finish: str, gold: str) -> bool:
    """Keep a response only if the model ended it (EOS) and its final answer verifies."""
    return finish == "eos" and answers_match(extract_answer(text), gold)


# ---- φ statistics of a response under the plain prompt ----------------------------------------

PHI_KEYS = ("n_tokens", "phi_mean", "z", "share_phi_gt_-1", "share_phi_gt_-3", "share_phi_gt_-5")


def phi_stats(model: Transformer, tokenizer, prompt: list[dict], response: str) -> dict:
    """Average φ, z and the shares of φ_t > −1/−3/−5 of `response` as training will see it
    (data.encode_example: chat prompt, response, end of turn), scored by ddt.py."""
    seq = encode_example(tokenizer, Example("", prompt, response, None, 0, ""))
    row = score_examples(model, [seq], tokenizer.pad_id, batch_size=1)[0]
    return {k: row[k] for k in PHI_KEYS}


# ---- Output file: append-only, resumable -------------------------------------------------------


def failed_path(out: Path) -> Path:
    """Failed rewrites go next to --out (OUT.failed.jsonl), so --out holds only training data."""
    return out.with_name(out.stem + ".failed" + (out.suffix or ".jsonl"))


# The settings that shape the records, stored in OUT.settings.json before the first record: an
# --out is only extended with the same ones. --data is checked record by record (check_resume);
# --limit, --batch-size, --device and --quiet may change.
DECODING_SETTINGS = ("model", "beta", "mode", "sigmoid_center", "piecewise_bounds", "max_new_tokens", "temperature",
                     "top_p", "seed", "splitter", "analysis", "analysis_max_tokens")


def settings_path(out: Path) -> Path:
    return out.with_name(out.stem + ".settings.json")


def decoding_settings(args) -> dict:
    settings = {k: getattr(args, k) for k in DECODING_SETTINGS}
    settings["piecewise_bounds"] = list(settings["piecewise_bounds"])  # as JSON gives it back
    return settings


def check_settings(out: Path, args, has_records: bool):
    """Refuse to extend an --out made with other decoding settings (or with unknown ones)."""
    path = settings_path(out)
    if not path.exists():
        if has_records:
            raise UserError(f"--out {out}: holds records but no {path.name}, so the settings they were made with "
                            "are unknown; choose another --out")
        return
    try:
        saved = json.loads(path.read_text())["settings"]
    except (json.JSONDecodeError, KeyError, TypeError):
        saved = None
    if not isinstance(saved, dict):
        raise UserError(f"{path}: not written by hinted_decode.py (no 'settings'); choose another --out")
    changed = changed_settings(saved, decoding_settings(args))
    if changed:
        raise UserError(f"--out {out} was made with other settings: {'; '.join(changed)}; rerun with those or "
                        "choose another --out")


def check_resume(examples: list[Example], files: dict) -> dict[str, dict]:
    """Records already written (files: path -> data.read_log result), by example id; refuse
    files written by another program or from another --data."""
    by_id = {ex.id: ex for ex in examples}
    done = {}
    for path, (records, _) in files.items():
        for rec in records:
            where = f"{path}:{rec.pop('_line')}"
            if "id" not in rec or "prompt" not in rec:
                raise UserError(f"{where}: not a hinted_decode.py record (no 'id' or 'prompt' field)")
            ex = by_id.get(str(rec["id"]))
            if ex is None or (rec["prompt"], rec.get("reference"), rec.get("final_answer")) != (
                    ex.prompt, ex.response, ex.answer):
                raise UserError(f"{where}: record {rec['id']!r} is not an example of --data {examples[0].source} as it "
                                f"is now (written from another file, or an edited one?); choose another --out")
            if ex.id in done and done[ex.id] != rec:  # an identical copy: a merge was interrupted
                raise UserError(f"{where}: example {ex.id!r} is recorded twice; choose another --out")
            done[ex.id] = rec
    return done


def part_path(out: Path, ranks) -> Path:
    """Where rank r of a W-process run appends its records, kept and failed: OUT.part-r-of-W.jsonl."""
    return out.with_name(f"{out.stem}.part-{ranks.rank}-of-{ranks.world}{out.suffix or '.jsonl'}")


def output_files(out: Path) -> list[Path]:
    """Every file of --out that may hold records: OUT.jsonl, OUT.failed.jsonl and the part files
    of unfinished multi-process runs, of any number of processes."""
    part = re.compile(rf"{re.escape(out.stem)}\.part-\d+-of-\d+{re.escape(out.suffix or '.jsonl')}")
    parts = sorted(p for p in out.parent.glob(glob.escape(out.stem) + ".part-*") if part.fullmatch(p.name))
    return [out, failed_path(out), *parts]


def append_paths(out: Path, ranks) -> tuple[Path, Path]:
    """The files this process appends its kept and failed records to: OUT.jsonl and
    OUT.failed.jsonl in a one-process run; its own part file under torchrun."""
    if ranks.world == 1:
        return out, failed_path(out)
    return part_path(out, ranks), part_path(out, ranks)


def merge_outputs(examples: list[Example], out: Path) -> list[dict]:
    """Once every process has finished: all records of all files of --out, one per example in
    --data order, rewritten into OUT.jsonl and OUT.failed.jsonl, the part files removed. So the
    final files do not depend on the number of processes, on batches or on interruptions."""
    files = output_files(out)
    order = {ex.id: i for i, ex in enumerate(examples)}
    done = check_resume(examples, {path: read_log(path, "hinted_decode.py") for path in files})
    records = sorted(done.values(), key=lambda r: order[str(r["id"])])

    def write(tmp, kept: bool):
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for r in records:
                if (r["source"] != "failed") == kept:
                    append_record(f, r)

    atomic_write(out, lambda tmp: write(tmp, kept=True))
    atomic_write(failed_path(out), lambda tmp: write(tmp, kept=False))
    for part in files[2:]:
        part.unlink()
    return records


# ---- The pipeline ------------------------------------------------------------------------------


def make_record(model, tokenizer, ex: Example, text: str | None, source: str, finish: str,
                reference_phi: dict) -> dict:
    """One output line; text None: no response was written (the analysis step failed).
    "prompt" + "response" + "final_answer" make it a valid --data line for train.py."""
    return {
        "id": ex.id, "prompt": ex.prompt, "response": text or "", "final_answer": ex.answer,
        "question": question_of(ex), "reference": ex.response, "source": source, "finish_reason": finish,
        "predicted_answer": None if text is None else extract_answer(text),
        "phi": None if text is None else phi_stats(model, tokenizer, ex.prompt, text),
        "phi_reference": reference_phi,
    }


def seeds(args, examples: list[Example], stage: str) -> list[int] | None:
    """One sampling seed per example (data.example_seed): its tokens do not depend on its batch or rank."""
    return None if args.seed is None else [example_seed(args.seed, ex.id, stage) for ex in examples]


def rewrite_batch(model, tokenizer, batch: list[Example], args, write):
    """Steps 1-4 of the pipeline for one batch; `write(record)` appends a record."""
    stops = tokenizer.stop_ids
    plain = [tokenizer.encode_chat(ex.prompt, add_generation_prompt=True) for ex in batch]
    own, own_finish = generate(model, plain, args.max_new_tokens, stop_ids=stops, temperature=args.temperature,
                               top_p=args.top_p, seed=seeds(args, batch, "own"))
    ref_phi = {ex.id: phi_stats(model, tokenizer, ex.prompt, ex.response) for ex in batch}
    todo = []
    for ex, ids, finish, prompt in zip(batch, own, own_finish, plain):
        text = tokenizer.decode(strip_stop(ids, stops))
        if accept(text, finish, ex.answer):
            write(make_record(model, tokenizer, ex, text, "on_policy", finish, ref_phi[ex.id]))
        else:
            todo.append((ex, prompt))
    if not todo:
        return

    hints = [tokenizer.encode_chat(hint_messages(ex, args.analysis), add_generation_prompt=True) for ex, _ in todo]
    if args.analysis:  # greedy "# Analysis ... # CoT" prefix, cut at the last '# CoT' header
        drafts, _ = generate(model, hints, args.analysis_max_tokens, stop_ids=stops)
        kept = []
        for (ex, prompt), hint, draft in zip(todo, hints, drafts):
            prefix = cut_analysis(tokenizer.decode(strip_stop(draft, stops)))
            if prefix is None:
                print(f"{ex.source}:{ex.line}: no '{ANALYSIS_HEADER}' header in the analysis; skipped", file=sys.stderr)
                write(make_record(model, tokenizer, ex, None, "failed", "no_analysis", ref_phi[ex.id]))
            else:
                kept.append(((ex, prompt), hint + tokenizer.encode(prefix)))
        if not kept:
            return
        todo, hints = [k[0] for k in kept], [k[1] for k in kept]

    splitters = [auto_splitter(ex) if args.splitter == "auto" else args.splitter for ex, _ in todo]
    new, finishes = hinted_generate(
        model, hints, [p for _, p in todo], beta=args.beta, mode=args.mode, max_new_tokens=args.max_new_tokens,
        stop_ids=stops, temperature=args.temperature, top_p=args.top_p, splitter=splitters, tokenizer=tokenizer,
        seed=seeds(args, [ex for ex, _ in todo], "hinted"), sigmoid_center=args.sigmoid_center,
        piecewise_bounds=tuple(args.piecewise_bounds))
    for (ex, _), ids, finish in zip(todo, new, finishes):
        text = tokenizer.decode(strip_stop(ids, stops))
        source = "hinted" if accept(text, finish, ex.answer) else "failed"
        write(make_record(model, tokenizer, ex, text, source, finish, ref_phi[ex.id]))


def summarize(records: list[dict], seconds: float, n_run: int):
    counts = Counter(r["source"] for r in records)
    print("sources: " + ", ".join(f"{s} {counts.get(s, 0)}" for s in ("on_policy", "hinted", "failed")))
    kept = [r for r in records if r["source"] != "failed" and r["phi"] and r["phi_reference"]]
    if kept:
        mean = lambda key, field: sum(r[key][field] for r in kept) / len(kept)
        print(f"kept {len(kept)}: average φ {mean('phi_reference', 'phi_mean'):+.3f} -> {mean('phi', 'phi_mean'):+.3f}, "
              f"z {mean('phi_reference', 'z'):+.2f} -> {mean('phi', 'z'):+.2f} (reference -> new response)")
    if n_run:
        print(f"{n_run} examples in {seconds:.1f} s ({n_run / seconds:.3f} examples/s)")


def run_pipeline(args) -> int:
    from tqdm import tqdm

    from tokenizer import Tokenizer

    every_example = load_examples(args.data)  # records of an earlier run without --limit are still its examples
    examples = every_example[:args.limit]
    for ex in examples:
        if ex.answer is None:
            raise UserError(f"{ex.source}:{ex.line}: no reference final answer (write '#### N' or \\boxed{{...}} "
                            "in the solution, or add a 'final_answer' field)")
        if not any(m["role"] == "user" for m in ex.prompt):
            raise UserError(f"{ex.source}:{ex.line}: no user message: the question to answer is missing")
    out, failed = Path(args.out), failed_path(Path(args.out))
    if Path(args.data).resolve() in (out.resolve(), failed.resolve()):
        raise UserError(f"--out {out}: would write into --data itself; choose another --out")
    ranks = start_ranks()  # under torchrun: this process's share of the examples (`shard`)
    files = {path: read_log(path, "hinted_decode.py") for path in output_files(out)}
    done = check_resume(every_example, files)
    check_settings(out, args, has_records=bool(done))
    todo = [ex for ex in shard(examples, ranks, args.batch_size) if ex.id not in done]
    n_done = sum(ex.id in done for ex in examples)
    print(f"{len(examples)} examples, {n_done} already in {out}, {len(examples) - n_done} to do", file=sys.stderr)
    if ranks.main and n_done < len(examples):  # before the first record of any rank
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(settings_path(out), json.dumps({"settings": decoding_settings(args)}, indent=1) + "\n")
    records, start = [], time.perf_counter()
    if todo:
        tokenizer = Tokenizer.from_pretrained(args.model)
        model = Transformer.from_pretrained(args.model, device=rank_device(args.device))
        kept_log, failed_log = append_paths(out, ranks)
        for path in {kept_log, failed_log} & files.keys():
            drop_torn_tail(path, files[path][1])  # its example is simply done again
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(kept_log, "a", encoding="utf-8", newline="\n") as f_out, \
                open(failed_log, "a", encoding="utf-8", newline="\n") as f_failed, \
                tqdm(total=len(todo), unit="ex", disable=args.quiet) as bar:

            def write(record):
                append_record(f_failed if record["source"] == "failed" else f_out, record)
                records.append(record)
                bar.update(1)

            try:
                for i in range(0, len(todo), args.batch_size):
                    rewrite_batch(model, tokenizer, todo[i:i + args.batch_size], args, write)
            except KeyboardInterrupt:
                print(f"\ninterrupted: {len(records)} new records kept in {kept_log} and {failed_log}; "
                      "rerun the same command to continue", file=sys.stderr)
                return 130
    n_new = print_shares(len(records), ranks)  # also waits until every rank has written all its records
    if not ranks.main:
        return 0
    summarize(merge_outputs(every_example, out), time.perf_counter() - start, n_new)
    print(f"wrote {out} (training data) and {failed}")
    return 0


# ---- Demo --------------------------------------------------------------------------------------


def run_demo(args) -> int:
    """The authors' demo, ours: one problem, the reference and three responses, each scored."""
    from tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(args.model)
    model = Transformer.from_pretrained(args.model, device=args.device)
    ex = Example("demo", [{"role": "user", "content": DEMO_QUESTION}], DEMO_REFERENCE, "58", 0, "demo")
    stops = tokenizer.stop_ids
    plain = tokenizer.encode_chat(ex.prompt, add_generation_prompt=True)
    hint = tokenizer.encode_chat(hint_messages(ex), add_generation_prompt=True)
    splitter = auto_splitter(ex) if args.splitter == "auto" else args.splitter
    knobs = dict(max_new_tokens=args.max_new_tokens, stop_ids=stops, temperature=args.temperature,
                 top_p=args.top_p, seed=args.seed)
    [own], _ = generate(model, [plain], **knobs)
    hinted = {}
    for beta in (0.0, args.beta):
        [ids], _ = hinted_generate(model, [hint], [plain], beta=beta, mode=args.mode, splitter=splitter,
                                   tokenizer=tokenizer, sigmoid_center=args.sigmoid_center,
                                   piecewise_bounds=tuple(args.piecewise_bounds), **knobs)
        hinted[beta] = ids
    print(f"Question: {DEMO_QUESTION}\n")
    shown = [("reference solution", ex.response),
             ("the model's own answer", tokenizer.decode(strip_stop(own, stops))),
             ("β = 0 rewrite (hint stream alone)", tokenizer.decode(strip_stop(hinted[0.0], stops))),
             (f"hinted rewrite (β = {args.beta:g}, {args.mode})",
              tokenizer.decode(strip_stop(hinted[args.beta], stops)))]
    for title, text in shown:
        s = phi_stats(model, tokenizer, ex.prompt, text)
        verdict = "correct" if answers_match(extract_answer(text), ex.answer) else "wrong"
        print(f"=== {title}: average φ {s['phi_mean']:+.3f}, z {s['z']:+.2f}, answer {verdict} ===\n{text}\n")
    return 0


# ---- Command line ------------------------------------------------------------------------------


def parse_args(argv=None):
    from hub import BUNDLED_NAME

    ap = ArgumentParser(
        description="Rewrite reference solutions into the model's own words with hinted decoding "
                    "(SPEC §4). Without --data: a demo on one built-in problem.",
        epilog="Output: --out gets the kept examples (source on_policy or hinted), a valid --data file for "
               "train.py; OUT.failed.jsonl next to it gets the rest. Records are appended one by one: "
               "rerunning with the same --out continues where a run stopped (ids from --data); an --out "
               "written from another --data or with other decoding settings (OUT.settings.json) is refused.")
    ap.add_argument("--data", help="JSONL training data (GSM8K, prompt/response or messages format)")
    ap.add_argument("--out", help="JSONL output (required with --data)")
    ap.add_argument("--model", default=BUNDLED_NAME, help="HF directory, hub id, or the bundled model name")
    ap.add_argument("--beta", type=nonnegative_float, default=3.0,
                    help="β of the λ rule (default 3; 0 = hint stream alone)")
    ap.add_argument("--mode", choices=MODES, default="linear", help="λ rule (default linear: clamp(β·h, 0, 1))")
    ap.add_argument("--sigmoid-center", type=fraction, default=0.5, help="c of the sigmoid mode")
    ap.add_argument("--piecewise-bounds", type=fraction, nargs=2, default=(0.3, 0.7), metavar=("H1", "H2"),
                    help="mode piecewise: λ = 0 below H1, 1 above H2, linear between (default 0.3 0.7)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=None, help="default 512 (demo: 256)")
    ap.add_argument("--batch-size", type=positive_int, default=8, help="examples decoded together (2 rows each)")
    ap.add_argument("--temperature", type=nonnegative_float, default=0.0,
                    help="0 = greedy (default); the authors' demo uses --top-p 0.95 --temperature 0.3")
    ap.add_argument("--top-p", type=probability, default=1.0, help="nucleus, applied before the temperature")
    ap.add_argument("--seed", type=nonnegative_int, default=0,
                    help="sampling seed; each example samples with its own seed, from --seed and its id")
    ap.add_argument("--splitter", default="auto",
                    help="text after which the plain stream decodes alone; 'auto' (default): '####' or "
                         "'\\boxed{' from the reference's answer format; 'none': never switch")
    ap.add_argument("--analysis", action=argparse.BooleanOptionalAction, default=False,
                    help="first write a greedy '# Analysis' prefix, cut at the last '# CoT' header "
                         "(default off: small models rarely write the headers)")
    ap.add_argument("--analysis-max-tokens", type=positive_int, default=256, help="longest analysis prefix")
    ap.add_argument("--limit", type=positive_int, default=None, help="only the first N examples of --data")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.splitter == "none":
        args.splitter = None
    return args


def check_args(args):
    if args.max_new_tokens is None:
        args.max_new_tokens = 512 if args.data else 256
    if args.data is None and args.out is not None:
        raise UserError("--out needs --data")
    if args.data is not None and args.out is None:
        raise UserError("--data needs --out")
    if args.mode == "piecewise" and not args.piecewise_bounds[0] < args.piecewise_bounds[1]:
        raise UserError("--piecewise-bounds H1 H2 needs H1 < H2")
    if args.data is not None:
        check_input(args.data, "--data")
        check_output(args.out, "--out")
        # the side files (NAME.failed.jsonl, NAME.settings.json, the parts) hang off NAME: with one
        # fixed ending, two spellings of one output ("a", "a.jsonl") cannot take two locks
        if not args.out.endswith(".jsonl"):
            raise UserError(f"--out {args.out}: name the output NAME.jsonl")


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        check_args(args)
        if not args.data:
            return run_demo(args)
        with lock_output(args.out):
            return run_pipeline(args)
    except (UserError, CheckpointError) as e:
        return print_error(e)
    except KeyboardInterrupt:  # while loading (once decoding, run_pipeline reports what it kept)
        print("\ninterrupted: nothing written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
