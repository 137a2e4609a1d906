"""tools/verdicts.py: the verdict rule of results/claims.yaml has a known error rate.

Simulated under the null (many synthetic families of paired per-seed differences with normal
noise and no true difference), the rule's family-wise rate of false verdicts is at most
alpha = 5 %; the lenient rule it replaced ("> 2 standard errors, same sign on every seed") is
shown to exceed it. The closed-form t distribution is checked against SciPy where installed, and
the committed results/verdicts.json against a fresh evaluation of results/claims.yaml."""

from __future__ import annotations

import importlib.util
import math
import random
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("verdicts", REPO / "tools/verdicts.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["verdicts"] = mod
    spec.loader.exec_module(mod)
    return mod


vd = _load()


def _family_false_rate(
    rng: random.Random, families: int, m: int, n: int, old_rule: bool = False
) -> float:
    """Share of null families (every true difference zero) with at least one non-inconclusive
    verdict; each comparison gets its own noise level, as real comparisons do."""
    bad = 0
    for _ in range(families):
        sds = [rng.uniform(0.3, 3.0) for _ in range(m)]
        diffs = [[rng.gauss(0.0, sd) for _ in range(n)] for sd in sds]
        if old_rule:
            hit = False
            for d in diffs:
                mean = statistics.fmean(d)
                se = statistics.stdev(d) / math.sqrt(n)
                same_sign = all(x > 0 for x in d) or all(x < 0 for x in d)
                hit |= abs(mean) > 2 * se and same_sign
        else:
            tests = [vd.paired_test(d) for d in diffs]
            rejected = vd.holm([t["p"] for t in tests], 0.05)
            verdicts = [vd.verdict(t["mean"], r, 1) for t, r in zip(tests, rejected, strict=True)]
            hit = any(v != "inconclusive" for v in verdicts)
        bad += hit
    return bad / families


@pytest.mark.parametrize(("m", "n"), [(24, 3), (6, 5), (1, 3)])
def test_family_wise_false_verdict_rate_is_at_most_alpha(m: int, n: int) -> None:
    families = 2000
    rate = _family_false_rate(random.Random(1234 + m + n), families, m, n)
    # binomial standard error of the estimate at 5 %: 0.5 points; allow 3 of them
    tol = 3 * math.sqrt(0.05 * 0.95 / families)
    assert rate <= 0.05 + tol, f"family-wise false-verdict rate {rate:.3f} at m={m}, n={n}"


def test_the_old_lenient_rule_exceeds_alpha() -> None:
    # per comparison it labels about 18 % of true nulls; over a family of 24 nearly every
    # family gets a spurious verdict
    assert _family_false_rate(random.Random(7), 500, 1, 3, old_rule=True) > 0.12
    assert _family_false_rate(random.Random(8), 200, 24, 3, old_rule=True) > 0.9


def test_holm_steps_down_and_stops_at_the_first_failure() -> None:
    assert vd.holm([0.01, 0.04, 0.03], 0.05) == [True, False, False]
    assert vd.holm([0.001, 0.02, 0.04], 0.05) == [True, True, True]
    assert vd.holm([0.2, 0.001], 0.05) == [False, True]
    assert vd.holm([], 0.05) == []


def test_verdict_labels() -> None:
    assert vd.verdict(1.0, True, +1) == "confirmed"
    assert vd.verdict(-1.0, True, +1) == "contradicted"
    assert vd.verdict(-1.0, True, -1) == "confirmed"
    assert vd.verdict(2.0, True, 0) == "contradicted"  # a no-difference claim is never confirmed
    assert vd.verdict(5.0, False, +1) == "inconclusive"


def test_t_distribution_matches_known_values() -> None:
    # two-sided 5 % critical values (tables): df 1 12.706, 2 4.303, 4 2.776, 30 2.042
    for df, crit in [(1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042)]:
        assert vd.t_two_sided_p(crit, df) == pytest.approx(0.05, abs=2e-4)
        assert vd.t_quantile(0.975, df) == pytest.approx(crit, abs=1e-3)
    assert vd.t_quantile(0.025, 3) == pytest.approx(-vd.t_quantile(0.975, 3))
    with pytest.raises(ValueError, match="NaN"):
        vd.paired_test([0.1, float("nan"), 0.2])
    with pytest.raises(ValueError, match="at least 2 seeds"):
        vd.paired_test([0.1])


def test_t_distribution_matches_scipy_where_installed() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 8, 40):
        for t in (0.05, 2.09, 4.3, 12.0):
            assert vd.t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(t, df), abs=1e-9)
        for q in (0.8, 0.975, 0.999):
            assert vd.t_quantile(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-8)


def test_seeds_needed_gives_about_the_requested_power() -> None:
    n = vd.seeds_needed(sd=1.0, effect=1.0, m=1, alpha=0.05, power=0.8)
    assert n is not None and 8 <= n <= 12  # the textbook value for d = 1 is 10
    rng = random.Random(3)
    hits = 0
    for _ in range(2000):
        t = vd.paired_test([rng.gauss(1.0, 1.0) for _ in range(n)])
        hits += t["p"] <= 0.05 and t["mean"] > 0
    assert hits / 2000 >= 0.75
    # a larger family or a smaller effect needs more seeds
    assert vd.seeds_needed(1.0, 1.0, m=24) > n
    assert vd.seeds_needed(1.0, 0.5, m=1) > n


def test_committed_verdicts_are_what_the_claims_file_gives() -> None:
    pytest.importorskip("yaml")
    assert vd.main(["--check"]) == 0
