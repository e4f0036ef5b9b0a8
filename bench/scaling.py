"""Seconds per generated token as the generated length L grows: KV cache vs no cache.

    ours      model.generate: one prefill, then one single-token forward per step against the
              static KV cache, so every step costs about the same and the time per token
              stays flat in L (only attention over the cache grows, small next to the matmuls)
    no_cache  the authors' hinted-decoding demo design: no KV cache, every step runs the model
              over the whole prefix (prompt + tokens so far) and keeps the last position's
              logits; step t costs ∝ prompt + t, the run ∝ L², the time per token ∝ L

Both sides use our model (same weights, dtype, device), greedy, batch 1, one plain stream,
so the only difference is the cache (bench/hinted_decode.py measures the full two-stream
hinted decoding). Per length: seconds of one whole run / L, median over --reps runs after one
warm-up round at the shortest length. Each round runs every (side, length) once, the order
reversed every other round, so load changes hit all lengths and both sides alike. The two
outputs are compared token for token.

    python bench/scaling.py --quick    # tiny random model, L = 64, 256, 1024
    python bench/scaling.py            # bundled SmolLM2-135M; L = 32, 64, 128 on CPU, 256, 1k, 4k on CUDA
Writes bench/results/scaling-<device>[-quick].json.
"""

import argparse
import tempfile

import torch

from common import (add_common_args, gsm_prompts, interleaved, load_ours, model_dir, new_report, random_prompts,
                    setup, timing, write_report)
from model import generate


@torch.no_grad()
def no_cache_generate(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding that recomputes the whole prefix at every step (full logits, like an HF
    forward without logits_to_keep)."""
    seq = torch.tensor([prompt], device=model.output_weight.device)
    for _ in range(new_tokens):
        nxt = model(seq)[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq[0, len(prompt):].tolist()


def main(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap, reps=3)
    ap.add_argument("--lengths", type=int, nargs="+",
                    help="generated lengths (default: 64 256 1024 quick; bundled 32 64 128 on CPU, 256 1024 4096 on CUDA)")
    args = ap.parse_args(argv)
    device = setup(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths = args.lengths or ([64, 256, 1024] if args.quick else [256, 1024, 4096] if cuda else [32, 64, 128])

    with tempfile.TemporaryDirectory() as scratch:
        path, model_name = model_dir(args.quick, scratch)
        model = load_ours(path, device, dtype)
    [prompt] = random_prompts(1, model.config.vocab_size, 32, 33) if args.quick else gsm_prompts(1)

    report = new_report(device, {"model": model_name, "dtype": str(dtype).removeprefix("torch."),
                                 "prompt_tokens": len(prompt), "lengths": lengths, "batch": 1,
                                 "reps_after_warmup": args.reps, "decoding": "greedy, EOS off"})

    def runs(n):
        return {("ours", n): lambda: generate(model, [prompt], n, repetition_stop=False)[0][0],
                ("no_cache", n): lambda: no_cache_generate(model, prompt, n)}

    interleaved(runs(min(lengths)), 0, 1, device)  # warm-up round
    # every length in every round, so a change in machine load cannot pass for growth with L
    seconds, outputs = interleaved({k: f for n in lengths for k, f in runs(n).items()}, args.reps, 0, device)
    results = []
    for n in lengths:
        row = {"new_tokens": n}
        for name in ("ours", "no_cache"):
            t = timing(seconds[name, n])
            row[name] = {**t, "seconds_per_token": t["seconds_median"] / n}
        same = [a == b for a, b in zip(outputs["ours", n], outputs["no_cache", n])]
        row["outputs_identical"] = all(same)
        row["first_mismatch"] = None if all(same) else same.index(False)
        row["no_cache_over_ours_per_token"] = row["no_cache"]["seconds_per_token"] / row["ours"]["seconds_per_token"]
        results.append(row)
        print(f"L={n:5d}: ours {row['ours']['seconds_per_token'] * 1e3:8.2f} ms/token, no cache "
              f"{row['no_cache']['seconds_per_token'] * 1e3:8.2f} ms/token, ratio "
              f"{row['no_cache_over_ours_per_token']:.1f}x; outputs identical: {row['outputs_identical']}")

    first, last = results[0], results[-1]
    ratios = {f"{name}_per_token_growth": last[name]["seconds_per_token"] / first[name]["seconds_per_token"]
              for name in ("ours", "no_cache")}
    ratios["length_growth"] = last["new_tokens"] / first["new_tokens"]
    ratios["no_cache_over_ours_per_token"] = {r["new_tokens"]: r["no_cache_over_ours_per_token"] for r in results}
    print(f"L x{ratios['length_growth']:g}: time per token x{ratios['ours_per_token_growth']:.2f} with the cache, "
          f"x{ratios['no_cache_per_token_growth']:.2f} without")
    report.update(results=results, ratios=ratios)
    write_report("scaling", device, args.quick, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
