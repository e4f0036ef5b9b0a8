"""Hinted decoding: rewrite a reference solution into the model's own words.

One model, two prompts per example, decoded together token by token (docs/math.md, "Hinted
decoding"):

    hint stream   p_t = π_θ(· | question + reference solution + "solve it yourself", y_<t)
    plain stream  q_t = π_θ(· | question, y_<t)                the prompt training will use

    h_t = H(p_t) / log|V|                  the hint stream's normalized entropy, in [0, 1]
    λ_mix,t = clamp(β_mix · h_t, 0, 1)     the plain stream's weight (`mixing_weight`; also
                                           sigmoid and piecewise modes)
    λ_mix,t = 0 for the first token, 1 once the text holds the splitter ('####', '\\boxed{')
    z_t = (1 − λ_mix,t) log p_t + λ_mix,t log q_t      the geometric mixture (`log_mixture`)
    y_t ~ z_t                              greedy, or top-p then temperature; appended to both

Where the hint stream is sure (a number, a key step) it leads; where it hesitates (phrasing,
length) the model's own plain stream leads. `hinted_generate` runs both streams of B examples
as the 2B rows of one batch through one copy of the weights, with a static KV cache.

The pipeline (`python hinted_decode.py --data FILE.jsonl --out OUT.jsonl`): the model answers
each question itself and verified answers are kept ("on_policy"); the failures are rewritten,
and verified rewrites are kept ("hinted"); the rest go to OUT.failed.jsonl. Records are
appended as they are made and a rerun continues (plumbing/records.py); torchrun shares the
examples out. `python hinted_decode.py` alone runs a demo on the bundled model.
"""

import argparse
import math
import sys
from collections import Counter

import torch

from data import Example, answers_match, encode_example, extract_answer, find_answer, load_examples
from ddt import entropy, log_probs, score_examples
from model import (Transformer, check_vocabulary, decode_step, finish_reason, generate, prefill, row_generators,
                   sample_next, worth_compacting)
from plumbing.cli import (ArgumentParser, UserError, fraction, nonnegative_float, nonnegative_int, positive_int,
                          probability, run_cli)
from plumbing.files import check_disjoint, check_input, check_output, lock_output, lock_path
from plumbing.precision import DTYPES, compute_dtype
from plumbing.ranks import example_seed, rank_device, start_ranks
from plumbing.records import RecordLog

MODES = ("linear", "sigmoid", "piecewise")
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

# ---- The mixing rule ---------------------------------------------------------------------------


def mixing_weight(h: torch.Tensor, beta: float, mode: str = "linear", sigmoid_center: float = 0.5,
                  piecewise_bounds: tuple[float, float] = (0.3, 0.7)) -> torch.Tensor:
    """λ_mix, the plain stream's weight, from the hint stream's normalized entropy h ([B]):
    clamp(β_mix·h, 0, 1), σ(β_mix·(h − c)), or 0 below h1, 1 above h2 and linear between."""
    if mode == "linear":
        return (beta * h).clamp(0.0, 1.0)
    if mode == "sigmoid":
        return torch.sigmoid(beta * (h - sigmoid_center))
    if mode == "piecewise":
        h1, h2 = piecewise_bounds
        return ((h - h1) / (h2 - h1)).clamp(0.0, 1.0)
    raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")


def log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """z = (1 − λ_mix) log p + λ_mix log q per row ([B, |V|], λ_mix [B]): the geometric mixture
    ∝ p^(1−λ_mix) q^λ_mix in log space (unnormalized: argmax, top-p and temperature need no constant).
    A stream of weight 0 drops out, p^0 = 1 even where p = 0: no 0·(−inf) = NaN for a masked entry."""
    w_p, w_q = (1.0 - lam)[:, None], lam[:, None]
    return torch.where(w_p > 0, w_p * log_p, 0.0) + torch.where(w_q > 0, w_q * log_q, 0.0)


# ---- Batched two-stream decoding ---------------------------------------------------------------


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
    logits, cache = prefill(model, list(hint_prompts) + list(plain_prompts), max_new_tokens)
    width = cache.max_len - max_new_tokens
    if compile:
        cache.mark_static()

    out = [[] for _ in range(B)]
    finish = [None] * B
    switched = [False] * B  # the splitter has appeared: the plain stream alone from now on
    active = list(range(B))  # the example behind each row pair still in the batch
    for step in range(max_new_tokens):
        n = len(active)
        log_p = log_probs(logits[:n])  # hint stream p_t
        log_q = log_probs(logits[n:])  # plain stream q_t
        h = entropy(log_p) / log_vocab  # the hint stream's normalized entropy, in [0, 1]
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


def seeds(args, examples: list[Example], stage: str, step: int | None = None) -> list[int] | None:
    """One sampling seed per example (and online step; ranks.example_seed): its tokens do not
    depend on its batch, its rank or a resume."""
    stage = stage if step is None else f"{stage}@{step}"
    return None if args.seed is None else [example_seed(args.seed, ex.id, stage) for ex in examples]


def rewrite_batch(model, tokenizer, batch: list[Example], args, write=None, step: int | None = None) -> list[dict]:
    """The pipeline's rule for one batch: the model's own answer, kept if it verifies
    ("on_policy"); else the hinted rewrite, kept if it verifies ("hinted"); else "failed". One
    record per example, handed to `write` as soon as it is made; returns them all. args: the
    decoding knobs (`decoding_knobs`); step: train.py --online's step, which keys the sampling
    seeds with the example's id (the offline pipeline: None)."""
    records = []

    def emit(record):
        records.append(record)
        if write is not None:
            write(record)

    stops = tokenizer.stop_ids
    plain = [tokenizer.encode_chat(ex.prompt, add_generation_prompt=True) for ex in batch]
    own, own_finish = generate(model, plain, args.max_new_tokens, stop_ids=stops, temperature=args.temperature,
                               top_p=args.top_p, seed=seeds(args, batch, "own", step))
    ref_phi = {ex.id: phi_stats(model, tokenizer, ex.prompt, ex.response) for ex in batch}
    todo = []
    for ex, ids, finish, prompt in zip(batch, own, own_finish, plain):
        text = tokenizer.decode(strip_stop(ids, stops))
        if accept(text, finish, ex.answer):
            emit(make_record(model, tokenizer, ex, text, "on_policy", finish, ref_phi[ex.id]))
        else:
            todo.append((ex, prompt))
    if not todo:
        return records

    hints = [tokenizer.encode_chat(hint_messages(ex, args.analysis), add_generation_prompt=True) for ex, _ in todo]
    if args.analysis:  # greedy "# Analysis ... # CoT" prefix, cut at the last '# CoT' header
        drafts, _ = generate(model, hints, args.analysis_max_tokens, stop_ids=stops)
        kept = []
        for (ex, prompt), hint, draft in zip(todo, hints, drafts):
            prefix = cut_analysis(tokenizer.decode(strip_stop(draft, stops)))
            if prefix is None:
                print(f"{ex.source}:{ex.line}: no '{ANALYSIS_HEADER}' header in the analysis; skipped", file=sys.stderr)
                emit(make_record(model, tokenizer, ex, None, "failed", "no_analysis", ref_phi[ex.id]))
            else:
                kept.append(((ex, prompt), hint + tokenizer.encode(prefix)))
        if not kept:
            return records
        todo, hints = [k[0] for k in kept], [k[1] for k in kept]

    splitters = [auto_splitter(ex) if args.splitter == "auto" else args.splitter for ex, _ in todo]
    new, finishes = hinted_generate(
        model, hints, [p for _, p in todo], beta=args.beta, mode=args.mode, max_new_tokens=args.max_new_tokens,
        stop_ids=stops, temperature=args.temperature, top_p=args.top_p, splitter=splitters, tokenizer=tokenizer,
        seed=seeds(args, [ex for ex, _ in todo], "hinted", step), sigmoid_center=args.sigmoid_center,
        piecewise_bounds=tuple(args.piecewise_bounds))
    for (ex, _), ids, finish in zip(todo, new, finishes):
        text = tokenizer.decode(strip_stop(ids, stops))
        source = "hinted" if accept(text, finish, ex.answer) else "failed"
        emit(make_record(model, tokenizer, ex, text, source, finish, ref_phi[ex.id]))
    return records


# The settings that shape the records, stored in OUT.settings.json before the first record: an
# --out is only extended with the same ones. --limit, --batch-size, --device and --quiet may change.
DECODING_SETTINGS = ("model", "dtype", "beta", "mode", "sigmoid_center", "piecewise_bounds", "max_new_tokens",
                     "temperature", "top_p", "seed", "splitter", "analysis", "analysis_max_tokens")


def decoding_settings(args) -> dict:
    settings = {k: getattr(args, k) for k in DECODING_SETTINGS}
    settings["piecewise_bounds"] = list(settings["piecewise_bounds"])  # as JSON gives it back
    return settings


def record_log(out) -> RecordLog:
    """OUT.jsonl gets the kept examples (a valid --data file for train.py), OUT.failed.jsonl the rest."""
    return RecordLog(out, "hinted_decode.py", "failed", lambda record: record["source"] == "failed")


def same_example(ex: Example, record: dict) -> bool:
    """Was `record` made from `ex` as it is now (prompt, reference and gold answer)?"""
    return (record["prompt"], record.get("reference"), record.get("final_answer")) == (ex.prompt, ex.response,
                                                                                        ex.answer)


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
    from tokenizer import Tokenizer

    every_example = load_examples(args.data)  # records of an earlier run without --limit are still its examples
    examples = every_example[:args.limit]
    for ex in examples:
        if ex.answer is None:
            raise UserError(f"{ex.source}:{ex.line}: no reference final answer (write '#### N' or \\boxed{{...}} "
                            "in the solution, or add a 'final_answer' field)")
        if not any(m["role"] == "user" for m in ex.prompt):
            raise UserError(f"{ex.source}:{ex.line}: no user message: the question to answer is missing")
    log = record_log(args.out)

    def start_work():
        tokenizer = Tokenizer.from_pretrained(args.model)
        model = Transformer.from_pretrained(args.model, dtype=getattr(torch, args.dtype), device=rank_device(args.device))
        check_vocabulary(tokenizer, model.config.vocab_size, args.model)
        return lambda batch, write: rewrite_batch(model, tokenizer, batch, args, write)

    ranks = start_ranks()  # under torchrun: this process does its share of the examples
    result = log.extend(examples, every_example, same_example, decoding_settings(args), ranks, args.batch_size,
                        start_work, desc=None if args.quiet else "hinted decoding")
    if result is None:
        return 130  # interrupted: the records written so far are kept
    records, n_run, seconds = result
    if ranks.main:
        summarize(records, seconds, n_run)
        print(f"wrote {log.out} (training data) and {log.side_path()}")
    return 0


# ---- Demo --------------------------------------------------------------------------------------

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


def run_demo(args) -> int:
    """The authors' demo, ours: one problem, the reference and three responses, each scored."""
    from tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(args.model)
    model = Transformer.from_pretrained(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    check_vocabulary(tokenizer, model.config.vocab_size, args.model)
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
             ("β_mix = 0 rewrite (hint stream alone)", tokenizer.decode(strip_stop(hinted[0.0], stops))),
             (f"hinted rewrite (β_mix = {args.beta:g}, {args.mode})",
              tokenizer.decode(strip_stop(hinted[args.beta], stops)))]
    for title, text in shown:
        s = phi_stats(model, tokenizer, ex.prompt, text)
        verdict = "correct" if answers_match(extract_answer(text), ex.answer) else "wrong"
        print(f"=== {title}: average φ {s['phi_mean']:+.3f}, z {s['z']:+.2f}, answer {verdict} ===\n{text}\n")
    return 0


# ---- Command line ------------------------------------------------------------------------------


def splitter_flag(text: str) -> str | None:
    return None if text == "none" else text


def add_decoding_flags(ap, prefix: str = "", max_new_tokens: int | None = None):
    """The knobs of the pipeline's decoding: hinted_decode.py's flags, or train.py --online's with
    the prefix "online-" (train.py's own --beta is IDFT's β, not β_mix)."""
    def flag(name, **kw):
        ap.add_argument(f"--{prefix}{name}", **kw)

    flag("beta", type=nonnegative_float, default=3.0,
         help="β_mix, the slope of the mixing rule (default 3; 0 = hint stream alone)")
    flag("mode", choices=MODES, default="linear", help="mixing rule (default linear: λ_mix = clamp(β_mix·h, 0, 1))")
    flag("sigmoid-center", type=fraction, default=0.5, help="c of the sigmoid mode")
    flag("piecewise-bounds", type=fraction, nargs=2, default=(0.3, 0.7), metavar=("H1", "H2"),
         help="mode piecewise: λ_mix = 0 below H1, 1 above H2, linear between (default 0.3 0.7)")
    flag("max-new-tokens", type=positive_int, default=max_new_tokens,
         help=f"longest answer and rewrite (default {max_new_tokens or '512; demo: 256'})")
    flag("temperature", type=nonnegative_float, default=0.0,
         help="0 = greedy (default); the authors' demo uses top-p 0.95 and temperature 0.3")
    flag("top-p", type=probability, default=1.0, help="nucleus, applied before the temperature")
    flag("splitter", type=splitter_flag, default="auto",
         help="text after which the plain stream decodes alone; 'auto' (default): '####' or "
              "'\\boxed{' from the reference's answer format; 'none': never switch")
    flag("analysis", action=argparse.BooleanOptionalAction, default=False,
         help="first write a greedy '# Analysis' prefix, cut at the last '# CoT' header "
              "(default off: small models rarely write the headers)")
    flag("analysis-max-tokens", type=positive_int, default=256, help="longest analysis prefix")


def decoding_knobs(args, prefix: str = "") -> argparse.Namespace:
    """The knobs rewrite_batch reads (beta, mode, ..., seed) from parsed flags with `prefix`."""
    names = [n for n in DECODING_SETTINGS if n not in ("model", "dtype")]
    knobs = {n: getattr(args, prefix.replace("-", "_") + n, None) for n in names}
    knobs["seed"] = args.seed
    return argparse.Namespace(**knobs)


def parse_args(argv=None):
    from hub import BUNDLED_NAME

    ap = ArgumentParser(
        description="Rewrite reference solutions into the model's own words with hinted decoding "
                    "(docs/math.md). Without --data: a demo on one built-in problem.",
        epilog="Output: --out gets the kept examples (source on_policy or hinted), a valid --data file for "
               "train.py; OUT.failed.jsonl next to it gets the rest. Records are appended one by one: "
               "rerunning with the same --out continues where a run stopped (ids from --data); an --out "
               "written from another --data or with other decoding settings (OUT.settings.json) is refused.")
    ap.add_argument("--data", help="JSONL training data (GSM8K, prompt/response or messages format)")
    ap.add_argument("--out", help="JSONL output (required with --data)")
    ap.add_argument("--model", default=BUNDLED_NAME, help="HF directory, hub id, or the bundled model name")
    add_decoding_flags(ap)
    ap.add_argument("--batch-size", type=positive_int, default=8, help="examples decoded together (2 rows each)")
    ap.add_argument("--seed", type=nonnegative_int, default=0,
                    help="sampling seed; each example samples with its own seed, from --seed and its id")
    ap.add_argument("--limit", type=positive_int, default=None, help="only the first N examples of --data")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help="weights dtype (default: bfloat16 on CUDA, float32 on CPU); the mixing and φ are float32")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    args.dtype = compute_dtype(args.dtype, args.device)
    return args


def check_args(args):
    if args.max_new_tokens is None:
        args.max_new_tokens = 512 if args.data else 256
    if args.data is None and args.out is not None:
        raise UserError("--out needs --data")
    if args.data is not None and args.out is None:
        raise UserError("--data needs --out")
    check_decoding_flags(args)
    if args.data is not None:
        check_input(args.data, "--data")
        args.out = str(check_output(args.out, "--out"))  # its real path: the side files hang off it
        # the side files (NAME.failed.jsonl, NAME.settings.json, the parts) hang off NAME: with one
        # fixed ending, two spellings of one output ("a", "a.jsonl") cannot take two locks
        if not args.out.endswith(".jsonl"):
            raise UserError(f"--out {args.out}: name the output NAME.jsonl")
        log = record_log(args.out)
        check_disjoint([("--out", p) for p in (*log.written_files(), lock_path(log.out))],
                       [("--data", args.data), ("--model", args.model)])


def check_decoding_flags(args, prefix: str = ""):
    lo, hi = getattr(args, prefix.replace("-", "_") + "piecewise_bounds")
    if getattr(args, prefix.replace("-", "_") + "mode") == "piecewise" and not lo < hi:
        raise UserError(f"--{prefix}piecewise-bounds H1 H2 needs H1 < H2")


def main(argv=None) -> int:
    def run(argv):
        args = parse_args(argv)
        check_args(args)
        if not args.data:
            return run_demo(args)
        with lock_output(args.out):
            return run_pipeline(args)

    # Ctrl-C while loading; once decoding, run_pipeline reports what it kept
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
