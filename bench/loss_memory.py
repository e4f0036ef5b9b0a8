"""Peak memory and time of one IDFT forward + backward of the output layer: full logits vs lean.

    reference  logits = h Wᵀ ([tokens × V]), idft.loss_sum, autograd backward
    lean       idft.chunked_loss_sum(h, W): the same idft.token_loss on chunks of tokens, each
               chunk's logits recomputed in backward (activation checkpointing)

Inputs: random hidden states h [tokens × D] and output matrix W [V × D] (float32 on CPU,
bfloat16 on CUDA), every token valid, IDFT with the default knobs. Time: the two paths
alternate in one process (`interleaved` in bench/common.py), median after a warm-up. Peak memory: a
fresh worker process per path runs a warm-up step and then one measured step, and reports
the growth over what it held before that step (the [V × D] gradient of W, present in both
paths, included; h, W excluded): CPU peak RSS (VmHWM), CUDA max_memory_allocated.

    python bench/loss_memory.py            # 8k tokens × 49152 vocab (D 576), 4k × 151936 (D 896)
    python bench/loss_memory.py --quick    # 4k × 8192 (D 256), seconds
    python bench/loss_memory.py --chunk-size 1024 256   # the lean path at two chunk sizes
Writes bench/results/loss_memory-<device>[-quick].json.
"""

import argparse
import json

import torch
from common import (
    GiB,
    add_common_args,
    interleaved,
    new_report,
    peak,
    reset_peak,
    run_worker,
    setup,
    timing,
    write_report,
)

from idft import LOSS_CHUNK, chunked_loss_sum, loss_sum  # after common, which puts the repo root on sys.path

SIZES = [  # (tokens, vocab, hidden dim)
    (8192, 49152, 576),  # the bundled SmolLM2-135M
    (4096, 151936, 896),  # a Qwen2.5-0.5B-sized output layer
]
QUICK_SIZES = [(4096, 8192, 256)]  # four chunks of the default size


def make_inputs(tokens, vocab, dim, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(tokens, dim, device=device, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, device=device, generator=g) * dim**-0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    mask = torch.ones(tokens, dtype=torch.bool, device=device)
    return hidden, weight, targets, mask


def step_fn(path, chunk_size, hidden, weight, targets, mask):
    """A zero-argument function: one forward + backward of `path`, returning the loss sum."""

    def step():
        hidden.grad = weight.grad = None
        if path == "reference":
            total, _, _ = loss_sum(hidden @ weight.T, targets, mask, "idft")
        else:
            total, _, _ = chunked_loss_sum(hidden, weight, targets, mask, "idft", chunk_size)
        total.backward()
        return total.item()

    return step


def worker(path, tokens, vocab, dim, chunk_size, device):
    """Peak memory growth of one step of `path`, after a warm-up step, in bytes."""
    inputs = make_inputs(tokens, vocab, dim, device)
    step = step_fn(path, chunk_size, *inputs)
    step()
    inputs[0].grad = inputs[1].grad = None
    before = reset_peak(device)
    step()
    return {"peak_bytes": peak(device) - before}


def available_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap, reps=3)
    ap.add_argument("--chunk-size", type=int, nargs="+", default=[LOSS_CHUNK],
                    help="tokens per chunk of the lean path; several values: one lean run each")
    ap.add_argument("--worker", nargs=5, metavar=("PATH", "TOKENS", "VOCAB", "DIM", "CHUNK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = setup(args)
    if args.worker:
        path, *size = args.worker
        print(json.dumps(worker(path, *map(int, size), device)))
        return

    sizes = QUICK_SIZES if args.quick else SIZES
    report = new_report(device, {"sizes": sizes, "chunk_sizes": args.chunk_size, "reps_after_warmup": args.reps,
                                 "warmup_steps": 1, "method": "idft", "all_tokens_valid": True})
    results, ratios = [], []
    for tokens, vocab, dim in sizes:
        inputs = make_inputs(tokens, vocab, dim, device)
        runs = {("lean", c): step_fn("lean", c, *inputs) for c in args.chunk_size}
        # the reference holds about four [tokens × vocab] float32 tensors at its peak
        if 4 * tokens * vocab * 4 < 0.8 * available_bytes(device):
            runs = {("reference", None): step_fn("reference", None, *inputs), **runs}
        else:
            print(f"skip reference at {tokens} × {vocab}: not enough free memory")
        seconds, losses = interleaved(runs, args.reps, warmup=1, device=device)
        del inputs, runs  # free before the memory workers start
        for (path, chunk), secs in seconds.items():
            mem = run_worker(__file__, ["--worker", path, str(tokens), str(vocab), str(dim), str(chunk or 0),
                                        "--device", str(device)] + (["--threads", str(args.threads)] if args.threads
                                                                     else []))
            t = timing(secs)
            results.append({"path": path, "tokens": tokens, "vocab": vocab, "dim": dim, "chunk_size": chunk,
                            "dtype": "bfloat16" if device.type == "cuda" else "float32",
                            "loss": losses[(path, chunk)], "time_s": t["seconds_median"], **t,
                            "peak_gib": mem["peak_bytes"] / GiB})
            r = results[-1]
            label = path if chunk is None else f"lean/{chunk}"
            print(f"{tokens:>6} × {vocab:<7} D={dim:<4} {label:<10} {r['time_s']:8.2f} s  {r['peak_gib']:7.2f} GiB",
                  flush=True)
        ref = next((r for r in results[-len(seconds):] if r["path"] == "reference"), None)
        for lean in (r for r in results[-len(seconds):] if ref and r["path"] == "lean"):
            ratios.append({"tokens": tokens, "vocab": vocab, "chunk_size": lean["chunk_size"],
                           "memory_ref_over_lean": ref["peak_gib"] / lean["peak_gib"],
                           "time_lean_over_ref": lean["time_s"] / ref["time_s"],
                           "loss_rel_diff": abs(lean["loss"] - ref["loss"]) / abs(ref["loss"])})
            q = ratios[-1]
            print(f"  chunk {q['chunk_size']}: lean uses {1 / q['memory_ref_over_lean']:.2f}× the reference's memory "
                  f"and {q['time_lean_over_ref']:.2f}× its time; losses differ by {q['loss_rel_diff']:.1e} (relative)")
    report.update(results=results, ratios=ratios)
    write_report("loss_memory", device, args.quick, report)


if __name__ == "__main__":
    main()
