"""Tokens/s of plain greedy decoding: ours (model.generate) vs transformers' generate.

    ours        model.generate: static KV cache preallocated for prompt + new tokens, left
                padding with per-row positions, one forward per token for the whole batch
    hf_dynamic  LlamaForCausalLM.generate with its default dynamic cache (the cache grows by
                concatenation every step), do_sample=False, left padding + attention mask
    hf_static   generate(cache_implementation="static"), which transformers compiles with
                torch.compile on a GPU (its fastest built-in path); on by default on CUDA
                only (--hf-static on CPU runs it uncompiled)

Same weights, same prompts, same dtype (float32 on CPU, bfloat16 on CUDA). EOS is switched
off on both sides (no stop_ids, repetition_stop=False / eos_token_id=None), so every row decodes exactly
--new-tokens tokens; the outputs are compared token for token (a mismatch is reported, not
fatal: in bfloat16 near-ties may flip). tokens/s = batch × new tokens / median seconds of
one whole generate call (prefill included), after one warm-up call per side; calls
alternate between the sides.

    python bench/decode.py --quick    # tiny random model, seconds
    python bench/decode.py            # bundled SmolLM2-135M on gsm_symbolic chat prompts
Writes bench/results/decode-<device>[-quick].json.
"""

import argparse
import tempfile

import torch

from common import (add_common_args, gsm_prompts, interleaved, load_hf, load_ours, model_dir, new_report,
                    random_prompts, setup, timing, write_report)
from model import generate


def hf_generate(hf, prompts, new_tokens, cache_implementation=None):
    """transformers' generate on left-padded prompts; returns each row's new tokens."""
    device, width = hf.device, max(len(p) for p in prompts)
    tokens = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = hf.generate(tokens, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False,
                      eos_token_id=None, pad_token_id=0, cache_implementation=cache_implementation)
    return out[:, tokens.shape[1]:].tolist()


def read_bandwidth(n_bytes: int, device) -> float:
    """GB/s of reading a weights-sized float32 tensor once (a sum): the batch-1 decoding bound."""
    x = torch.ones(n_bytes // 4, device=device)
    seconds, _ = interleaved({"sum": lambda: x.sum()}, 3, 1, device)
    return n_bytes / timing(seconds["sum"])["seconds_median"] / 1e9


def matmul_only_speed(model, device) -> float:
    """Tokens/s of the batch-1 matrix products alone: one vector times every weight matrix (the
    tied embedding as the output layer), no attention, norms or Python model code. No
    implementation built on the same matrix-vector kernels decodes faster at batch 1."""
    mats = [p for p in model.parameters() if p.ndim == 2]
    xs = [torch.randn(1, w.shape[1], device=device, dtype=w.dtype) for w in mats]
    seconds, _ = interleaved({"matmuls": lambda: [x @ w.T for x, w in zip(xs, mats)]}, 5, 1, device)
    return 1 / timing(seconds["matmuls"])["seconds_median"]


def main(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap, reps=3)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32] if cuda else [1, 8])
    ap.add_argument("--new-tokens", type=int, help="tokens generated per row (default: 64 quick, 256 bundled)")
    ap.add_argument("--hf-static", action=argparse.BooleanOptionalAction, default=cuda,
                    help="also time transformers' static cache (+ its auto-compile on CUDA); default on CUDA only")
    args = ap.parse_args(argv)
    device = setup(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    new_tokens = args.new_tokens or (64 if args.quick else 256)

    with tempfile.TemporaryDirectory() as scratch:
        path, model_name = model_dir(args.quick, scratch)
        ours, hf = load_ours(path, device, dtype), load_hf(path, device, dtype)
    n = max(args.batch_sizes)
    all_prompts = random_prompts(n, ours.config.vocab_size, 8, 48) if args.quick else gsm_prompts(n)

    report = new_report(device, {"model": model_name, "dtype": str(dtype).removeprefix("torch."),
                                 "new_tokens": new_tokens, "batch_sizes": args.batch_sizes,
                                 # every decoding step reads all the weights once (the bandwidth bound)
                                 "weight_bytes": sum(p.numel() * p.element_size() for p in ours.parameters()),
                                 "reps_after_warmup": args.reps, "decoding": "greedy, EOS off"})
    report["settings"]["memory_read_gb_s"] = read_bandwidth(report["settings"]["weight_bytes"], device)
    report["settings"]["matmul_only_tokens_per_s"] = matmul_only_speed(ours, device)
    results, ratios = [], []
    for batch in args.batch_sizes:
        prompts = all_prompts[:batch]
        runs = {"ours": lambda p=prompts: generate(ours, p, new_tokens, repetition_stop=False)[0],
                "hf_dynamic": lambda p=prompts: hf_generate(hf, p, new_tokens)}
        if args.hf_static:
            runs["hf_static"] = lambda p=prompts: hf_generate(hf, p, new_tokens, "static")
        seconds, outputs = interleaved(runs, args.reps, 1, device)
        assert all(len(row) == new_tokens for out in outputs.values() for row in out), "EOS was not switched off"
        row = {"batch": batch, "prompt_tokens": [len(p) for p in prompts]}
        for name, secs in seconds.items():
            t = timing(secs)
            row[name] = {**t, "tokens_per_s": batch * new_tokens / t["seconds_median"],
                         "outputs_match_ours": outputs[name] == outputs["ours"]}
        results.append(row)
        for peer in (k for k in runs if k != "ours"):
            ratios.append({"batch": batch, "peer": peer,
                           "ours_over_peer_tokens_per_s": row["ours"]["tokens_per_s"] / row[peer]["tokens_per_s"]})
        print(f"batch {batch:3d}: " + ", ".join(f"{k} {row[k]['tokens_per_s']:8.1f} tok/s" for k in runs)
              + " | ours/peer " + ", ".join(f"{r['peer']} {r['ours_over_peer_tokens_per_s']:.2f}x"
                                           for r in ratios if r["batch"] == batch), flush=True)
    report.update(results=results, ratios=ratios)
    write_report("decode", device, args.quick, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
