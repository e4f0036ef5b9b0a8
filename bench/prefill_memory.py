"""Peak memory of hinted decoding's prefill at long prompts: before and after issue 22.

    before  the prefill as it was, restated here (`masked_prefill`): the prompts left-padded into
            one batch, 16 rows at a time from their first slot that is not padding, every prompt
            token attending over the whole cache width (prompt + max_new_tokens) through a boolean
            mask and SDPA with enable_gqa; on CUDA that pair runs the math kernel, which holds
            float32 scores [rows, heads, prompt, cache width] per layer
    after   model.prefill: one prompt at a time, plain causal attention over its own tokens, no
            mask (the flash kernel)

The prompts are random token ids, --rows of them with lengths in [0.9 P, P], so rows are padded
as real hint and plain prompts are. Peak memory = growth during the call, reported with the KV
cache's own size and the growth beyond it: on CUDA max_memory_allocated, in this process; on CPU
VmHWM, in a fresh worker process per (side, P, max_new_tokens) (bench/common.py: run_worker). The
two sides' next tokens are compared (they must agree).

    python bench/prefill_memory.py --quick    # tiny random model, seconds
    python bench/prefill_memory.py            # bundled SmolLM2-135M (minutes on CPU)
Writes bench/results/prefill_memory-<device>[-quick].json.
"""

import argparse
import json
import tempfile
import time

import torch
import torch.nn.functional as F

from common import GiB, add_common_args, load_ours, model_dir, new_report, peak, reset_peak, run_worker, setup, write_report
from model import prefill

CHUNK_ROWS = 16  # the old prefill's rows per chunk (hinted_decode.PREFILL_ROWS before issue 22)


@torch.no_grad()
def masked_prefill(model, prompts, max_new_tokens):
    """The prefill before issue 22: left-padded chunks of CHUNK_ROWS rows, each token attending over
    the whole cache through a [rows, 1, T, cache width] mask with enable_gqa. Returns the logits of
    each prompt's last token and the cache, as model.prefill does."""
    device = model.embed_tokens.weight.device
    width = max(len(p) for p in prompts)
    pad = torch.tensor([width - len(p) for p in prompts], device=device)
    tokens = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    cache = model.new_cache(pad, width + max_new_tokens)
    key = torch.arange(cache.max_len, device=device)
    logits = []
    for r in range(0, len(prompts), CHUNK_ROWS):
        rows = slice(r, r + CHUNK_ROWS)
        start = int(pad[rows].min())
        slots = torch.arange(start, width, device=device)
        x = model.embed_tokens(tokens[rows, start:])
        cos, sin = model.rope((slots[None] - pad[rows, None]).clamp(min=0), x.dtype)
        mask = ((key <= slots[:, None])[None] & (key >= pad[rows, None, None]) | (key == slots[:, None])[None])[:, None]
        for i, layer in enumerate(model.layers):
            a, h = layer.self_attn, layer.input_layernorm(x)
            B, T, _ = h.shape
            q, k, v = (t.transpose(1, 2) for t in a.qkv(h, cos, sin))
            k_cache, v_cache = cache.k[i, rows], cache.v[i, rows]
            k_cache.index_copy_(2, slots, k)
            v_cache.index_copy_(2, slots, v)
            y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)
            x = x + a.o_proj(y.transpose(1, 2).reshape(B, T, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits.append(F.linear(model.norm(x)[:, -1], model.output_weight))
    return torch.cat(logits), cache


def make_prompts(rows, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(int(0.9 * length), length + 1, (rows,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def measure(side, model, device, rows, length, max_new):
    prompts = make_prompts(rows, length, model.config.vocab_size)
    before = reset_peak(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits, cache = (masked_prefill if side == "before" else prefill)(model, prompts, max_new)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    growth = peak(device) - before
    cache_bytes = 2 * cache.k.numel() * cache.k.element_size()
    return {"side": side, "prompt_length": length, "max_new_tokens": max_new, "seconds": seconds,
            "peak_growth_gib": growth / GiB, "cache_gib": cache_bytes / GiB,
            "beyond_cache_gib": (growth - cache_bytes) / GiB, "next_tokens": logits.argmax(-1).tolist()}


def load(path, device):
    return load_ours(path, device, torch.bfloat16 if device.type == "cuda" else torch.float32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap, reps=1)
    ap.add_argument("--rows", type=int, help="prompts prefilled together (default: 16 on CUDA and quick, 8 on CPU)")
    ap.add_argument("--sizes", type=str, help="P:MAX_NEW,... (default: CUDA 2048:512,2048:8192; CPU "
                                              "1024:256,1024:4096,2048:4096; quick 256:64,256:2048)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # JSON: side, length, max_new
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = setup(args)
    cuda = device.type == "cuda"
    rows = args.rows or (16 if cuda or args.quick else 8)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(measure(job["side"], load(args.model_dir, device), device, rows, job["length"], job["max_new"])))
        return 0
    default = "256:64,256:2048" if args.quick else "2048:512,2048:8192" if cuda else "1024:256,1024:4096,2048:4096"
    sizes = [tuple(map(int, s.split(":"))) for s in (args.sizes or default).split(",")]
    report = new_report(device, {"rows": rows, "dtype": "bfloat16" if cuda else "float32", "old_chunk_rows": CHUNK_ROWS,
                                 "sizes": sizes, "memory": "peak growth during the call, fresh process per run"})
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        path, report["settings"]["model"] = model_dir(args.quick, scratch)
        model = load(path, device) if cuda else None
        for length, max_new in sizes:
            row = {"prompt_length": length, "max_new_tokens": max_new}
            for side in ("before", "after"):
                job = json.dumps({"side": side, "length": length, "max_new": max_new})
                row[side] = measure(side, model, device, rows, length, max_new) if cuda else run_worker(
                    __file__, ["--worker", job, "--model-dir", str(path), "--rows", str(rows), "--device", str(device),
                               "--threads", str(torch.get_num_threads())])
            row["same_next_tokens"] = row["before"].pop("next_tokens") == row["after"].pop("next_tokens")
            row["before_over_after_peak"] = row["before"]["peak_growth_gib"] / row["after"]["peak_growth_gib"]
            results.append(row)
            print(f"P {length:5d}, max_new {max_new:5d}: beyond the cache ({row['after']['cache_gib']:.2f} GiB) "
                  f"before {row['before']['beyond_cache_gib']:.2f} GiB, after {row['after']['beyond_cache_gib']:.2f} "
                  f"GiB; {row['before']['seconds']:.1f} s vs {row['after']['seconds']:.1f} s; same next tokens: "
                  f"{row['same_next_tokens']}", flush=True)
    report.update(results=results)
    write_report("prefill_memory", device, args.quick, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
