"""Tokens/s and padding share of one training step on long, uneven sequences: packed, unpacked, and
transformers' padding-free training.

    ours_packed     train.train_step on step_batches(..., pack_len=--max-len): the step's
                    sequences laid end to end in rows of --max-len tokens (best-fit decreasing),
                    each attending only within itself (model.document_attention: FlashAttention's
                    variable-length kernel on CUDA, SDPA with a document mask on CPU)
    ours_unpacked   the same step with --no-pack: one sequence per row, sorted by length, padded
                    to a multiple of 64 per micro-batch
    hf_padding_free transformers LlamaForCausalLM (sdpa) fed by its DataCollatorWithFlattening:
                    each micro-batch's sequences concatenated into one row with position_ids
                    restarting per sequence (what TRL's SFTTrainer(padding_free=True) builds);
                    transformers then masks attention per sequence (use_cache=False: with a cache
                    it does not, and sequences would see each other). The IDFT loss is written the
                    authors' way on its full logits (bench/train_step.py)

The data: random token ids with chain-of-thought-like lengths, log-normal (median --median, σ 0.8)
clipped to [32, --max-len], the first fifth of each sequence the prompt. One step = forward and
backward of every micro-batch, then AdamW; the loss is Σ loss_t / N_valid (λ = 1). The peer gets
the same micro-batches of sequences as ours_packed. tokens/s = tokens of the step's sequences
(each of L tokens: L − 1 predictions) / median step seconds after a warm-up step; steps alternate
between the sides. Padding share = share of the input slots that predict no token of a sequence.
All sides start from the same weights, so their first losses must agree (checked, reported).
Eager everywhere (no torch.compile); float32 on CPU, bfloat16 autocast on CUDA.

Beside the timed step, the padding share of larger steps is computed from the layout alone (no
model): packing is best-fit decreasing, unpacked micro-batches are today's.

    python bench/packing.py --quick    # tiny random model, seconds
    python bench/packing.py            # bundled SmolLM2-135M
Writes bench/results/packing-<device>[-quick].json.
"""

import argparse
import math
import tempfile
from contextlib import nullcontext

import torch

from common import add_common_args, interleaved, load_hf, load_ours, model_dir, new_report, setup, timing, write_report
from train import LossHead, Sequence, build_optimizer, step_batches, train_step
from train_step import KNOBS, OPTIM, authors_idft_loss

LAYOUTS = [(64, 2048, 500), (128, 4096, 1000), (256, 8192, 2000)]  # (sequences, --max-len, median length)


def chain_of_thought_lengths(n, median, max_len, seed=0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.8 + math.log(median)).exp().clamp(32, max_len).long().tolist()


def make_sequences(n, median, max_len, vocab, seed=0) -> list[Sequence]:
    g = torch.Generator().manual_seed(seed + 1)
    return [Sequence(torch.randint(3, vocab, (L,), generator=g).tolist(), max(1, L // 5))
            for L in chain_of_thought_lengths(n, median, max_len, seed)]


def padding_share(micro_batches, width=None) -> float:
    """1 − (tokens predicted) / (input slots) of a step laid out as train.collate lays it."""
    tokens = sum(len(s.ids) - 1 for mb in micro_batches for row in mb for s in row)
    slots = 0
    for mb in micro_batches:
        w = width or -(-max(sum(len(s.ids) for s in row) - 1 for row in mb) // 64) * 64
        slots += len(mb) * w
    return 1 - tokens / slots


def ours(path, device, seqs, args, pack_len):
    model = load_ours(path, device).train()
    head = LossHead(model, "idft", KNOBS)
    optimizer = build_optimizer(head, OPTIM.lr, OPTIM.weight_decay, fused=device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    micro_batches = step_batches(seqs, 0, len(seqs), 0, 0, 1, args.micro_batch_size, pack_len)

    def step():
        return train_step(head, optimizer, micro_batches, 1.0, 0, device, autocast, 0.0, 1, pack_len).loss

    return step, padding_share(micro_batches, pack_len)


def hf_padding_free(path, device, seqs, args):
    from transformers import DataCollatorWithFlattening

    model = load_hf(path, device).train()
    optimizer = build_optimizer(model, OPTIM.lr, OPTIM.weight_decay, fused=device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    collator = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    batches = []
    for mb in step_batches(seqs, 0, len(seqs), 0, 0, 1, args.micro_batch_size, args.max_len):
        flat = [s for row in mb for s in row]
        b = collator([{"input_ids": s.ids, "labels": s.ids} for s in flat])
        # position t predicts token t + 1, in the loss when that is a response token (never a sequence's first)
        response = torch.cat([torch.arange(len(s.ids)) >= max(s.n_prompt, 1) for s in flat])[None]
        targets = torch.cat([b["input_ids"][:, 1:], b["input_ids"][:, :1]], 1)
        mask = torch.cat([response[:, 1:], torch.zeros(1, 1, dtype=torch.bool)], 1)
        batches.append((b["input_ids"].to(device), b["position_ids"].to(device), targets.to(device), mask.to(device)))
    n_valid = sum(int(m.sum()) for *_, m in batches)

    def step():
        total = 0.0
        for inputs, positions, targets, mask in batches:
            with autocast:
                logits = model(input_ids=inputs, position_ids=positions, use_cache=False).logits
                loss = authors_idft_loss(logits, targets, mask) / n_valid
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    slots = sum(b[0].numel() for b in batches)
    return step, 1 - sum(len(s.ids) - 1 for s in seqs) / slots


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap, reps=None)
    ap.add_argument("--sequences", type=int, help="sequences per step (default: 32 quick, 64 CPU, 128 CUDA)")
    ap.add_argument("--max-len", type=int, help="row length and longest sequence (default: 512; CUDA 2048)")
    ap.add_argument("--median", type=int, help="median sequence length (default: 120 quick, 150 CPU, 600 CUDA)")
    ap.add_argument("--micro-batch-size", type=int, default=4, help="rows (or sequences) per micro-batch")
    args = ap.parse_args(argv)
    device = setup(args)
    cuda = device.type == "cuda"
    args.sequences = args.sequences or (32 if args.quick else 128 if cuda else 64)
    args.max_len = args.max_len or (2048 if cuda else 512)
    args.median = args.median or (600 if cuda else 120 if args.quick else 150)
    reps = args.reps or (2 if cuda or args.quick else 1)

    with tempfile.TemporaryDirectory() as scratch:
        path, model_name = model_dir(args.quick, scratch)
        vocab = load_ours(path, "cpu").config.vocab_size
        seqs = make_sequences(args.sequences, args.median, args.max_len, vocab)
        steps, shares = {}, {}
        steps["ours_packed"], shares["ours_packed"] = ours(path, device, seqs, args, args.max_len)
        steps["ours_unpacked"], shares["ours_unpacked"] = ours(path, device, seqs, args, None)
        steps["hf_padding_free"], shares["hf_padding_free"] = hf_padding_free(path, device, seqs, args)
    tokens = sum(len(s.ids) - 1 for s in seqs)
    report = new_report(device, {"model": model_name, "dtype": "bfloat16 autocast" if cuda else "float32",
                                 "sequences": args.sequences, "max_len": args.max_len, "median_length": args.median,
                                 "tokens_per_step": tokens, "micro_batch_size": args.micro_batch_size,
                                 "loss": "idft", "compiled": False, "reps_after_warmup": reps})
    first = {name: step() for name, step in steps.items()}  # the warm-up step: same weights, same loss
    seconds, _ = interleaved(steps, reps, 0, device)
    results = {}
    for name in steps:
        t = timing(seconds[name])
        results[name] = {**t, "tokens_per_s": tokens / t["seconds_median"], "padding_share": shares[name],
                         "first_loss": first[name]}
        print(f"{name:16s} {results[name]['tokens_per_s']:9.1f} tokens/s  padding {shares[name]:6.1%}  "
              f"first loss {first[name]:.6f}", flush=True)
    tps = {name: r["tokens_per_s"] for name, r in results.items()}
    ratios = {"packed_over_unpacked": tps["ours_packed"] / tps["ours_unpacked"],
              "packed_over_hf_padding_free": tps["ours_packed"] / tps["hf_padding_free"],
              "first_loss_rel_diff": max(abs(v - first["ours_unpacked"]) / abs(first["ours_unpacked"])
                                         for v in first.values())}
    print(f"packed / unpacked {ratios['packed_over_unpacked']:.2f}x, packed / hf padding-free "
          f"{ratios['packed_over_hf_padding_free']:.2f}x; first losses differ by {ratios['first_loss_rel_diff']:.1e}")
    layouts = []
    for n, max_len, median in LAYOUTS:
        lay = [Sequence([1] * L, max(1, L // 5)) for L in chain_of_thought_lengths(n, median, max_len)]
        layouts.append({"sequences": n, "max_len": max_len, "median_length": median,
                        "packed": padding_share(step_batches(lay, 0, n, 0, 0, 1, 4, max_len), max_len),
                        "unpacked": padding_share(step_batches(lay, 0, n, 0, 0, 1, 4))})
    report.update(results=results, ratios=ratios, layouts=layouts)
    write_report("packing", device, args.quick, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
