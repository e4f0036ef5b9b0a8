"""Measure what each departure from the authors' code changes (docs/departures.md).

    python scripts/departures.py [--n 64] [--out results/departures.json]

On the bundled SmolLM2-135M-Instruct, float32, and the first --n training problems that
scripts/make_gsm8k.py generates (gsm_symbolic references, scored under the plain prompt):

  end of turn    average φ of each reference with and without its end-of-turn token
                 (ddt.score_examples, skip_ids), and that token's own φ
  φ band         the hard-threshold ablation 1[−b < φ_t < b] on our default loss (idft: the
                 whole weight detached) and on the authors' (idft_v1: only the exponent
                 detached): their gradients w.r.t. the logits, compared
  logged stats   the statistics of one optimizer step of 16 sequences in 4 micro-batches, as
                 we log them (idft.loss_stats over the whole step) and as the authors' trainer
                 does (last micro-batch, unbiased std, lower median, in-range ratios)
  loss mask      the targets the authors' training pipeline trains (verl's single-turn SFT
                 data, loss_mask[:, 1:]: one token earlier than the response, so the last
                 prompt token is trained and the end-of-turn token never is) against ours (the
                 response and its end-of-turn token): the two targets that differ, and their NLL

Prints a Markdown table and writes the numbers to --out (JSON).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import idft  # noqa: E402
from common import gsm_examples  # noqa: E402
from data import encode_example  # noqa: E402
from plumbing.files import atomic_write  # noqa: E402
from ddt import pad_sequences, next_token_targets, score_examples  # noqa: E402
from hub import BUNDLED_NAME  # noqa: E402
from model import Transformer  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


def end_of_turn_effect(model, tok, seqs) -> dict:
    with_eot = score_examples(model, seqs, tok.pad_id, batch_size=8)
    without = score_examples(model, seqs, tok.pad_id, batch_size=8, skip_ids=(tok.eos_id,))
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)
    eot_phi = [a["phi_sum"] - b["phi_sum"] for a, b in zip(with_eot, without)]
    return {"phi_mean_with_eot": mean(with_eot, "phi_mean"), "phi_mean_without_eot": mean(without, "phi_mean"),
            "eot_phi_mean": sum(eot_phi) / len(eot_phi),
            "share_below_-0.1_with_eot": mean([{"x": r["phi_mean"] < -0.1} for r in with_eot], "x"),
            "share_below_-0.1_without_eot": mean([{"x": r["phi_mean"] < -0.1} for r in without], "x")}


def logits_of(model, seqs, pad_id):
    tokens, response = pad_sequences(seqs, pad_id)
    targets, mask = next_token_targets(tokens, response)
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    return logits, targets, mask


def band_effect(logits, targets, mask, b) -> dict:
    grads = {}
    for method in ("idft", "idft_v1"):
        z = logits.clone().requires_grad_(True)
        loss_sum, _, _ = idft.loss_sum(z, targets, mask, method, b=b)
        loss_sum.backward()
        grads[method] = z.grad[mask]
    ours, theirs = grads["idft"], grads["idft_v1"]
    cosine = torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0).item()
    return {"b": b, "max_abs_grad_difference_over_max_abs_grad": ((ours - theirs).abs().max() / ours.abs().max()).item(),
            "cosine_of_the_two_gradients": cosine}


def stats_effect(logits, targets, mask, micro_batches=4) -> dict:
    _, _, (phi, gamma, _) = idft.loss_sum(logits, targets, mask, "idft")
    ours = idft.loss_stats(phi, gamma)
    rows_per_mb = len(logits) // micro_batches
    _, _, (last_phi, _, _) = idft.loss_sum(logits[-rows_per_mb:], targets[-rows_per_mb:], mask[-rows_per_mb:], "idft")
    return {"tokens_in_step": phi.numel(), "tokens_in_last_micro_batch": last_phi.numel(),
            "phi_mean_step": ours["phi_mean"], "phi_mean_last_micro_batch": last_phi.mean().item(),
            "phi_std_population": ours["phi_std"], "phi_std_unbiased": phi.std().item(),
            "phi_median_interpolated": ours["phi_median"], "phi_median_lower": phi.median().item(),
            "share_phi_outside_hist_range": ((phi < -3) | (phi > 3)).double().mean().item(),
            "share_phi_outside_hist_range_last_micro_batch": ((last_phi < -3) | (last_phi > 3)).double().mean().item()}


def loss_mask_effect(model, seqs, pad_id) -> dict:
    """Ours trains targets n_prompt .. T−1 (the response and its end-of-turn token); verl's
    loss_mask[:, 1:] trains n_prompt − 1 .. T − 2: the last prompt token instead of the end of turn."""
    nll_last_prompt, nll_eot = [], []
    for ids, n_prompt in seqs:
        with torch.no_grad():
            log_p = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), -1)
        nll = -log_p.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)  # nll[t] scores ids[t + 1]
        nll_last_prompt.append(nll[n_prompt - 2].item())
        nll_eot.append(nll[-1].item())
    mean = lambda xs: sum(xs) / len(xs)
    return {"nll_last_prompt_token": mean(nll_last_prompt), "nll_end_of_turn": mean(nll_eot),
            "targets_that_differ_per_sequence": 2, "sequences": len(seqs)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64, help="training problems scored (the step uses the first 16)")
    ap.add_argument("--out", default=str(ROOT / "results" / "departures.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = Transformer.from_pretrained(BUNDLED_NAME), Tokenizer.from_pretrained(BUNDLED_NAME)
    seqs = [encode_example(tok, ex) for ex in gsm_examples(args.n)]
    logits, targets, mask = logits_of(model, seqs[:16], tok.pad_id)
    result = {"model": BUNDLED_NAME, "problems": args.n,
              "end_of_turn": end_of_turn_effect(model, tok, seqs),
              "phi_band": [band_effect(logits, targets, mask, b) for b in (1.0, 5.0)],
              "logged_stats": stats_effect(logits, targets, mask),
              "loss_mask": loss_mask_effect(model, seqs, tok.pad_id)}
    atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    eot, st = result["end_of_turn"], result["logged_stats"]
    print("| departure | measured on the bundled model |\n|---|---|")
    print(f"| end-of-turn token scored | average φ {eot['phi_mean_without_eot']:+.4f} without → "
          f"{eot['phi_mean_with_eot']:+.4f} with (the token's own φ {eot['eot_phi_mean']:+.2f}); share below −0.1: "
          f"{eot['share_below_-0.1_without_eot']:.2f} → {eot['share_below_-0.1_with_eot']:.2f} |")
    for band in result["phi_band"]:
        print(f"| φ band b = {band['b']:g} on idft vs idft_v1 | gradients w.r.t. the logits: largest difference "
              f"{band['max_abs_grad_difference_over_max_abs_grad']:.2f} × the largest gradient, cosine "
              f"{band['cosine_of_the_two_gradients']:.3f} |")
    print(f"| logged stats: last micro-batch | {st['tokens_in_last_micro_batch']} of {st['tokens_in_step']} tokens; "
          f"φ mean {st['phi_mean_last_micro_batch']:+.4f} vs {st['phi_mean_step']:+.4f} |")
    print(f"| logged stats: std, median | std {st['phi_std_unbiased']:.5f} (unbiased) vs {st['phi_std_population']:.5f}; "
          f"median {st['phi_median_lower']:+.5f} (lower) vs {st['phi_median_interpolated']:+.5f} |")
    print(f"| logged stats: φ histogram range [−3, 3] | {st['share_phi_outside_hist_range']:.3f} of the step's "
          f"tokens outside ({st['share_phi_outside_hist_range_last_micro_batch']:.3f} of the last micro-batch's, "
          "what theirs logs): dropped by theirs, in the edge bins in ours |")
    lm = result["loss_mask"]
    print(f"| loss mask (verl's loss_mask[:, 1:]) | trains the last prompt token (NLL {lm['nll_last_prompt_token']:.3f}) "
          f"instead of the end-of-turn token (NLL {lm['nll_end_of_turn']:.3f}) |")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
