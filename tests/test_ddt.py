"""ddt.py against float64 brute force, exact enumeration, and a sampling experiment."""

import json
import math

import pytest
import torch

import ddt


def brute_stats(logits, targets):
    """ℓ, H, φ, V in float64, straight from the definitions (docs/math.md, "DDT")."""
    log_p = torch.log_softmax(logits.double(), -1)
    p = log_p.exp()
    logp = log_p.gather(-1, targets[..., None]).squeeze(-1)
    H = -(p * log_p).sum(-1)
    V = (p * log_p**2).sum(-1) - H**2
    return logp, H, logp + H, V


def random_logits(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    # per-row scales from nearly flat to very peaked
    scale = torch.exp(torch.empty(*shape[:-1], 1).uniform_(-2, 3, generator=g))
    return torch.randn(*shape, generator=g) * scale


def test_phi_has_mean_zero_and_variance_V_under_p():
    # E_{y~p}[φ] = 0 and E_{y~p}[φ²] = V, by summing over every possible y weighted by p(y)
    rows, vocab = 6, 13
    logits = random_logits(rows, vocab, seed=1)
    every_y = torch.arange(vocab).expand(rows, vocab)
    st = ddt.token_stats(logits[:, None, :].expand(rows, vocab, vocab), every_y)
    p = torch.softmax(logits.double(), -1)
    mean_phi = (p * st.phi.double()).sum(-1)
    second_moment = (p * st.phi.double() ** 2).sum(-1)
    torch.testing.assert_close(mean_phi, torch.zeros(rows, dtype=torch.float64), atol=2e-6, rtol=0)
    torch.testing.assert_close(second_moment, st.V[:, 0].double(), atol=1e-5, rtol=1e-5)


def test_token_stats_matches_float64():
    logits = random_logits(3, 7, 50, seed=2)
    logits[0, 0] = 0.0
    logits[0, 0, 3] = 40.0  # nearly one-hot: the naive varentropy formula cancels badly here
    targets = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(3))
    st = ddt.token_stats(logits, targets, chunk_size=5)
    for got, want in zip((st.logp, st.H, st.phi, st.V), brute_stats(logits, targets)):
        assert got.dtype == torch.float32 and got.shape == targets.shape
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    assert (st.V >= 0).all()


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])])
@pytest.mark.parametrize("vocab", [49_152, 152_064])  # SmolLM2's vocabulary, Qwen2.5's
def test_float32_stats_are_unbiased_against_float64_at_real_vocabulary_sizes(vocab, device):
    """The stated bound (ddt.py's docstring): per token |ΔH| ≤ 1e-5, |Δφ| ≤ 1e-5 + 1e-7·|ℓ| (the
    float32 rounding of log p(y) itself, which reaches −100 for unlikely tokens of peaked rows)
    and |ΔV| ≤ 1e-5·V + 1e-6; and no bias: the mean error over all tokens is within 1e-6 of 0.
    Logits from nearly flat to sharply peaked. An einsum reduction errs by up to 1.7e-3 here,
    biased low; torch's CPU log_softmax by 1e-4."""
    g = torch.Generator().manual_seed(vocab)
    rows = []
    for scale in (0.3, 1.0, 3.0, 10.0, 30.0):
        logits = torch.randn(48, vocab, generator=g) * scale
        logits[:, :50] += 5 * scale * torch.rand(48, 1, generator=g)  # a few favoured tokens per row
        rows.append(logits)
    logits = torch.cat(rows)
    targets = torch.randint(0, vocab, (len(logits),), generator=g)
    targets[::2] = logits[::2].argmax(-1)  # likely tokens as well as unlikely ones
    st = ddt.token_stats(logits.to(device), targets.to(device), chunk_size=100)
    want = brute_stats(logits, targets)
    for got, ref, name in zip((st.H, st.phi, st.V), (want[1], want[2], want[3]), "HφV"):
        err = got.cpu().double() - ref
        bound = {"H": 1e-5, "φ": 1e-5 + 1e-7 * want[0].abs(), "V": 1e-5 * ref.abs() + 1e-6}[name]
        assert (err.abs() <= bound).all(), (name, err.abs().max().item())
        assert abs(err.mean().item()) < 1e-6, (name, err.mean().item())


def test_varentropy_is_accurate_for_nearly_uniform_rows():
    # H² and Σ p (log p)² are both ≈ (log 1000)² ≈ 48 here while V ≈ 1e-4: their float32
    # difference would be off by about 10%; the deviation form stays within 1e-5
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(8)) * 1e-2
    V = ddt.token_stats(logits, torch.zeros(4, dtype=torch.long)).V
    want = brute_stats(logits, torch.zeros(4, dtype=torch.long))[3]
    torch.testing.assert_close(V.double(), want, rtol=1e-4, atol=0)


def test_bf16_logits_give_float32_stats():
    logits = random_logits(2, 9, 40, seed=4).bfloat16()
    targets = torch.randint(0, 40, (2, 9))
    st = ddt.token_stats(logits, targets)
    ref = ddt.token_stats(logits.float(), targets)
    for got, want in zip((st.logp, st.H, st.phi, st.V), (ref.logp, ref.H, ref.phi, ref.V)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_chunking_does_not_change_results():
    logits = random_logits(4, 25, 31, seed=5)
    targets = torch.randint(0, 31, (4, 25))
    ref = ddt.token_stats(logits, targets, chunk_size=10_000)
    for chunk in (1, 7, 64):
        st = ddt.token_stats(logits, targets, chunk_size=chunk)
        for got, want in zip((st.logp, st.H, st.phi, st.V), (ref.logp, ref.H, ref.phi, ref.V)):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_response_token_stats_shifts_by_one():
    B, T, V = 2, 6, 11
    logits = random_logits(B, T, V, seed=6)
    tokens = torch.randint(0, V, (B, T))
    response = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    st, mask = ddt.response_token_stats(logits, tokens, response)
    assert mask.tolist() == response[:, 1:].bool().tolist()
    want = brute_stats(logits[:, :-1], tokens[:, 1:])[2]
    torch.testing.assert_close(st.phi[mask].double(), want[mask], atol=2e-5, rtol=2e-5)


def test_sequence_scores_match_hand_computation():
    g = torch.Generator().manual_seed(7)
    phi = torch.randn(3, 8, generator=g) * 2
    V = torch.rand(3, 8, generator=g) + 0.1
    stats = ddt.TokenStats(logp=phi - 1, H=torch.ones(3, 8), phi=phi, V=V)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2] = False  # a row with no response token
    sc = ddt.sequence_scores(stats, mask)
    for b in range(2):
        f = phi[b][mask[b]].double()
        v = V[b][mask[b]].double()
        z = f.sum() / v.sum().sqrt()
        assert sc.n[b] == len(f)
        assert sc.phi_sum[b].item() == pytest.approx(f.sum().item(), abs=1e-5)
        assert sc.logp_sum[b].item() == pytest.approx((f - 1).sum().item(), abs=1e-5)
        assert sc.phi_mean[b].item() == pytest.approx(f.mean().item(), abs=1e-5)
        assert sc.share_phi_pos[b].item() == pytest.approx((f > 0).double().mean().item())
        for c in (-1, -3, -5):
            assert sc.share_phi_gt[c][b].item() == pytest.approx((f > c).double().mean().item())
        assert sc.z[b].item() == pytest.approx(z.item(), abs=1e-5)
        assert sc.p_value[b].item() == pytest.approx(0.5 * math.erfc(-z.item() / math.sqrt(2)), rel=1e-5)
        torch.testing.assert_close(sc.phi_cumsum[b][mask[b]].double(), f.cumsum(0), atol=1e-5, rtol=0)
    rows = json.loads(json.dumps(sc.to_rows(), allow_nan=False))  # strict JSON, no NaN
    assert rows[2]["n_tokens"] == 0 and rows[2]["z"] is None and rows[2]["phi_mean"] is None
    assert len(rows[0]["phi_cumsum"]) == 5


# --- calibration of z on a tiny random transformers Llama -------------------------------------

def tiny_llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # initializer_range 0.2 (not 0.02) so next-token distributions are neither flat nor one-hot:
    # mean entropy about 3.4 nats of log(100) = 4.6, mean varentropy about 2
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def sample(model, prompts, n_new, generator):
    """Ancestral sampling at temperature 1 with a KV cache."""
    out = model(input_ids=prompts, use_cache=True)
    seq = prompts
    for _ in range(n_new):
        nxt = torch.multinomial(torch.softmax(out.logits[:, -1].float(), -1), 1, generator=generator)
        seq = torch.cat([seq, nxt], 1)
        out = model(input_ids=nxt, cache=out.cache, use_cache=True)
    return seq


@pytest.fixture
def one_thread():
    # many tiny ops: extra threads only add contention on a busy machine (18x slower when shared)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_z_is_standard_normal_on_policy_and_negative_off_policy(one_thread):
    n, prompt_len, n_new = 1024, 4, 48
    model, other = tiny_llama(0), tiny_llama(1)
    g = torch.Generator().manual_seed(123)
    prompts = torch.randint(0, 100, (n, prompt_len), generator=g)
    own = sample(model, prompts, n_new, g)
    foreign = sample(other, prompts, n_new, g)
    response = torch.zeros_like(own, dtype=torch.bool)
    response[:, prompt_len:] = True
    with torch.no_grad():
        scores_own = ddt.score_sequences(model(input_ids=own).logits, own, response)
        scores_foreign = ddt.score_sequences(model(input_ids=foreign).logits, foreign, response)

    z_own = scores_own.z.double()
    # On-policy, Σφ is a martingale with E[(Σφ)²] = E[ΣV], so z ≈ N(0, 1) (martingale CLT).
    # Mean of n draws with unit variance: 4 standard errors = 4/√n (two-sided p ≈ 6e-5).
    assert abs(z_own.mean().item()) < 4 / math.sqrt(n)
    # (n−1)s²/σ² ~ χ²_{n−1}; for large n that is ≈ N(n−1, 2(n−1)), so s² = 1 ± 4·√(2/(n−1))
    # at 4 standard deviations (the normal-theory width; z's tails are near-normal here).
    s2 = z_own.var().item()
    assert abs(s2 - 1) < 4 * math.sqrt(2 / (n - 1)), s2
    # The promise to users: thresholding the p-value at α flags about a fraction α of on-policy
    # text. Binomial count, 4 standard errors: |rate − α| < 4·√(α(1−α)/n).
    alpha = 0.05
    false_alarm_rate = (scores_own.p_value < alpha).double().mean().item()
    assert abs(false_alarm_rate - alpha) < 4 * math.sqrt(alpha * (1 - alpha) / n), false_alarm_rate
    # Text from a different random model: clearly negative, nearly always flagged at α = 0.05.
    assert scores_foreign.z.mean() < -5
    assert (scores_foreign.p_value < alpha).double().mean() > 0.95
