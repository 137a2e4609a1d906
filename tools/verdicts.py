"""Verdicts on the paper's claims: paired t-tests over seeds, Holm-Bonferroni over the family.

    python3 tools/verdicts.py            # results/claims.yaml -> results/verdicts.json
    python3 tools/verdicts.py --check    # exit 1 when results/verdicts.json is not what it gives

The claims, the rule and its parameters are declared in ``results/claims.yaml`` (read its
header). Per comparison: the per-seed differences ``d_s = acc(a, s) - acc(b, s)``, the two-sided
one-sample t-test of ``mean(d) = 0``; Holm-Bonferroni over every claim of the file at ``alpha``;
a rejected comparison is *confirmed* when ``mean(d)`` has the claim's sign, *contradicted*
otherwise (a claim of no difference, ``equal``, can only be contradicted); not rejected:
*inconclusive*. ``seeds_needed`` is the smallest number of seeds with approximate power
``power`` for the claim's effect at Holm's worst-case level ``alpha / m``, given the observed
standard deviation of the differences (:func:`seeds_needed`).

The t distribution is computed here (no SciPy): for an integer number of degrees of freedom its
two-sided tail has a closed form (Abramowitz & Stegun 26.7.3 / 26.7.4). Accuracy differences in
the output are in percentage points.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "holm",
    "paired_test",
    "seeds_needed",
    "t_quantile",
    "t_two_sided_p",
    "verdict",
    "evaluate",
]

REPO = Path(__file__).resolve().parents[1]
CLAIMS = REPO / "results" / "claims.yaml"
OUT = REPO / "results" / "verdicts.json"
DIRECTIONS = {"greater": 1, "less": -1, "equal": 0}


def _a_of_t(t: float, df: int) -> float:
    """``P(|T| < t)`` for Student's t with ``df`` (a positive integer) degrees of freedom."""
    if df < 1:
        raise ValueError(f"df must be a positive integer, got {df}")
    t = abs(t)
    if math.isinf(t):
        return 1.0
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    s = math.sin(theta)
    if df % 2 == 1:
        # 2/pi * (theta + sin(theta) * (cos + 2/3 cos^3 + 2*4/(3*5) cos^5 + ... up to cos^(df-2)))
        if df == 1:
            return 2.0 * theta / math.pi
        term = math.cos(theta)
        total = term
        for j in range(3, df - 1, 2):
            term *= c2 * (j - 1) / j
            total += term
        return 2.0 / math.pi * (theta + s * total)
    # sin(theta) * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
    term = 1.0
    total = 1.0
    for j in range(2, df - 1, 2):
        term *= c2 * (j - 1) / j
        total += term
    return s * total


def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value ``P(|T| >= |t|)``; NaN ``t`` is refused."""
    if math.isnan(t):
        raise ValueError("t is NaN")
    return max(0.0, 1.0 - _a_of_t(t, df))


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t (``0 < q < 1``), by bisection on the closed-form CDF."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    upper = q > 0.5
    tail = 2.0 * (1.0 - q if upper else q)  # two-sided tail probability
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > tail:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_p(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    x = 0.5 * (lo + hi)
    return x if upper else -x


def paired_test(diffs: Sequence[float]) -> dict[str, float | int]:
    """Mean, standard deviation, standard error, t, degrees of freedom and two-sided p of the
    per-seed differences (``n >= 2``; a zero standard deviation gives ``p = 0`` unless the mean
    is zero too)."""
    n = len(diffs)
    if n < 2:
        raise ValueError(f"a paired test needs at least 2 seeds, got {n}")
    if any(math.isnan(d) for d in diffs):
        raise ValueError("a per-seed difference is NaN")
    mean = math.fsum(diffs) / n
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    if se == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / se
    return {
        "n": n,
        "mean": mean,
        "sd": sd,
        "se": se,
        "t": t,
        "df": n - 1,
        "p": t_two_sided_p(t, n - 1),
    }


def holm(pvalues: Sequence[float], alpha: float) -> list[bool]:
    """Holm-Bonferroni step-down: which hypotheses are rejected at family-wise level ``alpha``."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    rejected = [False] * m
    for rank, i in enumerate(order):
        if pvalues[i] <= alpha / (m - rank):
            rejected[i] = True
        else:
            break
    return rejected


def verdict(mean: float, rejected: bool, direction: int) -> str:
    """``confirmed`` / ``contradicted`` / ``inconclusive`` (``direction``: +1 the claim predicts
    a > b, -1 a < b, 0 no difference)."""
    if not rejected:
        return "inconclusive"
    if direction == 0:
        return "contradicted"
    return "confirmed" if mean * direction > 0 else "contradicted"


def seeds_needed(
    sd: float, effect: float, m: int, alpha: float = 0.05, power: float = 0.8, n_max: int = 10_000
) -> int | None:
    """Smallest ``n >= 2`` with ``sqrt(n) |effect| / sd >= t(1 - alpha/(2m), n-1) + t(power, n-1)``
    (the usual approximation of the paired t-test's power at Holm's worst-case level
    ``alpha / m``); None when ``n_max`` seeds do not suffice or ``effect`` is zero."""
    if effect == 0.0:
        return None
    if sd == 0.0:
        return 2
    a = alpha / m
    for n in range(2, n_max + 1):
        need = t_quantile(1.0 - a / 2.0, n - 1) + t_quantile(power, n - 1)
        if math.sqrt(n) * abs(effect) / sd >= need:
            return n
    return None


def _load_rows(
    study: str, cache: dict[str, dict[str, dict[str, float]]]
) -> dict[str, dict[str, float]]:
    if study not in cache:
        doc = json.loads((REPO / "results" / study / "ablation.json").read_text())
        cache[study] = {r["label"]: r["acc_by_seed"] for r in doc["rows"]}
    return cache[study]


def _run_minutes(study: str, row: str) -> float:
    """Mean wall time of one run of a study's row, in minutes (as run: contended, one thread)."""
    doc = json.loads((REPO / "results" / study / "ablation.json").read_text())
    walls = [float(r["result"]["wall_s"]) for r in doc["runs"] if r["label"] == row]
    return statistics.fmean(walls) / 60.0


def _diffs(a: dict[str, Any], b: dict[str, Any], seeds: list[str], cache: dict) -> list[float]:
    """Per-seed differences in percentage points (rows averaged per seed when a side lists several)."""

    def side(spec: dict[str, Any], s: str) -> float:
        rows = _load_rows(spec["study"], cache)
        labels = spec.get("rows") or [spec["row"]]
        return 100.0 * statistics.fmean(rows[label][s] for label in labels)

    return [side(a, s) - side(b, s) for s in seeds]


def evaluate(spec: dict[str, Any]) -> dict[str, Any]:
    """The verdicts document for one parsed claims file."""
    alpha = float(spec["alpha"])
    power = float(spec["power"])
    declared = float(spec["declared_effect_points"])
    seeds = [str(s) for s in spec["seeds"]]
    cache: dict[str, dict[str, dict[str, float]]] = {}
    claims = spec["claims"]
    m = len(claims)
    tests = []
    for c in claims:
        if c["direction"] not in DIRECTIONS:
            raise ValueError(f"claim {c['id']}: direction must be one of {sorted(DIRECTIONS)}")
        d = _diffs(c["a"], c["b"], seeds, cache)
        tests.append((c, d, paired_test(d)))
    rejected = holm([float(t["p"]) for _, _, t in tests], alpha)
    order = sorted(range(m), key=lambda i: float(tests[i][2]["p"]))
    holm_level = {i: alpha / (m - rank) for rank, i in enumerate(order)}
    out_claims = []
    for i, (c, d, t) in enumerate(tests):
        direction = DIRECTIONS[c["direction"]]
        effect_src = "paper" if "paper_effect_points" in c else "declared"
        effect = float(c.get("paper_effect_points", declared))
        needed = seeds_needed(float(t["sd"]), effect, m, alpha, power)
        extra = None if needed is None else max(0, needed - len(seeds))
        rows = {(c["a"]["study"], c["a"]["row"]), (c["b"]["study"], c["b"]["row"])}
        minutes = None if extra is None else extra * sum(_run_minutes(*r) for r in rows)
        out_claims.append(
            {
                "id": c["id"],
                "paper": c["paper"],
                "where": c["where"],
                "a": c["a"],
                "b": c["b"],
                "direction": c["direction"],
                "diff_points_by_seed": dict(zip(seeds, d, strict=True)),
                **t,
                "ahead_on_seeds": sum(x > 0 for x in d),
                "holm_level": holm_level[i],
                "rejected": rejected[i],
                "verdict": verdict(float(t["mean"]), rejected[i], direction),
                "effect_points": effect,
                "effect_source": effect_src,
                "seeds_needed": needed,
                # the runs the missing seeds would take, at the committed runs' mean wall time
                # (2 shared cores, one thread per run; two runs at a time halve the wall clock)
                "extra_seeds": extra,
                "extra_run_minutes_est": minutes,
            }
        )
    n = len(seeds)
    exploratory = []
    for x in spec.get("exploratory", []):
        d = _diffs(x["a"], x["b"], seeds, cache)
        exploratory.append(
            {
                "id": x["id"],
                "what": x["what"],
                "why_exploratory": x["why_exploratory"],
                "diff_points_by_seed": dict(zip(seeds, d, strict=True)),
                **paired_test(d),
                "ahead_on_seeds": sum(v > 0 for v in d),
                "verdict": "exploratory (no verdict)",
            }
        )
    counts = {
        v: sum(c["verdict"] == v for c in out_claims)
        for v in ("confirmed", "contradicted", "inconclusive")
    }
    return {
        "about": (
            "Verdicts of results/claims.yaml by tools/verdicts.py: two-sided paired t-test over "
            "seeds per comparison, Holm-Bonferroni over the whole family; differences in "
            "accuracy points (a - b)."
        ),
        "alpha": alpha,
        "power": power,
        "family_size": m,
        "seeds": seeds,
        "counts": counts,
        # the smallest |t| that the first Holm step can reject with these seeds
        "min_abs_t_first_step": t_quantile(1.0 - alpha / (2 * m), n - 1),
        "min_abs_t_single_test": t_quantile(1.0 - alpha / 2, n - 1),
        "claims": out_claims,
        "exploratory": exploratory,
        "descriptive": spec.get("descriptive", []),
    }


def _rounded(node: Any) -> Any:
    """Floats to 10 significant digits, so that the file does not depend on the last bits of
    the platform's libm (``--check`` compares the text)."""
    if isinstance(node, float):
        return float(f"{node:.10g}") if math.isfinite(node) else str(node)
    if isinstance(node, dict):
        return {k: _rounded(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_rounded(v) for v in node]
    return node


def _render(doc: dict[str, Any]) -> str:
    return json.dumps(_rounded(doc), indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    import yaml

    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--check"]):
        print("usage: python3 tools/verdicts.py [--check]", file=sys.stderr)
        return 2
    doc = evaluate(yaml.safe_load(CLAIMS.read_text()))
    text = _render(doc)
    if args == ["--check"]:
        if not OUT.is_file() or OUT.read_text() != text:
            print(
                f"verdicts: {OUT.relative_to(REPO)} is stale: run python3 tools/verdicts.py",
                file=sys.stderr,
            )
            return 1
        print("verdicts: results/verdicts.json is up to date")
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(REPO)}: {doc['counts']} of {doc['family_size']} claims")
    return 0


if __name__ == "__main__":
    sys.exit(main())
