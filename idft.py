"""In-Distribution Finetuning (IDFT) and its baselines: cross-entropy reweighted per token.

Per response token t (docs/math.md, "IDFT"), from the logits of position t:

    ℓ_t    = log p_t(y_t)                                   the only term with a gradient
    φ_t    = ℓ_t + H_t                                      ddt.py, no gradient
    γ_t    = 1 + λ · (clamp(exp(−φ_t / β), γ_min, γ_max) − 1)    `idft_gamma`, λ: `lambda_schedule`
    w_t    = stopgrad(p_t(y_t) ^ γ_t)                       a .detach() in `token_loss`
    loss_t = −w_t · ℓ_t                                     so ∇loss_t = −w_t ∇ℓ_t

The baselines change w_t only: SFT w = 1; DFT w = stopgrad(p_t(y_t)); EAFT
w = stopgrad(H_t / log|V|) (or the entropy of the top K logits over log K). IDFT v1 (the
paper's first version) detaches γ_t alone, so its gradient −p^γ (1 + γ ℓ) ∇ℓ also pushes
down tokens with p < e^(−1/γ). The ablation b (--threshold) multiplies loss_t by
1[−b < φ_t < b]. γ ≡ 0 is SFT, γ ≡ 1 is DFT, and λ = 0 gives γ = 1: a schedule that starts
at λ = 0 starts as DFT.

A step's loss is Σ loss_t over its valid tokens divided once by their number, over all
micro-batches and ranks (train.py): `loss_sum` returns the sum and the count. Training runs
the same `token_loss` through `chunked_loss_sum`: each chunk's logits W_out·h are formed
from the final hidden states, used, freed, and recomputed in backward (activation
checkpointing), so no [tokens × |V|] tensor exists for the whole batch.
"""

import math

import torch
from torch.utils.checkpoint import checkpoint

from ddt import entropy, log_probs

METHODS = ("sft", "dft", "eaft", "idft", "idft_v1")
LOSS_CHUNK = 1024  # tokens per chunk of chunked_loss_sum
HIST_BINS = 10


def token_loss(logits, targets, method="idft", *, beta=1.0, gamma_min=0.1, gamma_max=2.0, lam=1.0, b=None,
               top_k=None):
    """loss_t for logits [n, |V|] (any float dtype; the math in float32) scoring targets [n].

    Returns (loss_t, φ_t, γ_t or None, H_t), the last three detached.
    """
    log_p = log_probs(logits)                                 # log p_t(v), float32
    ell = log_p.gather(-1, targets[:, None]).squeeze(-1)      # ℓ_t = log p_t(y_t)
    with torch.no_grad():
        H = entropy(log_p)                                    # H_t
        phi = ell + H                                         # φ_t = ℓ_t + H_t
    gamma = None
    if method == "sft":
        w = torch.ones_like(ell)                              # w_t = 1
    elif method == "dft":
        w = ell.exp().detach()                                # w_t = stopgrad(p_t(y_t))
    elif method == "eaft":
        w = eaft_entropy(logits.detach(), H, top_k)           # w_t = stopgrad(h_t), h_t in [0, 1]
    elif method in ("idft", "idft_v1"):
        gamma = idft_gamma(phi, beta, gamma_min, gamma_max, lam)
        w = torch.exp(gamma * ell)                            # p_t(y_t)^γ_t, exactly 1 at γ = 0
        if method == "idft":
            w = w.detach()                                    # w_t = stopgrad(p_t(y_t)^γ_t)
        w = phi_band(phi, b) * w                              # idft_v1: γ alone is detached
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return -w * ell, phi, gamma, H


def idft_gamma(phi, beta=1.0, gamma_min=0.1, gamma_max=2.0, lam=1.0):
    """γ_t = 1 + λ (clamp(exp(−φ_t / β), γ_min, γ_max) − 1)."""
    gamma_raw = torch.exp(-phi / beta).clamp(gamma_min, gamma_max)
    return 1 + lam * (gamma_raw - 1)


def lambda_schedule(step, total_steps, warmup_ratio=0.0, transition_ratio=0.0):
    """λ at optimizer step `step` of `total_steps`: 0 during warmup, linear to 1, then 1.

    A pure function of the step, so a resumed run continues the schedule where it stopped.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    s = step / total_steps
    if s < warmup_ratio:
        return 0.0
    if transition_ratio <= 0:
        return 1.0
    return min(1.0, (s - warmup_ratio) / transition_ratio)


def eaft_entropy(logits, H, top_k=None):
    """EAFT's normalized entropy h_t in [0, 1]: H_t / log|V|, or H_K / log K over the top_k logits.
    (The EAFT paper's code divides by the constant 3.0 ≈ ln 20; log K keeps h in [0, 1] for any K.)"""
    if top_k is None:
        return H / math.log(logits.shape[-1])
    return entropy(log_probs(logits.topk(top_k, dim=-1).values)) / math.log(top_k)


def phi_band(phi, b=None):
    """Hard-threshold ablation factor 1[−b < φ_t < b] (1 everywhere when b is None)."""
    return 1.0 if b is None else ((phi > -b) & (phi < b)).float()


# ---- Sums over the valid tokens of a batch ----------------------------------------------------


def _check(method, mask, targets):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if mask.shape != targets.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match targets {tuple(targets.shape)}")


def loss_sum(logits, targets, mask, method="idft", **knobs):
    """(Σ_valid loss_t, number of valid tokens, (φ, γ, H) of the valid tokens) from full logits
    [..., |V|] scoring targets [...]; mask [...] is 1 on the tokens to train on (targets under
    mask 0 may hold anything, e.g. −100). knobs: beta, gamma_min, gamma_max, lam, b, top_k."""
    _check(method, mask, targets)
    valid = mask.bool()
    loss_t, phi, gamma, H = token_loss(logits[valid], targets[valid], method, **knobs)
    return loss_t.sum(), int(valid.sum()), (phi, gamma, H)


def chunked_loss_sum(hidden, weight, targets, mask, method="idft", chunk_size=LOSS_CHUNK, **knobs):
    """loss_sum(hidden @ weight.T, targets, mask, method), from the final hidden states
    [..., D] and the output matrix W_out [|V|, D], `chunk_size` valid tokens at a time.

    Each chunk runs `token_loss` under activation checkpointing: its [chunk × |V|] logits and
    their softmax are freed after the forward and recomputed in backward, one chunk at a time.
    """
    _check(method, mask, targets)
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match targets {tuple(targets.shape)}")
    valid = mask.bool()
    h, y = hidden[valid], targets[valid]

    def chunk(h_c, y_c, W):
        loss_t, phi, gamma, H = token_loss(h_c @ W.T, y_c, method, **knobs)
        return loss_t.sum(), phi, gamma, H

    recompute = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = [checkpoint(chunk, h[i:i + chunk_size], y[i:i + chunk_size], weight, use_reentrant=False)
             if recompute else chunk(h[i:i + chunk_size], y[i:i + chunk_size], weight)
             for i in range(0, max(len(y), 1), chunk_size)]  # an empty batch: one empty chunk, loss 0
    gammas = [g for _, _, g, _ in parts if g is not None]
    tokens = (torch.cat([p for _, p, _, _ in parts]), torch.cat(gammas) if gammas else None,
              torch.cat([H for _, _, _, H in parts]))
    return sum(s for s, _, _, _ in parts), len(y), tokens


def mean_loss(logits, targets, mask, method="idft", **knobs):
    """Mean loss_t over the valid tokens of one batch (0, not NaN, when none is valid)."""
    total, n_valid, _ = loss_sum(logits, targets, mask, method, **knobs)
    return total / max(n_valid, 1)


# ---- Logged statistics ------------------------------------------------------------------------


def _histogram(x, lo, hi, bins=HIST_BINS):
    """Counts in `bins` equal bins over [lo, hi]; values outside go to the edge bins."""
    inner_edges = torch.linspace(lo, hi, bins + 1, device=x.device)[1:-1]
    return torch.bincount(torch.bucketize(x, inner_edges, right=True), minlength=bins).tolist()


def _summary(name, x):
    if x.numel() == 0:
        return {f"{name}_{k}": None for k in ("mean", "std", "min", "max", "median")}
    x = x.float()
    return {
        f"{name}_mean": x.mean().item(),
        f"{name}_std": x.std(correction=0).item(),  # population std, like numpy's default
        f"{name}_min": x.min().item(),
        f"{name}_max": x.max().item(),
        f"{name}_median": x.quantile(0.5).item(),  # interpolated, like numpy.median
    }


def loss_stats(phi, gamma=None, beta=1.0, gamma_min=0.1, gamma_max=2.0, *, entropy=None):
    """JSON-friendly summary of the valid tokens of a step (1-D tensors): mean / std / min / max /
    median of φ (and of γ for the IDFT methods), the mean entropy, and 10-bin histograms of φ
    over [−3β, 3β] and γ over [γ_min, γ_max] (values outside in the edge bins)."""
    stats = {"n_valid": phi.numel(), **_summary("phi", phi)}
    if entropy is not None:  # H_t falls when a loss sharpens the model (the entropy collapse)
        stats["entropy_mean"] = entropy.float().mean().item() if entropy.numel() else None
    stats["phi_hist"] = _histogram(phi, -3 * beta, 3 * beta)
    stats["phi_hist_range"] = [-3 * beta, 3 * beta]
    if gamma is not None:
        stats.update(_summary("gamma", gamma))
        stats["gamma_hist"] = _histogram(gamma, gamma_min, gamma_max)
        stats["gamma_hist_range"] = [gamma_min, gamma_max]
    return stats
