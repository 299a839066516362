"""Paired comparisons over seeds: mean difference, its 95 % Student-t interval and the sign count.

Pure Python (a t-table, no scipy), so `fish-tune compare` needs no statistics package.
"""

from __future__ import annotations

import math
import statistics

# two-sided 95% Student-t quantiles for 1..30 degrees of freedom (then the normal 1.96)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(df: int) -> float:
    return _T95[df - 1] if 1 <= df <= len(_T95) else 1.96


def paired(diffs: list[float], higher_is_better: bool = True) -> dict:
    """Mean of paired differences, its 95% t interval (None below 2 pairs) and the sign count (``ahead``: pairs where
    the first is better: a positive difference, or a negative one when lower is better, as for a loss)."""
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else math.nan
    half = t95(n - 1) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else None
    return {"n": n, "mean": mean, "lo": None if half is None else mean - half, "hi": None if half is None else mean + half,
            "ahead": sum((d > 0) if higher_is_better else (d < 0) for d in diffs),
            "behind": sum((d < 0) if higher_is_better else (d > 0) for d in diffs)}


def fmt_paired(p: dict, digits: int = 2) -> str:
    """``+1.20 [-0.40, +2.80] 4/5 ahead`` (x100 scores in, as given)."""
    if not p["n"]:
        return "-"
    ci = f" [{p['lo']:+.{digits}f}, {p['hi']:+.{digits}f}]" if p["lo"] is not None else ""
    ties = p["n"] - p["ahead"] - p["behind"]
    return f"{p['mean']:+.{digits}f}{ci} {p['ahead']}/{p['n']} ahead" + (f" ({ties} tied)" if ties else "")


def significant(p: dict) -> bool:
    """The 95 % interval excludes 0 (never with fewer than 2 pairs)."""
    return p["lo"] is not None and (p["lo"] > 0 or p["hi"] < 0)
