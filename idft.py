"""In-Distribution Finetuning (IDFT) and its baselines: per-token reweighted cross-entropy.

Maps to SPEC §3, per response token t (prompt and padding tokens are masked out):

    φ_t     = log p_t(y_t) + H_t                    ddt.token_stats / ddt.log_softmax_stats (no gradient)
    γ_raw   = clamp(exp(−φ_t / β), γ_min, γ_max)    idft_gamma
    γ_t     = 1 + λ · (γ_raw − 1)                   idft_gamma; λ from lambda_schedule
    w_t     = stopgrad(p_t(y_t) ^ γ_t)              token_weights("idft") (detached inputs)
    loss_t  = − w_t · log p_t(y_t)                  per_token_loss("idft")

so ∇loss_t = −w_t ∇log p_t(y_t). γ ≡ 0 gives SFT (w = 1), γ ≡ 1 gives DFT (w = p); λ = 0
gives γ = 1, so a schedule that starts at λ = 0 starts as DFT. Defaults β = 1, γ_min = 0.1,
γ_max = 2. The other methods, same interface (`method` strings):

    "sft"      w = 1
    "dft"      w = stopgrad(p)                            (Wu et al., arXiv 2508.05629)
    "eaft"     w = stopgrad(H_t / log|V|)                 (arXiv 2601.02151; IDFT authors' variant)
               top_k=K: w = stopgrad(H_K / log K), H_K the entropy of the softmax of the K largest
               logits, as in the EAFT paper (K = 20). Their LLaMA-Factory code divides by the constant
               3.0 ≈ ln 20 = 2.996; we divide by log K so the weight stays in [0, 1] for any K.
    "idft_v1"  loss_t = −p^stopgrad(γ) · log p: only the exponent is detached (first paper version),
               so ∇loss_t = −p^γ (1 + γ log p) ∇log p, which pushes *down* tokens with p < e^{−1/γ}.
    b=...      hard-threshold ablation for idft / idft_v1: loss_t times 1[−b < φ_t < b] (phi_band);
               tokens cut by the band still count in the denominator. The authors' code has
               the band on the v1 loss only: theirs is `--loss idft_v1 --threshold b`.

Normalization: `token_loss_sum` returns the *sum* of loss_t over valid tokens and their count,
so a trainer divides once by the number of valid tokens of the whole optimizer step (all
micro-batches, all ranks). `sft_loss`, `idft_loss`, ... are the per-batch means.

Two paths compute the same numbers:
- reference (`token_loss_sum`): from full logits [..., |V|], autograd does the rest. Readable,
  but holds several [tokens × |V|] float32 tensors (logits, log-softmax, their gradients).
- memory-lean (`chunked_loss`): from the final hidden states [..., D] and the output matrix
  W [|V|, D], chunk by chunk over tokens. Every method's loss depends on the logits only through
  ℓ_t = log p_t(y_t) (φ, H, w are detached; in idft_v1 only γ is), so by the chain rule

      ∂loss_t/∂logits_t = (∂loss_t/∂ℓ_t) · (onehot(y_t) − p_t)

  with ∂loss_t/∂ℓ_t = −w_t for the detached-weight methods and, for idft_v1,
  d/dℓ [−exp(γ ℓ) ℓ] = −p^γ (1 + γ ℓ_t)  (`loss_slope`). The forward pass computes
  g = ∂loss/∂logits per chunk, turns it into ∂/∂hidden = g W and ∂/∂W = gᵀ hidden, and keeps
  only those ([tokens × D] and [|V| × D]); backward scales them by the incoming gradient. Both
  paths take w_t and γ_t from `token_weights`; the tests check the chunked gradients against
  autograd on the reference.

Logged statistics (`loss_stats`): over the valid tokens of the whole optimizer step (every
micro-batch; train.py sums them over ranks), mean / population std / min / max /
interpolated median of φ and γ, and 10-bin histograms (counts) of φ over [−3β, 3β] and γ over
[γ_min, γ_max], values outside the range counted in the edge bins. The authors log the last
micro-batch of rank 0 only, with the unbiased std, the lower median and ratios of in-range
values (out-of-range φ dropped); README "where ours departs" lists these.
"""

import math

import torch

from ddt import log_softmax_stats, token_stats

METHODS = ("sft", "dft", "eaft", "idft", "idft_v1")
LOSS_CHUNK = 1024  # tokens per chunk of the memory-lean path
HIST_BINS = 10


def lambda_schedule(step, total_steps, warmup_ratio=0.0, transition_ratio=0.0):
    """λ at optimizer step `step` of `total_steps` (SPEC §3): 0 during warmup, linear to 1, then 1.

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


def idft_gamma(phi, beta=1.0, gamma_min=0.1, gamma_max=2.0, lam=1.0):
    """γ_t = 1 + λ (clamp(exp(−φ_t / β), γ_min, γ_max) − 1)."""
    gamma_raw = torch.exp(-phi / beta).clamp(gamma_min, gamma_max)
    return 1 + lam * (gamma_raw - 1)


def eaft_entropy(logits, H, top_k=None):
    """EAFT's normalized entropy h_t ∈ [0, 1]: H_t / log|V|, or over the top_k logits H_K / log K."""
    if top_k is None:
        return H / math.log(logits.shape[-1])
    top = logits.reshape(-1, logits.shape[-1]).topk(top_k, dim=-1).values
    _, H_k, _, _ = log_softmax_stats(top)
    return H_k.view(H.shape) / math.log(top_k)


def phi_band(phi, b=None):
    """Hard-threshold ablation factor 1[−b < φ_t < b] (1 everywhere when b is None)."""
    return 1.0 if b is None else ((phi > -b) & (phi < b)).float()


def token_weights(method, logp, phi, h=None, *, beta=1.0, gamma_min=0.1, gamma_max=2.0, lam=1.0, b=None):
    """w_t and γ_t (None outside IDFT) from detached per-token values: ℓ_t = logp, φ_t, EAFT's h_t."""
    if method == "sft":
        return torch.ones_like(logp), None
    if method == "dft":
        return logp.exp(), None
    if method == "eaft":
        return h, None
    if method in ("idft", "idft_v1"):
        gamma = idft_gamma(phi, beta, gamma_min, gamma_max, lam)
        w = torch.exp(gamma * logp)  # w_t = p_t(y_t)^γ_t as exp(γ ℓ): exactly 1 at γ = 0, no 0^γ
        return phi_band(phi, b) * w, gamma
    raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


def per_token_loss(method, logp, phi, h=None, **knobs):
    """loss_t as autograd sees it: ℓ_t = logp carries the gradient, everything else is detached.

    Returns (loss_t, γ_t or None). knobs: beta, gamma_min, gamma_max, lam, b (see token_weights).
    """
    w, gamma = token_weights(method, logp.detach(), phi, h, **knobs)  # w_t = stopgrad(...)
    if method == "idft_v1":  # only the exponent is detached: loss_t = −p^stopgrad(γ) log p
        return -phi_band(phi, knobs.get("b")) * torch.exp(gamma * logp) * logp, gamma
    return -w * logp, gamma


def loss_slope(method, logp, w, gamma):
    """∂loss_t/∂ℓ_t: −w_t when the weight is detached; −p^γ (1 + γ ℓ_t) for idft_v1 (w_t = p^γ)."""
    return -w * (1 + gamma * logp) if method == "idft_v1" else -w


def _histogram(x, lo, hi, bins=HIST_BINS):
    """Counts in `bins` equal bins over [lo, hi]; values outside go to the edge bins."""
    inner_edges = torch.linspace(lo, hi, bins + 1, device=x.device)[1:-1]
    idx = torch.bucketize(x, inner_edges, right=True)
    return torch.bincount(idx, minlength=bins).tolist()


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
    """JSON-friendly summary of φ (and γ for idft methods, mean H_t when given) over the valid
    tokens (1-D tensors)."""
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


def _third_output(phi, gamma, H, return_stats, return_tokens, beta, gamma_min, gamma_max):
    """What the loss functions return next to (loss_sum, n_valid): raw tokens, stats, or None."""
    if return_tokens:
        return phi.detach(), None if gamma is None else gamma.detach(), H.detach()
    return loss_stats(phi, gamma, beta, gamma_min, gamma_max, entropy=H) if return_stats else None


def _check(method, mask, targets):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if mask.shape != targets.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match targets {tuple(targets.shape)}")


def token_loss_sum(method, logits, targets, mask, *, beta=1.0, gamma_min=0.1, gamma_max=2.0, lam=1.0,
                   b=None, top_k=None, return_stats=True, return_tokens=False):
    """Reference path: (Σ_valid loss_t, number of valid tokens, extra).

    logits [..., |V|] (any float dtype; softmax math in float32) score targets [...]; mask [...]
    is 1 on the tokens to train on. Targets under mask 0 may hold anything (e.g. −100).
    extra: with return_tokens, (φ, γ, H) of the valid tokens as detached 1-D tensors (γ is None
    for non-IDFT methods), so a trainer can summarize a whole optimizer step with
    loss_stats(torch.cat(φs), torch.cat(γs), entropy=torch.cat(Hs)); else the loss_stats dict of this call if
    return_stats; else None.
    """
    _check(method, mask, targets)
    valid = mask.bool()
    targets = targets.masked_fill(~valid, 0)
    st = token_stats(logits.detach(), targets)  # φ_t, H_t in float32, no gradient
    logits32 = logits.float()
    # ℓ_t = z_t[y_t] − logsumexp(z_t), the one input with a gradient (logsumexp stays within 1e-6
    # of float64 at |V| = 152k, where torch's CPU log_softmax errs by up to 5e-5)
    logp = logits32.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits32, dim=-1)
    h = eaft_entropy(logits32.detach(), st.H, top_k) if method == "eaft" else None
    loss_t, gamma = per_token_loss(method, logp, st.phi, h, beta=beta, gamma_min=gamma_min,
                                   gamma_max=gamma_max, lam=lam, b=b)
    loss_sum = torch.where(valid, loss_t, 0.0).sum()
    extra = _third_output(st.phi[valid], None if gamma is None else gamma[valid], st.H[valid], return_stats,
                          return_tokens, beta, gamma_min, gamma_max)
    return loss_sum, int(valid.sum()), extra


def _mean_loss(method, logits, targets, mask, **knobs):
    loss_sum, n_valid, _ = token_loss_sum(method, logits, targets, mask, return_stats=False, **knobs)
    return loss_sum / max(n_valid, 1)  # an all-masked batch gives 0, not NaN


def sft_loss(logits, targets, mask):
    """Mean over valid tokens of −log p_t(y_t)."""
    return _mean_loss("sft", logits, targets, mask)


def dft_loss(logits, targets, mask):
    """Mean over valid tokens of −stopgrad(p_t(y_t)) log p_t(y_t)."""
    return _mean_loss("dft", logits, targets, mask)


def eaft_loss(logits, targets, mask, top_k=None):
    """Mean over valid tokens of −stopgrad(h_t) log p_t(y_t), h the normalized (top-k) entropy."""
    return _mean_loss("eaft", logits, targets, mask, top_k=top_k)


def idft_loss(logits, targets, mask, beta=1.0, gamma_min=0.1, gamma_max=2.0, lam=1.0, b=None):
    """Mean over valid tokens of −stopgrad(p_t(y_t)^γ_t) log p_t(y_t) (current IDFT)."""
    return _mean_loss("idft", logits, targets, mask, beta=beta, gamma_min=gamma_min, gamma_max=gamma_max,
                      lam=lam, b=b)


def idft_v1_loss(logits, targets, mask, beta=1.0, gamma_min=0.1, gamma_max=2.0, lam=1.0, b=None):
    """Mean over valid tokens of −p_t(y_t)^stopgrad(γ_t) log p_t(y_t) (first-version IDFT)."""
    return _mean_loss("idft_v1", logits, targets, mask, beta=beta, gamma_min=gamma_min,
                      gamma_max=gamma_max, lam=lam, b=b)


def _chunk_forward(method, hidden_c, y_c, weight, grad_W, need_hidden, top_k, loss_knobs):
    """One chunk of valid tokens: (loss_t, φ, γ, H, ∂loss/∂hidden_c or None); adds ∂loss/∂W into grad_W.

    A function of its own so that the chunk's [chunk × |V|] buffers are freed on return.
    """
    logits = hidden_c @ weight.T  # the chunk's logits, in the input dtype (bf16 matmul on GPU)
    logp, H, _, p = log_softmax_stats(logits, y_c)  # float32 from here on
    phi = logp + H  # φ_t = ℓ_t + H_t
    h = eaft_entropy(logits, H, top_k) if method == "eaft" else None
    del logits
    w, gamma = token_weights(method, logp, phi, h, **loss_knobs)
    loss_t = -w * logp  # also the value of idft_v1's loss (only its gradient differs)
    grad_hidden = None
    if need_hidden or grad_W is not None:
        # ∂loss/∂logits = ∂loss/∂ℓ · (onehot − p), built in place in the p buffer
        slope = loss_slope(method, logp, w, gamma)
        g = p.mul_(-slope[:, None])
        g[torch.arange(len(y_c), device=g.device), y_c] += slope
        g = g.to(weight.dtype)
        if need_hidden:
            grad_hidden = g @ weight
        if grad_W is not None:  # float32 accumulator, even for bf16 weights (rounded once at the end)
            if g.dtype == torch.float32:
                grad_W.addmm_(g.T, hidden_c)  # in place: no [|V| × D] temporary per chunk
            else:
                grad_W += g.T @ hidden_c
    return loss_t, phi, gamma, H, grad_hidden


class _ChunkedLoss(torch.autograd.Function):
    """Σ_valid loss_t from hidden states and the output matrix, gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, mask, method, loss_knobs, top_k, chunk_size):
        D = hidden.shape[-1]
        rows = mask.reshape(-1).bool().nonzero().squeeze(1)  # only valid tokens are ever computed
        hidden_valid = hidden.reshape(-1, D)[rows]
        y_valid = targets.reshape(-1)[rows]
        n = rows.numel()
        need_hidden, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden_valid = torch.empty_like(hidden_valid) if need_hidden else None
        grad_W = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_W else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        phi_valid = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy_valid = torch.empty(n, dtype=torch.float32, device=hidden.device)
        gamma_valid = torch.empty(n if method in ("idft", "idft_v1") else 0, device=hidden.device)
        for i in range(0, n, chunk_size):
            c = slice(i, i + chunk_size)
            loss_t, phi_valid[c], gamma, entropy_valid[c], grad_hidden_c = _chunk_forward(
                method, hidden_valid[c], y_valid[c], weight, grad_W, need_hidden, top_k, loss_knobs)
            loss_sum += loss_t.sum()
            if gamma is not None:
                gamma_valid[c] = gamma
            if need_hidden:
                grad_hidden_valid[c] = grad_hidden_c

        grad_hidden = None
        if need_hidden:
            grad_hidden = (torch.zeros_like(hidden).reshape(-1, D).index_copy_(0, rows, grad_hidden_valid)
                           .view(hidden.shape))
        ctx.save_for_backward(grad_hidden, None if grad_W is None else grad_W.to(weight.dtype))
        ctx.mark_non_differentiable(phi_valid, gamma_valid, entropy_valid)
        return loss_sum, phi_valid, gamma_valid, entropy_valid

    @staticmethod
    def backward(ctx, grad_loss, _grad_phi, _grad_gamma, _grad_entropy):
        grad_hidden, grad_W = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_W is not None:
            grad_W = grad_W * grad_loss.to(grad_W.dtype)
        return grad_hidden, grad_W, None, None, None, None, None, None


def chunked_loss(method, hidden, weight, targets, mask, chunk_size=LOSS_CHUNK, *, beta=1.0, gamma_min=0.1,
                 gamma_max=2.0, lam=1.0, b=None, top_k=None, return_stats=True, return_tokens=False):
    """Memory-lean path, same result as token_loss_sum(method, hidden @ weight.T, targets, mask).

    hidden [..., D] final hidden states (after the final norm), weight [|V|, D] output matrix,
    targets / mask [...]. Returns (Σ_valid loss_t, number of valid tokens, extra) with extra as
    in token_loss_sum; loss_sum.backward() fills hidden.grad / weight.grad as the reference
    would. Holds one chunk of logits at a time: about three [chunk_size × |V|] float32 buffers,
    plus the saved gradients ([tokens × D] and [|V| × D], in the inputs' dtypes) and a float32
    [|V| × D] accumulator. Not twice differentiable.
    """
    _check(method, mask, targets)
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match targets {tuple(targets.shape)}")
    loss_knobs = {"beta": beta, "gamma_min": gamma_min, "gamma_max": gamma_max, "lam": lam, "b": b}
    if not torch.is_grad_enabled():  # e.g. evaluation: skip building the gradients in forward
        hidden, weight = hidden.detach(), weight.detach()
    loss_sum, phi, gamma, H = _ChunkedLoss.apply(hidden, weight, targets, mask, method, loss_knobs, top_k,
                                                 chunk_size)
    extra = _third_output(phi, gamma if method in ("idft", "idft_v1") else None, H, return_stats, return_tokens,
                          beta, gamma_min, gamma_max)
    return loss_sum, phi.numel(), extra
