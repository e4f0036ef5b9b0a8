"""Tokens/s and peak memory of one IDFT training step: ours vs transformers + the authors' loss.

    ours  train.LossHead: model.hidden_states, then idft.chunked_loss_sum, which forms the logits
          W_out·h_t chunk by chunk for the valid (response) tokens only and builds their
          gradient in the forward pass; on CUDA its decoder blocks compiled, as train.py does
          (plumbing/ranks.py, compile_blocks; activation checkpointing off on both sides)
    peer  transformers LlamaForCausalLM on the same weights, eager, full logits [B, T, V],
          then the IDFT loss written the way the authors write it (`authors_idft_loss`):
          float32 log_softmax over the whole batch, entropy from the full probabilities,
          gather of log p(y), weights w = stopgrad(p^γ)

One step on either side: forward, loss, backward, AdamW step (train.build_optimizer, fused
on CUDA), zero_grad; the loss is Σ_valid loss_t / N_valid (docs/math.md, λ = 1, β = 1, γ in
[0.1, 2]). Same batch: --batch × --seq random token ids, loss on the last 3/4 of each row
(the first quarter stands for the prompt). Float32 on CPU; bfloat16 autocast on CUDA (weights
and optimizer in float32, like train.py). Both sides start from the same weights, so their
first losses must agree (checked, reported). tokens/s = batch × seq / median step seconds
after warm-up; steps alternate between the sides. Peak memory: a fresh worker process per
side runs two steps (the first allocates AdamW's state) and reports the peak growth over
what it held before the first step (weights and the batch excluded; gradients, optimizer
state, activations and logits included) and its whole-process peak. MFU (CUDA only) =
6 · parameters · tokens/s / peak bf16 FLOP/s of the GPU.

    python bench/train_step.py --quick    # tiny random model, seconds
    python bench/train_step.py            # bundled SmolLM2-135M, 4 × 256 tokens (minutes on CPU)
Writes bench/results/train_step-<device>[-quick].json.
"""

import argparse
import json
import tempfile
from argparse import Namespace
from contextlib import nullcontext

import torch

from common import (GiB, add_common_args, interleaved, load_hf, load_ours, model_dir, new_report, peak,
                    reset_peak, run_worker, setup, timing, write_report)
from plumbing.ranks import compile_blocks
from train import PEAK_BF16_FLOPS, LossHead, build_optimizer

KNOBS = dict(beta=1.0, gamma_min=0.1, gamma_max=2.0, b=None, top_k=None)  # train.py's defaults
OPTIM = Namespace(lr=1e-5, weight_decay=0.01)


def authors_idft_loss(logits, targets, mask, beta=1.0, gamma_min=0.1, gamma_max=2.0, lam=1.0):
    """Σ_valid −stopgrad(p^γ) log p(y) from full logits, the straightforward way (docs/math.md).

    Holds [B, T, V] float32 tensors for log p, p and p · log p (and autograd keeps log p's
    softmax for backward): the memory the lean path avoids.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    token_logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    probs = log_probs.detach().exp()
    entropy = -(probs * log_probs.detach()).sum(-1)
    phi = token_logp.detach() + entropy
    gamma = 1 + lam * (torch.exp(-phi / beta).clamp(gamma_min, gamma_max) - 1)
    weight = token_logp.detach().exp() ** gamma
    return -(weight * token_logp * mask).sum()


def make_batch(batch, seq, vocab, device):
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(3, vocab, (batch, seq), generator=g)
    targets = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    mask[:, seq // 4:] = True
    return inputs.to(device), targets.to(device), mask.to(device)


def make_step(side, path, device, batch, seq):
    """A zero-argument function running one training step of `side`; returns (step, model)."""
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    if side == "ours":
        model = load_ours(path, device).train()
        head = LossHead(model, "idft", KNOBS)
        if cuda:
            compile_blocks(model.layers)
        forward = head
        params = head
    else:
        model = load_hf(path, device).train()
        params = model
    optimizer = build_optimizer(params, OPTIM.lr, OPTIM.weight_decay, fused=cuda)
    inputs, targets, mask = make_batch(batch, seq, model.config.vocab_size, device)
    lam = torch.tensor(1.0, device=device)
    n_valid = int(mask.sum())

    def step():
        with autocast:
            if side == "ours":
                loss_sum, _, _ = forward(inputs, targets, mask, lam)
            else:
                loss_sum = authors_idft_loss(model(input_ids=inputs).logits, targets, mask)
        loss = loss_sum / n_valid
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, model


def worker(side, path, device, batch, seq):
    """One side in its own process: peak memory of its first two training steps.

    The process's own peak (VmHWM / max_memory_allocated) rather than getrusage's ru_maxrss,
    which Linux carries over from the parent through fork and exec.
    """
    step, _ = make_step(side, path, device, batch, seq)
    load_peak = peak(device)
    before = reset_peak(device)
    step()
    step()
    step_peak = peak(device)
    return {"side": side, "peak_step_gib": (step_peak - before) / GiB,
            "process_peak_gib": max(load_peak, step_peak) / GiB}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap, reps=3)
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--worker", choices=("ours", "peer"), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)  # the --quick model the parent wrote
    args = ap.parse_args(argv)
    device = setup(args)
    if args.worker:
        print(json.dumps(worker(args.worker, args.model_dir, device, args.batch, args.seq)))
        return 0

    cuda = device.type == "cuda"
    report = new_report(device, {"batch": args.batch, "seq": args.seq, "loss_tokens_per_row": args.seq - args.seq // 4,
                                 "dtype": "bfloat16 autocast" if cuda else "float32", "loss": "idft",
                                 "ours_compiled": cuda, "reps_after_warmup": args.reps,
                                 "warmup_steps": 2 if cuda else 1})
    with tempfile.TemporaryDirectory() as scratch:
        path, report["settings"]["model"] = model_dir(args.quick, scratch)
        # memory first, one fresh process per side, while this one holds no model
        memory = {side: run_worker(__file__, ["--worker", side, "--model-dir", str(path), "--batch", str(args.batch),
                                              "--seq", str(args.seq), "--device", str(device),
                                              "--threads", str(torch.get_num_threads())])
                  for side in ("ours", "peer")}
        steps, models = {}, {}
        for side in ("ours", "peer"):
            steps[side], models[side] = make_step(side, path, device, args.batch, args.seq)
    n_params = report["settings"]["parameters"] = sum(p.numel() for p in models["ours"].parameters())
    # The first step of each side is the (first) warm-up; same weights and batch, so the two
    # losses must agree. CUDA: one more warm-up round, the first call compiles.
    first = {side: step() for side, step in steps.items()}
    seconds, _ = interleaved(steps, args.reps, 1 if cuda else 0, device)

    tokens = args.batch * args.seq
    peak_flops = next((f for k, f in PEAK_BF16_FLOPS.items() if cuda and k in torch.cuda.get_device_name(device)),
                      None)
    results = {}
    for side in ("ours", "peer"):
        t = timing(seconds[side])
        results[side] = {**t, "tokens_per_s": tokens / t["seconds_median"], "first_loss": first[side],
                         "peak_step_gib": memory[side]["peak_step_gib"],
                         "process_peak_gib": memory[side]["process_peak_gib"]}
        if peak_flops:
            results[side]["mfu"] = 6 * n_params * results[side]["tokens_per_s"] / peak_flops
        print(f"{side:5s} {results[side]['tokens_per_s']:9.1f} tokens/s  step peak {results[side]['peak_step_gib']:6.2f} GiB"
              f"  first loss {first[side]:.6f}" + (f"  MFU {results[side]['mfu']:.1%}" if peak_flops else ""))
    ratios = {"ours_over_peer_tokens_per_s": results["ours"]["tokens_per_s"] / results["peer"]["tokens_per_s"],
              "ours_over_peer_peak_step_memory": results["ours"]["peak_step_gib"] / results["peer"]["peak_step_gib"],
              "first_loss_rel_diff": abs(first["ours"] - first["peer"]) / abs(first["peer"])}
    print(f"ours/peer: {ratios['ours_over_peer_tokens_per_s']:.2f}x tokens/s, "
          f"{ratios['ours_over_peer_peak_step_memory']:.2f}x step peak memory; "
          f"first losses differ by {ratios['first_loss_rel_diff']:.1e} (relative)")
    report.update(results=results, ratios=ratios)
    write_report("train_step", device, args.quick, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
