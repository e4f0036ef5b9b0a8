"""Distribution Discriminant Theory (DDT): how on-policy is a token, and a sequence?

Maps to SPEC §2. At response position t the model predicts p_t = π_θ(· | x, y_<t) over the
vocabulary (size |V|) and the data token is y_t. Per token (all float32, no gradient):

    ℓ_t = log p_t(y_t)                          -> TokenStats.logp
    H_t = −Σ_v p_t(v) log p_t(v)                -> TokenStats.H       (`entropy`)
    φ_t = ℓ_t + H_t        (centered log-lik.)   -> TokenStats.phi
    V_t = Σ_v p_t(v) (log p_t(v) + H_t)²         -> TokenStats.V       (varentropy)

V_t is Var_{v~p_t}[log p_t(v)] = Σ_v p_t(v) (log p_t(v))² − H_t², written in the centred
form above because the second form subtracts two large, nearly equal numbers.

If y_t ~ p_t (on-policy) then E[φ_t] = 0 and Var[φ_t] = V_t given the past, whatever the
position's difficulty, so the partial sums Σφ_t form a martingale. If y_t ~ q_t instead,
E_q[φ_t] = H(p_t) − H(q_t) − KL(q_t‖p_t): negative when the KL beats the entropy gap.

Per sequence (over the response mask), `sequence_scores` gives the statistics of the paper's
code: total φ, average φ, running sum of φ, share of φ > 0 and shares of φ > −1, −3, −5.
Authors' rule of thumb: average φ below about −0.1 means "out of distribution", about −0.05
is good. That threshold ignores length and per-token noise; our calibrated alternative is

    z = Σ_t φ_t / sqrt(Σ_t V_t)                 -> SequenceScores.z
    p-value = P(Z ≤ z), Z ~ N(0, 1)             -> SequenceScores.p_value

which, for text the model itself samples at temperature 1, is close to a standard normal by
the martingale central limit theorem. Flag a sequence as off-distribution when
p_value < α (equivalently z < Φ⁻¹(α), e.g. z < −1.645 for α = 0.05): about a fraction α of
on-policy sequences is flagged by mistake, whatever their length.

Which tokens are scored: the response and its end-of-turn token, exactly what training sees
(data.encode_example). The authors' demo scores the response text only; the end-of-turn token
is often improbable where the model would have gone on (φ ≈ −4 on gsm_symbolic references for
the bundled model, scripts/departures.py), and one such token moves a short response's average
φ by several hundredths, across their −0.05 / −0.1 rule of thumb. `score_examples(..., score_end_of_turn=False)` (`ddt.py
--no-end-of-turn`) scores without it, to compare with their thresholds.

Precision: every sum over the vocabulary is a float32 `sum` over rows (`row_dot`), and log p
is z − logsumexp(z) with the sum of exponentials done the same way. Against float64, H and φ
err by under 1e-5 and V by under 1e-5 relative at |V| = 152,064, with no bias
(tests/test_ddt.py). Two faster-looking alternatives are not: `einsum("nv,nv->n")` runs as a
batched matrix product that drifts low (H off by up to 1.3e-3 at |V| = 152k), and torch's CPU
`log_softmax` kernel errs by up to 5e-5 in log p, with a bias.

Memory: logits are processed in chunks of tokens; per chunk the code holds two
[chunk × |V|] float32 buffers (log p and p), never the float32 copy of the whole batch.
`log_probs`, `entropy` and `log_softmax_stats` are the one implementation of this math:
idft.py (the loss), hinted_decode.py (the mixing weight) and eval.py (the drift KL) use them.

`torchrun --nproc_per_node N ddt.py --data ...` scores in parallel: batch k of --batch-size
examples goes to rank k mod N (data.shard), rank 0 gathers the rows in input order and writes
the same file a single process writes.
"""

import math
import sys
from dataclasses import dataclass

import torch

STATS_CHUNK = 1024  # tokens per chunk: 1024 × 152k vocabulary × 4 bytes ≈ 0.6 GiB per buffer
ROW_DOT_ELEMENTS = 1 << 22  # elements per block of row_dot's product: a 16 MiB temporary
PHI_SHARE_THRESHOLDS = (-1.0, -3.0, -5.0)  # shares of φ_t above these, as in the authors' code


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[n, v] b[n, v] for each row n, a block of rows at a time (the product's temporary
    stays small). torch's `sum` reduces in a cascade, so float32 stays unbiased over 152k terms."""
    rows = max(1, ROW_DOT_ELEMENTS // a.shape[-1])
    if len(a) <= rows:
        return (a * b).sum(-1)
    return torch.cat([(a[i:i + rows] * b[i:i + rows]).sum(-1) for i in range(0, len(a), rows)])


def log_probs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, p), both float32 [n, |V|], from logits [n, |V|] of any float dtype.

    log p = z − m − log Σ_v exp(z_v − m) with m = max_v z_v; the sum of exponentials is a
    plain `sum` (torch's CPU log_softmax kernel errs by up to 5e-5 at |V| = 152k)."""
    log_p = logits - logits.amax(-1, keepdim=True).float()  # float32 by type promotion: one buffer
    p = log_p.exp()
    total = p.sum(-1, keepdim=True)
    p /= total
    log_p -= total.log()
    return log_p, p


def entropy(log_p: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """H = −Σ_v p(v) log p(v) per row: the one entropy of the project."""
    return -row_dot(p, log_p)


def log_softmax_stats(logits: torch.Tensor, targets: torch.Tensor | None = None):
    """The DDT math for one chunk of logits [n, |V|] (any float dtype), done in float32.

    Returns (logp, H, V, p): ℓ = log p(y) [n] (None when targets is None), entropy H [n],
    varentropy V [n], and the probabilities p [n, |V|] float32, which callers may reuse in
    place (idft.py turns p into the gradient of the logits).
    """
    log_p, p = log_probs(logits)
    logp = None if targets is None else log_p.gather(-1, targets[:, None]).squeeze(-1)
    H = entropy(log_p, p)
    V = row_dot(p, log_p.add_(H[:, None]).square_())  # Σ p (log p + H)², in the log p buffer
    return logp, H, V, p


@dataclass
class TokenStats:
    """Per-token DDT statistics, float32, shape [...] of the targets."""

    logp: torch.Tensor  # ℓ_t = log p_t(y_t)
    H: torch.Tensor  # entropy H_t
    phi: torch.Tensor  # φ_t = ℓ_t + H_t
    V: torch.Tensor  # varentropy V_t


@torch.no_grad()
def token_stats(logits, targets, chunk_size=STATS_CHUNK):
    """ℓ, H, φ, V for every position: logits[..., t, :] scores targets[..., t].

    logits: [..., |V|] any float dtype; targets: [...] long (ids must be valid, mask elsewhere).
    Returns TokenStats of float32 tensors shaped like targets. Chunked over flattened tokens.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    flat_logits = logits.reshape(-1, logits.shape[-1])
    y = targets.reshape(-1)
    logp, H, V = (torch.empty(y.shape, dtype=torch.float32, device=flat_logits.device) for _ in range(3))
    for i in range(0, y.numel(), chunk_size):
        j = i + chunk_size
        logp[i:j], H[i:j], V[i:j], _ = log_softmax_stats(flat_logits[i:j], y[i:j])
    shape = targets.shape
    phi = logp + H
    return TokenStats(logp.view(shape), H.view(shape), phi.view(shape), V.view(shape))


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
    """Stats of the response tokens of whole sequences, from one causal forward pass.

    logits [B, T, |V|] come from running the model on tokens [B, T] (prompt + response, right
    padded); response_mask [B, T] marks response tokens. The result (TokenStats, mask) is
    aligned with next_token_targets: length T − 1.
    """
    targets, mask = next_token_targets(tokens, response_mask)
    # score all T positions (the last one predicts past the end: a dummy target, dropped after)
    # rather than slicing logits[:, :-1], which would copy the whole logits tensor
    padded = torch.nn.functional.pad(targets.masked_fill(~mask, 0), (0, 1))
    st = token_stats(logits, padded, chunk_size)
    return TokenStats(st.logp[:, :-1], st.H[:, :-1], st.phi[:, :-1], st.V[:, :-1]), mask


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

        rows = []
        for b in range(len(self.n)):
            rows.append({
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
            })
        return rows


def sequence_scores(stats, mask):
    """Aggregate TokenStats [B, T] over a response mask [B, T] into SequenceScores.

    Rows with no response token get n = 0 and NaN for every ratio (0/0 is undefined).
    """
    m = mask.bool()
    n = m.sum(-1).float()
    phi = torch.where(m, stats.phi, 0.0)
    phi_sum = phi.sum(-1)
    V_sum = torch.where(m, stats.V, 0.0).sum(-1)

    def share(cond):
        return (cond & m).float().sum(-1) / n

    z = phi_sum / V_sum.sqrt()
    return SequenceScores(
        n=n.long(),
        logp_sum=torch.where(m, stats.logp, 0.0).sum(-1),
        phi_sum=phi_sum,
        phi_mean=phi_sum / n,
        phi_cumsum=phi.cumsum(-1),
        mask=m,
        share_phi_pos=share(stats.phi > 0),
        share_phi_gt={c: share(stats.phi > c) for c in PHI_SHARE_THRESHOLDS},
        V_sum=V_sum,
        z=z,
        p_value=torch.special.ndtr(z.double()),
    )


def score_sequences(logits, tokens, response_mask, chunk_size=STATS_CHUNK):
    """SequenceScores of each row's response, from the logits of one forward over tokens."""
    stats, mask = response_token_stats(logits, tokens, response_mask, chunk_size)
    return sequence_scores(stats, mask)


# ---- Scoring examples with a model ------------------------------------------------------------
# Scoring context (SPEC §2): the plain prompt (question in the chat template, no hints), full
# vocabulary, temperature 1, float32 logits — exactly the tokens training sees
# (data.encode_example: prompt ++ response ++ end of turn).


def response_hidden(model, seqs: list[tuple[list[int], int]], pad_id: int, skip_ids=()):
    """One causal forward over right-padded (ids, n_prompt) rows.

    Returns the final hidden states at the positions that predict a response token [N, D],
    those tokens [N], and where they sit, mask [B, T−1] (next_token_targets). Targets whose id
    is in skip_ids are left out (e.g. the end-of-turn token).
    """
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
    Response tokens whose id is in skip_ids are not scored: pass the end-of-turn id to score
    the response text alone, as the authors' demo does (see the module docstring)."""
    from tqdm import tqdm

    rows = []
    starts = range(0, len(seqs), batch_size)
    for start in tqdm(starts, desc="scoring", disable=not progress, file=sys.stderr):
        hidden, y, mask = response_hidden(model, seqs[start:start + batch_size], pad_id, skip_ids)
        parts = [token_stats(logits, y_part)
                 for logits, y_part in zip(float32_logits(model, hidden, chunk), y.split(chunk))]
        stats = TokenStats(*(spread(mask, torch.cat([getattr(p, f) for p in parts]))
                             for f in ("logp", "H", "phi", "V")))
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


def plot_scores(rows: list[dict], path) -> None:
    """Histograms of per-token φ (all responses pooled) and of z, with the N(0, 1) density z
    would follow for on-policy text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data import atomic_write

    phi = [p for r in rows for p in r["phi_tokens"]]
    z = [r["z"] for r in rows if r["z"] is not None]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    a.hist(phi, bins=80, range=(-10, 5), color="tab:blue")
    a.axvline(0, color="k", lw=0.8)
    a.set(title="per-token φ = log p(y) + H", xlabel="φ_t", ylabel="tokens")
    b.hist(z, bins=30, density=True, color="tab:orange", alpha=0.8, label="data")
    grid = torch.linspace(min(-4.0, min(z, default=0.0)), max(4.0, max(z, default=0.0)), 200)
    b.plot(grid, torch.exp(-grid ** 2 / 2) / math.sqrt(2 * math.pi), "k", lw=1, label="N(0, 1): on-policy")
    b.set(title="z = Σφ / sqrt(ΣV) per response", xlabel="z", ylabel="density")
    b.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def main(argv=None) -> int:
    import argparse
    from pathlib import Path

    from data import ArgumentParser, UserError, check_input, check_output, lock_output, positive_int, print_error
    from hub import BUNDLED_NAME
    from model import CheckpointError

    ap = ArgumentParser(description="Score how on-policy a data set's responses are for a model (DDT).")
    ap.add_argument("--model", default=BUNDLED_NAME, help="HF directory, hub id, or the bundled model name")
    ap.add_argument("--data", required=True, help="JSONL: {question, answer}, {prompt, response} or {messages}")
    ap.add_argument("--out", default=None, help="per-example scores (JSONL); default: DATA with suffix .ddt.jsonl")
    ap.add_argument("--alpha", type=float, default=0.05, help="false-alarm rate of the calibrated test z < Φ⁻¹(α)")
    ap.add_argument("--batch-size", type=positive_int, default=8)
    ap.add_argument("--limit", type=positive_int, default=None, help="score only the first N examples")
    ap.add_argument("--plot", action="store_true", help="also save histograms of φ_t and z as OUT.png")
    ap.add_argument("--end-of-turn", action=argparse.BooleanOptionalAction, default=True,
                    help="score the end-of-turn token after each response, as training sees it (default); "
                         "--no-end-of-turn scores the response text alone, like the authors' demo, whose "
                         "−0.05 / −0.1 thresholds assume that")
    try:
        args = ap.parse_args(argv)
        if not 0 < args.alpha < 1:
            raise UserError(f"--alpha must lie strictly between 0 and 1, got {args.alpha}")
        check_input(args.data, "--data")
        out = check_output(args.out or Path(args.data).with_suffix(".ddt.jsonl"), "--out")
        with lock_output(out):  # under torchrun, rank 0's lock covers the run
            return score_file(args, out)
    except (UserError, CheckpointError) as e:
        return print_error(e)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing written", file=sys.stderr)
        return 130


def score_file(args, out) -> int:
    """ddt.py's work once its flags are checked: score --data (this process's share under
    torchrun: data.shard), and on rank 0 write `out` and print the summary."""
    import json

    from data import (atomic_write, encode_example, gather_in_order, load_examples, print_shares, rank_device, shard,
                      start_ranks)
    from model import Transformer
    from tokenizer import Tokenizer

    examples = load_examples(args.data)[:args.limit]
    ranks = start_ranks()
    device = rank_device("cuda" if torch.cuda.is_available() else "cpu")
    model = Transformer.from_pretrained(args.model, device=device)
    tok = Tokenizer.from_pretrained(args.model)
    seqs = [encode_example(tok, ex) for ex in shard(examples, ranks, args.batch_size)]
    skip_ids = () if args.end_of_turn else (tok.eos_id,)
    rows = score_examples(model, seqs, tok.pad_id, args.batch_size, token_phi=args.plot, progress=True,
                          skip_ids=skip_ids)
    print_shares(len(rows), ranks)
    rows = gather_in_order(rows, ranks, args.batch_size)
    if not ranks.main:
        return 0
    if args.plot:
        plot_scores(rows, out.with_suffix(".png"))
    lines = [json.dumps({"id": ex.id, "line": ex.line, **{k: v for k, v in r.items() if k != "phi_tokens"}})
             for ex, r in zip(examples, rows)]
    atomic_write(out, "".join(line + "\n" for line in lines))
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


if __name__ == "__main__":
    sys.exit(main())
