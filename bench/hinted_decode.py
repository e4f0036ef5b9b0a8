"""Examples/s of hinted decoding: ours against the authors' way of running it.

    ours             hinted_decode.hinted_generate on all problems at once: 2B rows in one batch,
                     static KV cache, one forward per token for every row
    batch1_cached    the same function, one problem at a time (2 rows)
    authors_style    one problem at a time, two separate forwards per token (hint, plain), no KV
                     cache: every step recomputes both whole prefixes, as the published demo does

All three use the same model, the same problems and hinted_decode's mixing rule, greedy, with EOS and
the repetition stop turned off, so every problem decodes exactly its token budget and the
outputs must agree token for token (checked). The slow baselines may run on the first few
problems only (--single-problems, --baseline-problems), and authors_style on the first
--baseline-tokens tokens only: on CPU with the bundled model one problem of 256 tokens without a
cache takes most of an hour. Speed-ups compare new tokens/s (= examples/s at equal length);
against a shortened authors_style they are lower bounds, since its steps get dearer as the
prefix grows. Each timing is the median of --reps runs after one warm-up run (authors_style's
warm-up decodes 4 tokens: it has no cache or compiled step to warm up). float32 on CPU with one
torch thread (bench/common.py), bfloat16 on CUDA, where a mismatch of outputs may come from
near-ties and is reported, not fatal.

    python bench/hinted_decode.py --quick     # tiny random model, seconds
    python bench/hinted_decode.py             # the bundled SmolLM2-135M on gsm_symbolic problems

Results go to bench/results/hinted_decode-<device>[-quick].json.
"""

import argparse
import math
import tempfile

import torch

from common import (add_common_args, gsm_examples, interleaved, load_ours, model_dir, new_report, random_prompts,
                    setup, timing, write_report)
from ddt import entropy, log_probs
from hinted_decode import hint_messages, hinted_generate, log_mixture, mixing_weight


@torch.no_grad()
def authors_style(model, hint, plain, *, beta, max_new_tokens, log_vocab):
    """Batch 1, no cache, two forwards per token over the whole prefix (full logits, like an HF
    forward without logits_to_keep); the first token from the hint stream alone."""
    device = model.output_weight.device
    out = []
    for step in range(max_new_tokens):
        log_p = log_probs(model(torch.tensor([hint + out], device=device))[:, -1])
        log_q = log_probs(model(torch.tensor([plain + out], device=device))[:, -1])
        lam = mixing_weight(entropy(log_p) / log_vocab, beta)
        if step == 0:
            lam = torch.zeros_like(lam)
        out.append(int(log_mixture(log_p, log_q, lam).argmax()))
    return out


def quick_problems(n, vocab):
    """Random prompts of varied lengths; hint prompts (question + reference) are the longer ones."""
    return random_prompts(n, vocab, 80, 160, seed=1), random_prompts(n, vocab, 20, 60, seed=2)


def gsm_problems(n, data):
    """Hint and plain chat prompts of n gsm_symbolic problems (scripts/make_gsm8k.py), or of
    the first n examples of --data, for the bundled model."""
    from data import load_examples
    from hub import BUNDLED_NAME
    from tokenizer import Tokenizer

    examples = load_examples(data)[:n] if data else gsm_examples(n)
    tok = Tokenizer.from_pretrained(BUNDLED_NAME)
    hints = [tok.encode_chat(hint_messages(ex), add_generation_prompt=True) for ex in examples]
    plains = [tok.encode_chat(ex.prompt, add_generation_prompt=True) for ex in examples]
    return hints, plains, tok.vocab_size


def timed(fn, reps, device, warmup=None):
    """Seconds of `reps` runs after one warm-up run (of `warmup`, else `fn`), and the last result."""
    (warmup or fn)()  # warm-up (and compilation on CUDA)
    seconds, last = interleaved({"run": fn}, reps, 0, device)
    return seconds["run"], last["run"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap, reps=None)  # --quick --reps --device --threads (one thread on CPU)
    ap.add_argument("--problems", type=int, help="problems for ours (default: 16 quick, 32 bundled)")
    ap.add_argument("--single-problems", type=int, help="problems for batch1_cached (default: 16 quick, 4 bundled)")
    ap.add_argument("--baseline-problems", type=int, help="problems for authors_style (default: 4 quick, 1 bundled)")
    ap.add_argument("--max-new-tokens", type=int, help="default: 64 quick, 256 bundled")
    ap.add_argument("--baseline-tokens", type=int, help="authors_style's tokens (default: all quick, 32 bundled)")
    ap.add_argument("--beta", type=float, default=3.0)
    ap.add_argument("--data", help="bundled mode: take the problems from this JSONL file")
    args = ap.parse_args(argv)
    device = setup(args)
    quick = args.quick
    n = args.problems or (16 if quick else 32)
    n_single = min(n, args.single_problems or (16 if quick else 4))
    n_base = min(n, args.baseline_problems or (4 if quick else 1))
    T = args.max_new_tokens or (64 if quick else 256)
    T_base = min(T, args.baseline_tokens or (T if quick else 32))
    reps = args.reps or (3 if quick else 1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    with tempfile.TemporaryDirectory() as scratch:
        path, model_name = model_dir(quick, scratch)
        model = load_ours(path, device, dtype)
    if quick:
        hints, plains = quick_problems(n, model.config.vocab_size)
        vocab = model.config.vocab_size
    else:
        hints, plains, vocab = gsm_problems(n, args.data)
    knobs = dict(beta=args.beta, max_new_tokens=T, repetition_stop=False)
    baseline = lambda k: [authors_style(model, h, p, beta=args.beta, max_new_tokens=k, log_vocab=math.log(vocab))
                          for h, p in zip(hints[:n_base], plains[:n_base])]
    runs = {  # name: (problems, tokens each, run, warm-up run)
        "ours": (n, T, lambda: hinted_generate(model, hints, plains, **knobs)[0], None),
        "batch1_cached": (n_single, T, lambda: [hinted_generate(model, [h], [p], **knobs)[0][0]
                                                for h, p in zip(hints[:n_single], plains[:n_single])], None),
        "authors_style": (n_base, T_base, lambda: baseline(T_base), lambda: baseline(4)),
    }
    report = new_report(device, {"model": f"{model_name}, {str(dtype).removeprefix('torch.')}", "beta": args.beta,
                                 "decoding": "greedy, no EOS, no repetition stop", "reps_after_warmup": reps})
    results, outputs = {}, {}
    for name, (count, tokens, fn, warmup) in runs.items():
        seconds, outputs[name] = timed(fn, reps, device, warmup)
        t = timing(seconds)
        median = t["seconds_median"]
        results[name] = {"problems": count, "new_tokens_per_problem": tokens, **t, "examples_per_s": count / median,
                         "new_tokens_per_s": count * tokens / median}
        print(f"{name:14s} {count:3d} problems x {tokens} tokens: {median:8.2f} s  "
              f"{count / median:8.4f} examples/s  {count * tokens / median:9.2f} tokens/s", flush=True)
    identical = (outputs["ours"][:n_single] == outputs["batch1_cached"]
                 and [o[:T_base] for o in outputs["ours"][:n_base]] == outputs["authors_style"])
    speedup = {f"vs_{k}": results["ours"]["new_tokens_per_s"] / results[k]["new_tokens_per_s"]
               for k in ("batch1_cached", "authors_style")}
    print(f"outputs identical: {identical}; ours speed-up (new tokens/s): "
          + ", ".join(f"{k} {v:.1f}x" + (" (lower bound)" if k == "vs_authors_style" and T_base < T else "")
                      for k, v in speedup.items()))

    report.update(results=results, ours_speedup_tokens_per_s=speedup, authors_style_shortened=T_base < T,
                  outputs_identical=identical)
    write_report("hinted_decode", device, quick, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
