"""scripts/study_stats.py: the exact McNemar test and the detectable difference of a paired comparison,
against hand-computed values, the exact binomial and simulated exact tests."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import study_stats  # noqa: E402


def test_mcnemar_matches_hand_computed_values_and_the_exact_binomial():
    # 10 questions only A gets right, 2 only B: 2 · P[Bin(12, 1/2) ≤ 2] = 2 · (1 + 12 + 66) / 4096
    assert study_stats.mcnemar_p_value(10, 2) == pytest.approx(158 / 4096, rel=1e-12)
    assert study_stats.mcnemar_p_value(2, 10) == study_stats.mcnemar_p_value(10, 2)
    assert study_stats.mcnemar_p_value(4, 0) == pytest.approx(0.125) and study_stats.mcnemar_p_value(0, 0) == 1.0
    assert study_stats.mcnemar_p_value(5, 5) == 1.0  # the doubled tail passes 1 at a tie: capped
    from fractions import Fraction

    for n_a in range(15):  # two-sided p: every outcome of Bin(n, 1/2) at most as likely as the observed
        for n_b in range(15):
            n = n_a + n_b
            probs = [Fraction(math.comb(n, i), 2 ** n) for i in range(n + 1)]
            exact = sum(p for p in probs if p <= probs[n_a])
            assert study_stats.mcnemar_p_value(n_a, n_b) == pytest.approx(float(min(exact, 1)), rel=1e-9), (n_a, n_b)


def test_paired_comparison_counts_and_power():
    a = [True, True, False, True, False, True, True, False]
    b = [True, False, False, False, True, False, True, False]
    got = study_stats.paired_comparison(a, b)
    assert (got["n"], got["only_a"], got["only_b"]) == (8, 3, 1) and got["difference"] == pytest.approx(2 / 8)
    assert got["p_value"] == study_stats.mcnemar_p_value(3, 1)
    assert study_stats.paired_comparison(a, a)["detectable_difference"] is None  # never disagree: no basis for ψ
    # 5 disagreements in 300: even 5 to 0 has p = 1/16 > 0.05, so nothing is detectable
    assert study_stats.detectable_difference(300, 5 / 300) is None and study_stats.mcnemar_p_value(5, 0) > 0.05
    with pytest.raises(ValueError, match="not the same questions"):
        study_stats.paired_comparison(a, b[:-1])
    # the stated detectable difference is detected about 80% of the time (simulated exact tests)
    import random

    rng, n, psi = random.Random(0), 300, 0.3
    delta = study_stats.detectable_difference(n, psi)
    hits = 0
    for _ in range(2000):
        only_a = only_b = 0
        for _ in range(n):
            u = rng.random()
            only_a += u < (psi + delta) / 2
            only_b += (psi + delta) / 2 <= u < psi
        hits += study_stats.mcnemar_p_value(only_a, only_b) < 0.05
    assert 0.72 < hits / 2000 < 0.88, hits / 2000
