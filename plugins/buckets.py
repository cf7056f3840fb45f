"""Log-scale distance buckets of docs/model.md §3, in an exact integer form.

    bucket(x, n, xmax) = 0 if x < 1 else min(n - 1, 1 + floor(log(x) / log(xmax) * (n - 2)))

Evaluating that with float logarithms makes every runtime (PyTorch, ONNX Runtime, TensorRT,
a Triton kernel) free to disagree at bucket edges, which moves a score by a whole table entry.
In real arithmetic the formula equals "how many thresholds x has reached", with
thr_1 = 1 and thr_m = ceil(xmax ** ((m - 1) / (n - 2))) for m = 2..n-1, and integer
comparisons give the same bucket everywhere. The thresholds are computed once, here, exactly.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch


def _int_root_ceil(xmax: int, num: int, den: int) -> int:
    """Smallest integer t with t ** den >= xmax ** num, i.e. ceil(xmax ** (num / den)), exactly."""
    target = xmax**num
    guess = max(1, math.ceil(xmax ** (num / den)))
    # The float guess is off by about guess * 2^-47 at worst, which for a large xmax is many integers:
    # bisect a bracket around it (lo**den < target <= hi**den) instead of stepping by one.
    slack = guess >> 40
    lo, hi = max(0, guess - slack - 1), guess + slack + 1
    while lo > 0 and lo**den >= target:
        lo //= 2
    while hi**den < target:
        hi *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid**den >= target:
            hi = mid
        else:
            lo = mid
    return hi


def bucket_thresholds(n: int, xmax: int) -> list[int]:
    """The n-1 thresholds: bucket(x) = number of thresholds <= x."""
    if n < 3:
        # n - 2 <= 0: the formula degenerates; ASTRO configs validate n >= 3 for time and
        # n >= 2 for positions, where n == 2 means "0 for x < 1, else 1".
        return [1] * (n - 1)
    thresholds = [1]
    frac_den = n - 2
    for m in range(2, n):
        f = Fraction(m - 1, frac_den)
        thresholds.append(_int_root_ceil(xmax, f.numerator, f.denominator))
    return thresholds


def bucketize_reference(x: int, n: int, xmax: int) -> int:
    """The formula as written, in float64; tests compare the exact form against it."""
    if x < 1:
        return 0
    if n < 3:
        return n - 1
    return min(n - 1, 1 + math.floor(math.log(x) / math.log(xmax) * (n - 2)))


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def bucketize(x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Bucket of every element of the integer tensor x (any shape), thresholds from
    ``bucket_thresholds`` (sorted, the last one xmax): O(1) memory and work per element.

    The float32 formula (xmax = thresholds[-1], n - 2 = len(thresholds) - 1) is a guess that is
    never more than one bucket off: in real arithmetic it is the exact count, and float32 moves
    log(x) / log(xmax) * (n - 2) by far less than 1. One comparison against each of the guessed
    bucket's two exact integer edges then moves it to the exact count, whatever the libm. The
    ONNX bodies (exporter/functions.py) compute exactly this, op for op.
    """
    thr = thresholds.to(device=x.device, dtype=torch.int64)
    count = thr.numel()  # n - 1
    if count == 0:
        return torch.zeros_like(x, dtype=torch.int64)
    # edges[b] <= x < edges[b + 1] <=> bucket(x) = b, for b = 0..n-1. Every x >= xmax is in the
    # last bucket, so clamping there keeps the upper sentinel out of reach and the float finite.
    edges = torch.cat([thr.new_tensor([INT64_MIN]), thr, thr.new_tensor([INT64_MAX])])
    x = torch.minimum(x, thr[-1])
    scale = (count - 1) / torch.log(thr[-1].clamp(min=2).float())
    guess = torch.floor(torch.log(x.clamp(min=1).float()) * scale) + 1
    # x = xmax is the last bucket by definition; saying so also covers xmax = 1 (log xmax = 0).
    guess = torch.where(x >= thr[-1], count, guess.clamp(0, count).long())
    return guess - (x < edges[guess]).long() + (x >= edges[guess + 1]).long()


def bucketize_counting(x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The definition, "how many thresholds x has reached", in O(n) memory per element: the
    arbiter that tests hold ``bucketize`` to."""
    return (x.unsqueeze(-1) >= thresholds).sum(-1)


def distance_table(table: torch.Tensor, length: int, n: int) -> torch.Tensor:
    """Position bias by distance: ``table[..., bucket(d, n, length)]`` for d = 0..length.

    Positions only ever differ by 0..L (a candidate sits at L), so the bucketed position bias
    is a fixed gather of the learned table, indexed by distance. Kernels and graphs receive
    this [..., L + 1] table and never bucket positions themselves.
    """
    thr = torch.tensor(bucket_thresholds(n, length), dtype=torch.int64, device=table.device)
    index = bucketize(torch.arange(length + 1, device=table.device), thr)
    return table[..., index]
