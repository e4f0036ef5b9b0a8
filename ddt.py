"""Distribution Discriminant Theory (DDT): how on-policy is a token, and a sequence?

At response position t the model predicts p_t = π_θ(· | x, y_<t) over the vocabulary and the
data token is y_t. Per token (float32, no gradient; docs/math.md, "DDT"):

    ℓ_t = log p_t(y_t)                        log-likelihood           `log_probs`, TokenStats.logp
    H_t = −Σ_v p_t(v) log p_t(v)              entropy                  `entropy`
    φ_t = ℓ_t + H_t                           centered log-likelihood  TokenStats.phi
    V_t = Σ_v p_t(v) (log p_t(v) + H_t)²      varentropy               `varentropy`

If y_t ~ p_t (on-policy), E[φ_t] = 0 and Var[φ_t] = V_t given the past, whatever the
position's difficulty, so Σφ_t is a martingale. If y_t ~ q_t instead,
E_q[φ_t] = H(p_t) − H(q_t) − KL(q_t‖p_t). Per sequence (`sequence_scores`): Σφ, average φ
(the authors' rule of thumb: below −0.1 is off-distribution), running Σφ, shares of φ_t > 0,
−1, −3, −5, and our calibrated score

    z = Σ_t φ_t / sqrt(Σ_t V_t),   p-value = P(Z ≤ z), Z ~ N(0, 1)

which is close to a standard normal for text the model samples itself (martingale central
limit theorem): flagging p-value < α has a false-alarm rate α at any length.

Scored tokens: the response and its end-of-turn token, exactly what training sees
(data.encode_example); `--no-end-of-turn` scores the text alone, as the authors' demo does.
Every vocabulary sum is a float32 `sum` over a block of rows (`row_sum`), within 1e-5 of
float64 at |V| = 152k (tests/test_ddt.py). `python ddt.py --data FILE.jsonl` scores a file.
"""

import math
import sys
from dataclasses import dataclass

import torch

STATS_CHUNK = 1024  # tokens per chunk: 1024 × 152k vocabulary × 4 bytes ≈ 0.6 GiB per buffer
ROW_SUM_ELEMENTS = 1 << 22  # elements per block of row_sum's temporaries: 16 MiB
PHI_SHARE_THRESHOLDS = (-1.0, -3.0, -5.0)  # shares of φ_t above these, as in the authors' code


# ---- Per-token statistics -----------------------------------------------------------------------


def row_sum(f, *rows: torch.Tensor) -> torch.Tensor:
    """Σ_v f(*rows)[n, v] for each row n, a block of rows at a time, so f's temporaries stay
    small. torch's `sum` reduces in a cascade: float32 stays unbiased over 152k terms (an
    einsum reduction, a batched matrix product, drifts low by up to 1.3e-3 there)."""
    block = max(1, ROW_SUM_ELEMENTS // rows[0].shape[-1])
    if len(rows[0]) <= block:
        return f(*rows).sum(-1)
    return torch.cat([f(*(r[i:i + block] for r in rows)).sum(-1) for i in range(0, len(rows[0]), block)])


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log p = z − max z − log Σ_v exp(z_v − max z), float32 [n, |V|], from logits of any float
    dtype: the one log-softmax of the project (the loss differentiates through it). The sum of
    exponentials is a plain float32 `sum`: torch's CPU log_softmax kernel errs by up to 5e-5 at
    |V| = 152k."""
    z = logits.float()
    z = z - z.amax(-1, keepdim=True).detach()
    return z - z.exp().sum(-1, keepdim=True).log()


# Below this log p, p = exp(log p) is 0 in float32: clamping log p there changes no term p·f(log p),
# and turns a masked entry's 0·(−inf) = NaN into 0 (p log p = 0 where p = 0).
LOG_P_FLOOR = -1e4


def entropy(log_p: torch.Tensor) -> torch.Tensor:
    """H = −Σ_v p(v) log p(v) per row of log p [n, |V|]: the one entropy of the project. p log p = 0
    where p = 0, so a −inf entry (a masked vocabulary entry) adds nothing."""
    return -row_sum(lambda lp: lp.exp() * lp.clamp(min=LOG_P_FLOOR), log_p)


def varentropy(log_p: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """V = Σ_v p(v) (log p(v) + H)²: the centred form of Σ p (log p)² − H², which would subtract
    two nearly equal numbers. Entries with p = 0 add nothing, −inf ones included."""
    return row_sum(lambda lp, h: lp.exp() * (lp.clamp(min=LOG_P_FLOOR) + h).square(), log_p, H[:, None])


@dataclass
class TokenStats:
    """Per-token DDT statistics, float32, shape [...] of the targets."""

    logp: torch.Tensor  # ℓ_t = log p_t(y_t)
    H: torch.Tensor  # entropy H_t
    phi: torch.Tensor  # φ_t = ℓ_t + H_t
    V: torch.Tensor  # varentropy V_t


@torch.no_grad()
def token_stats(logits, targets, chunk_size=STATS_CHUNK) -> TokenStats:
    """ℓ, H, φ, V for every position: logits[..., t, :] scores targets[..., t] (ids must be valid;
    mask elsewhere). Chunked over tokens: never a float32 copy of the whole batch's logits."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    flat_logits, y = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    logp, H, V = (torch.empty(y.shape, dtype=torch.float32, device=flat_logits.device) for _ in range(3))
    for i in range(0, y.numel(), chunk_size):
        c = slice(i, i + chunk_size)
        log_p = log_probs(flat_logits[c])
        logp[c] = log_p.gather(-1, y[c, None]).squeeze(-1)
        H[c] = entropy(log_p)
        V[c] = varentropy(log_p, H[c])
    shape = targets.shape
    return TokenStats(logp.view(shape), H.view(shape), (logp + H).view(shape), V.view(shape))


# ---- Position t predicts token t + 1 ----------------------------------------------------------


def pad_sequences(seqs: list[tuple[list[int], int]], pad_id: int, width: int | None = None, device=None):
    """Right-padded tokens [B, W] of (ids, n_prompt) rows and their response mask [B, W]
    (True on ids[n_prompt:], the response and its end of turn). W: the longest row, or `width`."""
    width = width or max(len(ids) for ids, _ in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    response = torch.zeros((len(seqs), width), dtype=torch.bool)
    for b, (ids, n_prompt) in enumerate(seqs):
        tokens[b, :len(ids)] = torch.tensor(ids)
        response[b, n_prompt:len(ids)] = True
    return tokens.to(device), response.to(device)


def next_token_targets(tokens: torch.Tensor, response_mask: torch.Tensor):
    """The one shift of the project: position t reads tokens[:, :t+1] and predicts tokens[:, t+1].

    Returns (targets, mask), [B, T − 1]: targets[:, t] = tokens[:, t + 1], and mask[:, t] is
    True where that target is a response token, i.e. where the loss and the scores count.
    """
    return tokens[:, 1:], response_mask[:, 1:].bool()


def response_token_stats(logits, tokens, response_mask, chunk_size=STATS_CHUNK):
    """(TokenStats, mask) of the response tokens of whole sequences, from the logits [B, T, |V|]
    of one causal forward over tokens [B, T]; aligned with next_token_targets (length T − 1)."""
    targets, mask = next_token_targets(tokens, response_mask)
    # score all T positions (the last one predicts past the end: a dummy target, dropped after)
    # rather than slicing logits[:, :-1], which would copy the whole logits tensor
    padded = torch.nn.functional.pad(targets.masked_fill(~mask, 0), (0, 1))
    st = token_stats(logits, padded, chunk_size)
    return TokenStats(st.logp[:, :-1], st.H[:, :-1], st.phi[:, :-1], st.V[:, :-1]), mask


# ---- Per-sequence scores ----------------------------------------------------------------------


@dataclass
class SequenceScores:
    """Per-sequence DDT scores: [B] tensors, except phi_cumsum and mask [B, T]."""

    n: torch.Tensor  # number of response tokens
    logp_sum: torch.Tensor  # Σ log p(y_t): minus the response's negative log-likelihood
    phi_sum: torch.Tensor  # Σ φ_t
    phi_mean: torch.Tensor  # Σ φ_t / n   (rule of thumb: < −0.1 is off-distribution)
    phi_cumsum: torch.Tensor  # running Σ_{s≤t} φ_s (constant across masked positions)
    mask: torch.Tensor  # [B, T] bool, the response tokens that were scored
    share_phi_pos: torch.Tensor  # share of tokens with φ_t > 0
    share_phi_gt: dict  # {threshold: share of tokens with φ_t > threshold} for −1, −3, −5
    V_sum: torch.Tensor  # Σ V_t
    z: torch.Tensor  # Σ φ_t / sqrt(Σ V_t)
    p_value: torch.Tensor  # P(Z ≤ z) under N(0, 1), float64 (small values would underflow float32)

    def to_rows(self):
        """One JSON-friendly dict per sequence (undefined values such as 0/0 become None)."""

        def num(x):
            x = float(x)
            return None if math.isnan(x) else x

        return [{
            "n_tokens": int(self.n[b]),
            "logp_sum": num(self.logp_sum[b]),
            "phi_sum": num(self.phi_sum[b]),
            "phi_mean": num(self.phi_mean[b]),
            "share_phi_pos": num(self.share_phi_pos[b]),
            **{f"share_phi_gt_{int(c)}": num(s[b]) for c, s in self.share_phi_gt.items()},
            "V_sum": num(self.V_sum[b]),
            "z": num(self.z[b]),
            "p_value": num(self.p_value[b]),
            "phi_cumsum": self.phi_cumsum[b][self.mask[b]].tolist(),
        } for b in range(len(self.n))]


def sequence_scores(stats: TokenStats, mask) -> SequenceScores:
    """Aggregate TokenStats [B, T] over a response mask [B, T]. Rows with no response token get
    n = 0 and NaN for every ratio (0/0 is undefined)."""
    m = mask.bool()
    n = m.sum(-1).float()
    phi = torch.where(m, stats.phi, 0.0)
    phi_sum = phi.sum(-1)
    V_sum = torch.where(m, stats.V, 0.0).sum(-1)

    def share(cond):
        return (cond & m).float().sum(-1) / n

    z = phi_sum / V_sum.sqrt()
    return SequenceScores(
        n=n.long(), logp_sum=torch.where(m, stats.logp, 0.0).sum(-1), phi_sum=phi_sum, phi_mean=phi_sum / n,
        phi_cumsum=phi.cumsum(-1), mask=m, share_phi_pos=share(stats.phi > 0),
        share_phi_gt={c: share(stats.phi > c) for c in PHI_SHARE_THRESHOLDS}, V_sum=V_sum, z=z,
        p_value=torch.special.ndtr(z.double()))


def score_sequences(logits, tokens, response_mask, chunk_size=STATS_CHUNK) -> SequenceScores:
    """SequenceScores of each row's response, from the logits of one forward over tokens."""
    return sequence_scores(*response_token_stats(logits, tokens, response_mask, chunk_size))


# ---- Scoring examples with a model ------------------------------------------------------------
# The scoring context: the plain prompt (the question in the chat template, no hints), the full
# vocabulary, temperature 1, float32 logits; exactly the tokens training sees.


def response_hidden(model, seqs: list[tuple[list[int], int]], pad_id: int, skip_ids=()):
    """One causal forward over right-padded (ids, n_prompt) rows: the final hidden states at the
    positions that predict a response token [N, D], those tokens [N], and where they sit,
    mask [B, T−1]. Targets whose id is in skip_ids are left out (e.g. the end-of-turn token)."""
    tokens, response = pad_sequences(seqs, pad_id, device=model.embed_tokens.weight.device)
    targets, mask = next_token_targets(tokens, response)
    for skip in skip_ids:
        mask &= targets != skip
    return model.hidden_states(tokens[:, :-1])[mask], targets[mask], mask


def float32_logits(model, hidden: torch.Tensor, chunk: int):
    """Logits W_out·h in float32 for hidden states [N, D], chunk by chunk (never all N at once)."""
    weight = model.output_weight.float()  # a no-op for float32 weights; one copy for bfloat16
    return (torch.nn.functional.linear(hidden[i:i + chunk].float(), weight) for i in range(0, len(hidden), chunk))


def spread(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Flat per-token values back into the [B, T] layout of `mask` (zeros elsewhere)."""
    return torch.zeros(mask.shape, device=values.device).masked_scatter(mask, values)


@torch.no_grad()
def score_examples(model, seqs, pad_id: int, batch_size: int, chunk: int = STATS_CHUNK,
                   token_phi: bool = False, progress: bool = False, skip_ids=()) -> list[dict]:
    """DDT scores of each (ids, n_prompt) sequence's response: one JSON-friendly dict per sequence
    (SequenceScores.to_rows without the running sum); with token_phi, also the per-token φ_t.
    Response tokens whose id is in skip_ids are not scored."""
    from tqdm import tqdm

    rows = []
    for start in tqdm(range(0, len(seqs), batch_size), desc="scoring", disable=not progress, file=sys.stderr):
        hidden, y, mask = response_hidden(model, seqs[start:start + batch_size], pad_id, skip_ids)
        parts = [token_stats(logits, y_part) for logits, y_part in zip(float32_logits(model, hidden, chunk),
                                                                       y.split(chunk))]
        stats = TokenStats(*(spread(mask, torch.cat([getattr(p, f) for p in parts])) for f in ("logp", "H", "phi", "V")))
        for b, row in enumerate(sequence_scores(stats, mask).to_rows()):
            del row["phi_cumsum"]  # per-token detail; the summary numbers are what people read
            if token_phi:
                row["phi_tokens"] = stats.phi[b][mask[b]].tolist()
            rows.append(row)
    return rows


def summarize(rows: list[dict], alpha: float) -> dict:
    """Data-set summary: spread of average φ and of z, and the share judged off-distribution by
    the authors' rule (average φ < −0.1) and by the calibrated test (p-value < α)."""
    phi_mean = torch.tensor([r["phi_mean"] for r in rows if r["phi_mean"] is not None], dtype=torch.float64)
    z = torch.tensor([r["z"] for r in rows if r["z"] is not None], dtype=torch.float64)
    return {
        "examples": len(rows), "response_tokens": sum(r["n_tokens"] for r in rows),
        "phi_mean_mean": phi_mean.mean().item(), "phi_mean_median": phi_mean.median().item(),
        "phi_mean_std": phi_mean.std().item() if len(phi_mean) > 1 else 0.0,
        "z_mean": z.mean().item(), "z_std": z.std().item() if len(z) > 1 else 0.0,
        "z_median": z.median().item(),
        "share_ood_rule_of_thumb": (phi_mean < -0.1).double().mean().item(),
        "alpha": alpha, "z_threshold": torch.special.ndtri(torch.tensor(alpha, dtype=torch.float64)).item(),
        "share_ood_calibrated": sum(r["p_value"] is not None and r["p_value"] < alpha for r in rows) / len(rows),
    }


# ---- Command line -----------------------------------------------------------------------------


SCORE_KEYS = ("id", "line", "n_tokens", "phi_mean", "z", "p_value")  # every line of ddt.py's output has these


def score_file(args, out) -> int:
    """Score --data (this process's share under torchrun), and on rank 0 write `out` and print
    the summary."""
    import json

    from data import encode_example, load_examples
    from model import Transformer, check_vocabulary
    from plumbing.files import atomic_write
    from plumbing.report import plot_scores
    from plumbing.precision import compute_dtype
    from plumbing.ranks import rank_device, start_ranks
    from plumbing.records import map_sharded
    from tokenizer import Tokenizer

    examples = load_examples(args.data)[:args.limit]
    ranks = start_ranks()
    device = rank_device("cuda" if torch.cuda.is_available() else "cpu")
    model = Transformer.from_pretrained(args.model, dtype=getattr(torch, compute_dtype(args.dtype, device)), device=device)
    tok = Tokenizer.from_pretrained(args.model)
    check_vocabulary(tok, model.config.vocab_size, args.model)
    skip_ids = () if args.end_of_turn else (tok.eos_id,)
    rows = map_sharded(examples, lambda batch: score_examples(
        model, [encode_example(tok, ex) for ex in batch], tok.pad_id, args.batch_size, token_phi=args.plot,
        skip_ids=skip_ids), ranks, args.batch_size, desc="scoring")
    if not ranks.main:
        return 0
    lines = [json.dumps({"id": ex.id, "line": ex.line, **{k: v for k, v in r.items() if k != "phi_tokens"}})
             for ex, r in zip(examples, rows)]
    atomic_write(out, "".join(line + "\n" for line in lines))
    if args.plot:  # after the scores, which mark it as ddt.py's (main)
        plot_scores(rows, out.with_suffix(".png"))
    s = summarize(rows, args.alpha)
    scored = "response + end-of-turn token" if args.end_of_turn else "response text alone (--no-end-of-turn)"
    print(f"{s['examples']} examples, {s['response_tokens']} response tokens scored ({scored}) by {args.model}")
    print(f"average φ per example   mean {s['phi_mean_mean']:+.4f}   median {s['phi_mean_median']:+.4f}   "
          f"std {s['phi_mean_std']:.4f}")
    print(f"z = Σφ/sqrt(ΣV)         mean {s['z_mean']:+.3f}   median {s['z_median']:+.3f}   std {s['z_std']:.3f}   "
          "(model's own samples: ≈ 0 and ≈ 1)")
    print(f"off-distribution        authors' rule (average φ < −0.1): {s['share_ood_rule_of_thumb']:.1%}")
    print(f"                        calibrated (z < {s['z_threshold']:.3f}, false-alarm rate {args.alpha:g}): "
          f"{s['share_ood_calibrated']:.1%}")
    print(f"per-example scores: {out}" + (f"; plot: {out.with_suffix('.png')}" if args.plot else ""))
    return 0


def main(argv=None) -> int:
    import argparse
    from pathlib import Path

    from hub import BUNDLED_NAME
    from plumbing.cli import ArgumentParser, UserError, positive_int, run_cli
    from plumbing.files import (check_disjoint, check_input, check_output, check_replaceable, lock_output, lock_path,
                                written_by)
    from plumbing.precision import DTYPES

    ap = ArgumentParser(description="Score how on-policy a data set's responses are for a model (DDT).")
    ap.add_argument("--model", default=BUNDLED_NAME, help="HF directory, hub id, or the bundled model name")
    ap.add_argument("--data", required=True, help="JSONL: {question, answer}, {prompt, response} or {messages}")
    ap.add_argument("--out", default=None, help="per-example scores (JSONL); default: DATA with suffix .ddt.jsonl")
    ap.add_argument("--alpha", type=float, default=0.05, help="false-alarm rate of the calibrated test z < Φ⁻¹(α)")
    ap.add_argument("--batch-size", type=positive_int, default=8)
    ap.add_argument("--limit", type=positive_int, default=None, help="score only the first N examples")
    ap.add_argument("--plot", action="store_true", help="also save histograms of φ_t and z as OUT.png")
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help="weights dtype (default: bfloat16 on CUDA, float32 on CPU); the statistics are float32")
    ap.add_argument("--end-of-turn", action=argparse.BooleanOptionalAction, default=True,
                    help="score the end-of-turn token after each response, as training sees it (default); "
                         "--no-end-of-turn scores the response text alone, like the authors' demo, whose "
                         "−0.05 / −0.1 thresholds assume that")

    def run(argv):
        args = ap.parse_args(argv)
        if not 0 < args.alpha < 1:
            raise UserError(f"--alpha must lie strictly between 0 and 1, got {args.alpha}")
        check_input(args.data, "--data")
        out = check_output(args.out or Path(args.data).with_suffix(".ddt.jsonl"), "--out")  # its real path
        plot = [out.with_suffix(".png")] if args.plot else []
        if out in plot:
            raise UserError(f"--out {out}: the scores and their plot would share a file; name it NAME.jsonl")
        check_disjoint([("--out", p) for p in (out, *plot, lock_path(out))],
                       [("--data", args.data), ("--model", args.model)])
        # replace only ddt.py's own outputs: scores by their keys, the plot when the scores beside it are ours
        check_replaceable(out, "--out", "ddt.py", lambda p: written_by(p, SCORE_KEYS))
        for path in plot:
            check_replaceable(path, "--out", "ddt.py", lambda p: written_by(out, SCORE_KEYS))
        with lock_output(out):  # under torchrun, rank 0's lock covers the run
            return score_file(args, out)

    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
