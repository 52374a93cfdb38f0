"""Standard errors over eval rows, paired differences and the 2-SE verdicts on the paper's claims (pure)."""
from __future__ import annotations

import math

from bench.minitron.rows import CLAIMS, EFFECTS, Claim


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def std_err(xs: list[float]) -> float:
    """Standard error of the mean: sample standard deviation (n - 1) / sqrt(n)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def paired(a: list[float], b: list[float]) -> dict:
    """mean(a) - mean(b) and the SE of the per-row differences (rows are the same eval rows)."""
    if len(a) != len(b):
        raise ValueError(f"paired rows differ in length ({len(a)} vs {len(b)})")
    d = [x - y for x, y in zip(a, b)]
    diff, se = mean(d), std_err(d)
    return {"diff": diff, "se": se, "significant": bool(abs(diff) > 2 * se)}


def compare_text(name_a: str, name_b: str, p: dict) -> str:
    if not p["significant"]:
        return (f"{name_a} and {name_b} do not differ beyond 2 SE (difference {p['diff']:+.4f}, "
                f"2 SE = {2 * p['se']:.4f})")
    lower, higher = (name_a, name_b) if p["diff"] < 0 else (name_b, name_a)
    return (f"{lower} has the lower loss, by {abs(p['diff']):.4f} > 2 SE = {2 * p['se']:.4f}; "
            f"{higher} is worse")


def _outcome(expect: str, p: dict) -> str:
    lower = p["significant"] and p["diff"] < 0
    if expect == "a<b":
        return "held" if lower else ("did not hold" if p["significant"] else "not shown")
    if expect == "no_gain":
        return "did not hold" if lower else "held"
    raise ValueError(f"unknown expectation {expect!r}")


def verdict(claim: Claim, results: dict[str, dict]) -> dict:
    """{"outcome": held | did not hold | not shown | not measured, "text": ...} for `claim` from the
    per-row losses in results[id]["row_losses"] (absent or no losses: not measured)."""
    ra, rb = results.get(claim.a), results.get(claim.b)
    missing = [(rid, r) for rid, r in ((claim.a, ra), (claim.b, rb)) if not r or not r.get("row_losses")]
    if missing:
        why = "; ".join(f"{rid}: {(r or {}).get('status', 'not run')}" for rid, r in missing)
        return {"outcome": "not measured", "text": f"Not measured ({why})."}
    p = paired(ra["row_losses"], rb["row_losses"])
    measured = compare_text(ra.get("label", claim.a), rb.get("label", claim.b), p)
    outcome = _outcome(claim.expect, p)
    word = {"held": "Held", "did not hold": "Did not hold",
            "not shown": "Not shown at this scale (within 2 SE)"}[outcome]
    return {"outcome": outcome, "diff": p["diff"], "se": p["se"], "text": f"{word}: {measured}."}


def claim_verdicts(results: dict[str, dict], claims: list[Claim] = CLAIMS) -> list[dict]:
    """Every claim with its verdict, as results.json stores them."""
    return [{"topic": c.topic, "paper": c.paper, "a": c.a, "b": c.b, "expect": c.expect, **verdict(c, results)}
            for c in claims]


def measured_effects(results: dict[str, dict], effects: list[tuple[str, str, str]] = EFFECTS) -> list[dict]:
    """The paired difference of each effect whose two rows both have per-row losses."""
    out = []
    for label, a, b in effects:
        ra, rb = results.get(a, {}), results.get(b, {})
        if ra.get("row_losses") and rb.get("row_losses"):
            p = paired(ra["row_losses"], rb["row_losses"])
            out.append({"label": label, "a": a, "b": b, **p,
                        "text": compare_text(ra["label"], rb["label"], p) + "."})
    return out
