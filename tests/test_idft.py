"""idft.py: every loss against float64 brute force, gradient identities, and the chunked path that trains."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import idft

# (method, knobs): every loss, the EAFT top-k variant, IDFT's non-default knobs and the band ablation
CASES = [
    ("sft", {}),
    ("dft", {}),
    ("eaft", {}),
    ("eaft", {"top_k": 5}),
    ("idft", {}),
    ("idft", {"beta": 0.5, "gamma_min": 0.3, "gamma_max": 1.5, "lam": 0.4}),
    ("idft", {"b": 1.0}),
    ("idft_v1", {}),
    ("idft_v1", {"beta": 2.0, "b": 1.0}),
]
CASE_IDS = [m + "".join(f"-{k}={v}" for k, v in kn.items()) for m, kn in CASES]


def brute_loss_sum(method, logits, targets, mask, beta=1.0, gamma_min=0.1, gamma_max=2.0, lam=1.0, b=None,
                   top_k=None):
    """Σ_valid loss_t and its gradient wrt the logits, float64, straight from docs/math.md ("IDFT")."""
    z = logits.detach().double().requires_grad_()
    valid = mask.bool()
    y = torch.where(valid, targets, 0)
    log_p = torch.log_softmax(z, -1)
    p = log_p.exp()
    ell = log_p.gather(-1, y[..., None]).squeeze(-1)
    p_y = ell.exp()
    H = -(p * log_p).sum(-1)
    phi = (ell + H).detach()
    if method == "sft":
        loss = -ell
    elif method == "dft":
        loss = -p_y.detach() * ell
    elif method == "eaft":
        if top_k is None:
            h = H.detach() / math.log(z.shape[-1])
        else:
            q = torch.softmax(z.detach().sort(-1, descending=True).values[..., :top_k], -1)
            h = -(q * q.log()).sum(-1) / math.log(top_k)
        loss = -h * ell
    else:
        gamma = 1 + lam * (torch.clamp(torch.exp(-phi / beta), gamma_min, gamma_max) - 1)
        weight = p_y**gamma
        if method == "idft":
            weight = weight.detach()
        if b is not None:
            weight = weight * (phi.abs() < b)
        loss = -weight * ell
    total = loss[valid].sum()
    (grad,) = torch.autograd.grad(total, z)
    return total.detach(), grad


def make_batch(B=3, T=6, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.empty(B, T, 1).uniform_(-1, 2, generator=g))  # flat to peaked rows
    logits = torch.randn(B, T, vocab, generator=g) * scale
    targets = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[0, 0] = True
    mask[-1] = False  # a fully masked row (e.g. all prompt or padding)
    targets = torch.where(mask, targets, -100)  # whatever sits under mask 0 must be ignored
    return logits, targets, mask


def loss_and_grad(method, logits, targets, mask, **knobs):
    logits = logits.detach().clone().requires_grad_()
    loss_sum, n_valid, tokens = idft.loss_sum(logits, targets, mask, method, **knobs)
    (grad,) = torch.autograd.grad(loss_sum, logits)
    return loss_sum, n_valid, tokens, grad


@pytest.mark.parametrize("method,knobs", CASES, ids=CASE_IDS)
def test_loss_and_gradient_match_float64(method, knobs):
    logits, targets, mask = make_batch()
    loss_sum, n_valid, _, grad = loss_and_grad(method, logits, targets, mask, **knobs)
    want_loss, want_grad = brute_loss_sum(method, logits, targets, mask, **knobs)
    assert n_valid == int(mask.sum())
    assert loss_sum.item() == pytest.approx(want_loss.item(), rel=1e-5, abs=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, atol=1e-6, rtol=1e-5)


def float64_p_gamma(logits, targets, mask, **knobs):
    """p, onehot, ℓ and γ in float64 for the gradient identities."""
    valid = mask.bool()
    y = torch.where(valid, targets, 0)
    log_p = torch.log_softmax(logits.double(), -1)
    p = log_p.exp()
    ell = log_p.gather(-1, y[..., None]).squeeze(-1)
    phi = ell + -(p * log_p).sum(-1)
    gamma = 1 + knobs.get("lam", 1.0) * (torch.exp(-phi / knobs.get("beta", 1.0)).clamp(0.1, 2.0) - 1)
    return p, F.one_hot(y, logits.shape[-1]).double(), ell, gamma, valid[..., None]


def test_detached_idft_gradient_is_reweighted_cross_entropy():
    # ∇_z loss_t = −w_t ∇_z log p_t(y_t) = w_t (p_t − onehot(y_t)), w_t = p_t(y_t)^γ_t
    logits, targets, mask = make_batch(seed=1)
    _, _, _, grad = loss_and_grad("idft", logits, targets, mask, lam=0.7)
    p, onehot, ell, gamma, valid = float64_p_gamma(logits, targets, mask, lam=0.7)
    w = torch.exp(gamma * ell)[..., None]
    torch.testing.assert_close(grad.double(), w * (p - onehot) * valid, atol=1e-6, rtol=1e-5)


def test_idft_v1_gradient_has_the_extra_term():
    # ∇_z loss_t = −p^γ (1 + γ log p) ∇_z log p = p^γ (1 + γ log p) (p − onehot)
    logits, targets, mask = make_batch(seed=2)
    _, _, _, grad = loss_and_grad("idft_v1", logits, targets, mask)
    p, onehot, ell, gamma, valid = float64_p_gamma(logits, targets, mask)
    coef = (torch.exp(gamma * ell) * (1 + gamma * ell))[..., None]
    torch.testing.assert_close(grad.double(), coef * (p - onehot) * valid, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("idft_knobs,same_as", [
    ({"gamma_min": 0.0, "gamma_max": 0.0}, "sft"),  # γ ≡ 0: w = p⁰ = 1
    ({"gamma_min": 1.0, "gamma_max": 1.0}, "dft"),  # γ ≡ 1: w = p
    ({"lam": 0.0}, "dft"),  # λ = 0: γ = 1 + 0·(γ_raw − 1) = 1
])
def test_idft_special_cases_are_exact(idft_knobs, same_as):
    logits, targets, mask = make_batch(seed=3)
    a = loss_and_grad("idft", logits, targets, mask, **idft_knobs)
    b = loss_and_grad(same_as, logits, targets, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3])
    hidden = torch.randn(3, 6, 8)
    weight = torch.randn(40, 8)
    la, _, _ = idft.chunked_loss_sum(hidden, weight, targets, mask, "idft", **idft_knobs)
    lb, _, _ = idft.chunked_loss_sum(hidden, weight, targets, mask, same_as)
    assert torch.equal(la, lb)


def test_mean_losses():
    logits, targets, mask = make_batch(seed=4)
    # plain SFT is PyTorch's own cross-entropy with ignored positions
    want = F.cross_entropy(logits.reshape(-1, 40), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(idft.mean_loss(logits, targets, mask, "sft"), want)
    n = int(mask.sum())
    for method, knobs in [("dft", {}), ("eaft", {"top_k": 20}), ("idft", {"beta": 0.5}), ("idft_v1", {})]:
        want, _ = brute_loss_sum(method, logits, targets, mask, **knobs)
        assert idft.mean_loss(logits, targets, mask, method, **knobs).item() == pytest.approx(want.item() / n, rel=1e-5)


def test_lambda_schedule():
    kw = {"total_steps": 100, "warmup_ratio": 0.2, "transition_ratio": 0.1}
    assert [idft.lambda_schedule(s, **kw) for s in (0, 19, 20, 25, 29, 30, 31, 100)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.5, 0.9, 1.0, 1.0, 1.0])
    # the authors' launch script: no warmup, no transition -> λ = 1 from the first step
    assert idft.lambda_schedule(0, 100, 0.0, 0.0) == 1.0
    # warmup without transition: a step from 0 to 1
    assert [idft.lambda_schedule(s, 10, 0.5, 0.0) for s in (4, 5)] == [0.0, 1.0]
    # that a resumed run continues the schedule is checked on training: test_train.py's resume test
    with pytest.raises(ValueError):
        idft.lambda_schedule(0, 0)


def lean_and_reference(method, knobs, chunk_size, seed=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    B, T, D, vocab = 3, 7, 16, 50
    hidden = (torch.randn(B, T, D, generator=g)).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, D, generator=g) * 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[1] = False
    lean = idft.chunked_loss_sum(hidden, weight, targets, mask, method, chunk_size=chunk_size, **knobs)
    lean_grads = torch.autograd.grad(lean[0] * 0.37, (hidden, weight))  # backward must scale by 0.37
    ref = idft.loss_sum(hidden.float() @ weight.float().T, targets, mask, method, **knobs)
    ref_grads = torch.autograd.grad(ref[0] * 0.37, (hidden, weight))
    return lean, lean_grads, ref, ref_grads


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("method,knobs", CASES, ids=CASE_IDS)
def test_memory_lean_path_equals_reference(method, knobs, chunk_size):
    (loss, n, tokens), (gh, gw), (ref_loss, ref_n, ref_tokens), (rgh, rgw) = lean_and_reference(
        method, knobs, chunk_size)
    assert n == ref_n
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6, abs=1e-6)
    torch.testing.assert_close(gh, rgh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, rgw, atol=1e-6, rtol=1e-5)
    stats, ref_stats = idft.loss_stats(*tokens[:2], entropy=tokens[2]), idft.loss_stats(*ref_tokens[:2],
                                                                                        entropy=ref_tokens[2])
    assert stats.keys() == ref_stats.keys()
    for k in stats:
        assert stats[k] == pytest.approx(ref_stats[k], abs=1e-5), k


def test_memory_lean_bf16_keeps_input_dtype():
    method, knobs = "idft", {}
    (loss, _, _), (gh, gw), (ref_loss, _, _), (rgh, rgw) = lean_and_reference(method, knobs, 7,
                                                                               dtype=torch.bfloat16)
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    # bf16 logits vs float32 logits of the same bf16 inputs: agreement at bf16 precision
    assert loss.item() == pytest.approx(ref_loss.item(), rel=2e-2)
    torch.testing.assert_close(gh.float(), rgh.float(), atol=2e-2, rtol=5e-2)
    torch.testing.assert_close(gw.float(), rgw.float(), atol=2e-2, rtol=5e-2)


def test_all_masked_batch_is_zero_not_nan():
    logits, targets, mask = make_batch(seed=6)
    mask[:] = False
    for method, knobs in CASES:
        loss_sum, n_valid, (phi, _, _), grad = loss_and_grad(method, logits, targets, mask, **knobs)
        assert loss_sum.item() == 0.0 and n_valid == 0 and phi.numel() == 0
        assert torch.count_nonzero(grad) == 0
        hidden = torch.randn(3, 6, 8, requires_grad=True)
        weight = torch.randn(40, 8, requires_grad=True)
        lean_sum, lean_n, (phi, gamma, H) = idft.chunked_loss_sum(hidden, weight, targets, mask, method, **knobs)
        lean_stats = idft.loss_stats(phi, gamma, entropy=H)
        lean_sum.backward()
        assert lean_sum.item() == 0.0 and lean_n == 0 and lean_stats["phi_mean"] is None
        assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0
        assert sum(lean_stats["phi_hist"]) == 0
        json.dumps(lean_stats, allow_nan=False)
    assert idft.mean_loss(logits, targets, mask, "idft").item() == 0.0


def test_memory_lean_respects_frozen_inputs_and_no_grad():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(30, 8)  # frozen output matrix (e.g. adapters only)
    targets = torch.randint(0, 30, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    loss, _, _ = idft.chunked_loss_sum(hidden, weight, targets, mask, "idft", chunk_size=3)
    loss.backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        loss_eval, _, _ = idft.chunked_loss_sum(hidden, weight, targets, mask, "idft", chunk_size=3)
    assert not loss_eval.requires_grad and loss_eval.item() == pytest.approx(loss.item())


def test_stats_match_numpy():
    logits, targets, mask = make_batch(B=4, T=50, seed=7)
    if mask.sum() % 2:
        mask[0, 0] = False  # an even count, so the median is the mean of the middle two
    beta, gamma_min, gamma_max = 0.5, 0.2, 1.8
    _, n_valid, (phi_t, gamma_t, H_t), _ = loss_and_grad("idft", logits, targets, mask, beta=beta,
                                                         gamma_min=gamma_min, gamma_max=gamma_max)
    stats = idft.loss_stats(phi_t, gamma_t, beta, gamma_min, gamma_max, entropy=H_t)
    log_p = torch.log_softmax(logits.double(), -1)
    y = torch.where(mask, targets, 0)
    phi = (log_p.gather(-1, y[..., None]).squeeze(-1) - (log_p.exp() * log_p).sum(-1))[mask].numpy()
    gamma = np.clip(np.exp(-phi / beta), gamma_min, gamma_max)
    assert stats["n_valid"] == n_valid == len(phi)
    assert json.loads(json.dumps(stats, allow_nan=False)) == stats  # plain JSON for the trainer's log
    for name, x, lo, hi in (("phi", phi, -3 * beta, 3 * beta), ("gamma", gamma, gamma_min, gamma_max)):
        for stat, fn in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max),
                         ("median", np.median)):
            assert stats[f"{name}_{stat}"] == pytest.approx(fn(x), abs=1e-5), (name, stat)
        counts = stats[f"{name}_hist"]
        assert len(counts) == 10 and sum(counts) == n_valid  # out-of-range values land in edge bins
        assert counts == np.histogram(np.clip(x, lo, hi), bins=10, range=(lo, hi))[0].tolist()
        assert stats[f"{name}_hist_range"] == [lo, hi]
    _, _, (phi_t, gamma_t, _) = idft.loss_sum(logits, targets, mask, "dft")
    assert gamma_t is None and "gamma_mean" not in idft.loss_stats(phi_t, gamma_t)


def test_the_valid_tokens_phi_gamma_and_entropy_are_returned():
    hidden, weight = torch.randn(3, 6, 8), torch.randn(40, 8)
    _, targets, mask = make_batch(seed=8)
    logits = hidden @ weight.T
    p64 = torch.softmax(logits.double(), -1)
    entropy64 = -(p64 * p64.log()).sum(-1)[mask.bool()]  # H_t of the valid tokens, in float64
    for method in ("dft", "idft"):
        _, _, (phi, gamma, entropy) = idft.loss_sum(logits, targets, mask, method)
        _, _, (lean_phi, lean_gamma, lean_entropy) = idft.chunked_loss_sum(hidden, weight, targets, mask, method,
                                                                           chunk_size=5)
        stats = idft.loss_stats(phi, gamma, entropy=entropy)
        assert phi.shape == entropy.shape == (int(mask.sum()),) and not phi.requires_grad
        torch.testing.assert_close(lean_phi, phi)
        torch.testing.assert_close(entropy.double(), entropy64, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lean_entropy, entropy)
        assert (gamma is None) == (lean_gamma is None) == (method == "dft")
        if gamma is not None:
            torch.testing.assert_close(lean_gamma, gamma)
        # a trainer concatenates these over micro-batches and summarizes once per step
        assert abs(stats["entropy_mean"] - entropy64.mean().item()) < 1e-5


def test_bad_arguments_are_rejected():
    logits, targets, mask = make_batch()
    with pytest.raises(ValueError, match="unknown method"):
        idft.loss_sum(logits, targets, mask, "ppo")
    with pytest.raises(ValueError, match="does not match"):
        idft.chunked_loss_sum(torch.randn(3, 5, 8), torch.randn(40, 8), targets, mask, "idft")


def custom_backward_nodes(loss):
    """The nodes of loss's autograd graph that run a Python-defined backward (autograd.Function)."""
    seen, stack, found = set(), [loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            found.append(type(node).__name__)
        stack += [next_fn for next_fn, _ in node.next_functions]
    return found


@pytest.mark.parametrize("method,knobs", [("idft", {}), ("idft_v1", {"b": 2.0}), ("eaft", {"top_k": 5})])
def test_training_step_runs_the_readable_token_loss(method, knobs, tmp_path, monkeypatch):
    """train.LossHead's forward and backward go through idft.token_loss (forward, then once more when
    backward recomputes each chunk) and through no hand-written backward; its gradients equal the
    chain rule the previous implementation built by hand, ∂loss_t/∂z_t = (∂loss_t/∂ℓ_t)(onehot − p_t),
    restated here in float64."""
    from conftest import write_tiny_model

    import train

    model = write_tiny_model(tmp_path, vocab_size=96).train()
    head = train.LossHead(model, method, {**knobs, "chunk_size": 8})  # several chunks
    g = torch.Generator().manual_seed(0)
    inputs, targets = torch.randint(0, 96, (3, 11), generator=g), torch.randint(0, 96, (3, 11), generator=g)
    mask = torch.rand(3, 11, generator=g) < 0.7
    calls = []
    real = idft.token_loss
    monkeypatch.setattr(idft, "token_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss, n_valid, _ = head(inputs, targets, mask, torch.tensor(0.8))
    assert custom_backward_nodes(loss) == []
    n_chunks = math.ceil(n_valid / 8)
    assert len(calls) == n_chunks
    loss.backward()
    assert len(calls) == 2 * n_chunks  # each chunk recomputed once in backward

    # the hand-derived gradient of the previous implementation, from the same hidden states
    with torch.no_grad():
        h = model.hidden_states(inputs).double()[mask]
        W, y = model.output_weight.double(), targets[mask]
        log_p = torch.log_softmax(h @ W.T, -1)
        ell = log_p.gather(-1, y[:, None]).squeeze(-1)
        phi = ell - (log_p.exp() * log_p).sum(-1)
        if method == "eaft":
            top = torch.log_softmax((h @ W.T).topk(5, -1).values, -1)
            slope = (top.exp() * top).sum(-1) / math.log(5)  # −w_t
        else:
            gamma = 1 + 0.8 * (torch.exp(-phi).clamp(0.1, 2.0) - 1)
            b = knobs.get("b")
            w = torch.exp(gamma * ell) * (((phi > -b) & (phi < b)) if b else 1)
            slope = -w * (1 + gamma * ell) if method == "idft_v1" else -w  # idft_v1: d/dℓ [−exp(γ ℓ) ℓ]
        grad_logits = slope[:, None] * (F.one_hot(y, 96).double() - log_p.exp())
        want_grad_W = grad_logits.T @ h
    head.zero_grad()
    hidden = model.hidden_states(inputs).detach().requires_grad_()
    total, _, _ = idft.chunked_loss_sum(hidden, model.output_weight, targets, mask, method, lam=0.8, **knobs)
    total.backward()
    torch.testing.assert_close(hidden.grad[mask].double(), grad_logits @ W, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.output_weight.grad.double(), want_grad_W, atol=1e-6, rtol=1e-5)
