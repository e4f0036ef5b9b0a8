"""Statistics of the study (scripts/reproduce.py): paired comparisons of two models.

Two models on the same questions are compared by the exact McNemar test: of the n_A questions
only model A answers right and the n_B only B does, under "equally accurate" each of these
n_A + n_B discordant questions is a fair coin, so p = min(1, 2·P[Bin(n_A + n_B, 1/2) ≤ min(n_A, n_B)]).
Pairing removes the questions both get right or both get wrong, which an unpaired comparison of
two intervals counts as noise.
"""

import math

Z95 = 1.959963984540054  # two-sided 95% normal quantile
Z80 = 0.8416212335729143  # one-sided 80% normal quantile (power of a planned test)


def mcnemar_p_value(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test (see the module docstring): the p-value of `only_a` questions
    answered right by model A alone against `only_b` by model B alone."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired_comparison(correct_a: list[bool], correct_b: list[bool]) -> dict:
    """A against B on the same questions: both verdict lists in the same question order."""
    if len(correct_a) != len(correct_b):
        raise ValueError(f"{len(correct_a)} and {len(correct_b)} verdicts: not the same questions")
    n = len(correct_a)
    only_a = sum(a and not b for a, b in zip(correct_a, correct_b))
    only_b = sum(b and not a for a, b in zip(correct_a, correct_b))
    discordant_share = (only_a + only_b) / n if n else 0.0
    return {"n": n, "only_a": only_a, "only_b": only_b, "difference": (only_a - only_b) / n if n else 0.0,
            "p_value": mcnemar_p_value(only_a, only_b),
            "detectable_difference": detectable_difference(n, discordant_share)}


def detectable_difference(n: int, discordant_share: float) -> float | None:
    """Smallest accuracy difference δ a paired test on n questions detects with 80% power at
    two-sided 5%, given the share ψ of questions the two models disagree on:
    δ ≈ (z_0.975 + z_0.8) · sqrt(ψ / n) (normal approximation to McNemar's test). None when
    no difference is detectable: δ ≥ ψ (the models disagree on too few questions for even a
    one-sided split of them to be significant), or the models never disagree."""
    if not n or not discordant_share:
        return None
    delta = (Z95 + Z80) * math.sqrt(discordant_share / n)
    return delta if delta < discordant_share else None
