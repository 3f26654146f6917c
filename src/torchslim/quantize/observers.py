"""Activation-range observers for calibration: min-max, mean min-max, percentile and MSE.

An observer sees the values of one tensor over the calibration batches (:meth:`Observer.update`)
and then proposes the real range ``(lo, hi)`` an 8-bit (or ``bits``-bit) quantizer should cover
(:meth:`Observer.compute_range`):

- ``MinMaxObserver``: the smallest and largest value seen (no clipping; outliers widen the steps).
- ``MeanMinMaxObserver``: the mean over calibration samples of each sample's min and max (clips what only a few
  samples reach; NNCF's default for per-tensor activations).
- ``PercentileObserver``: the ``100 - p`` and ``p`` percentiles (clips the rarest outliers).
- ``MSEObserver``: the clipping range that minimises the squared quantization error over a grid
  of candidate ranges, computed on the histogram: values inside cost their rounding error on the
  quantization grid, values outside their squared distance to the range.

The histogram observers keep a fixed number of bins over a range that grows as new values arrive
(old counts are spread over the new bins), so memory does not grow with the calibration set. Exact
zeros (ReLU outputs are often half zeros) are counted apart: zero is always representable, so they
cost no quantization error. With ``symmetric=True`` ranges are ``(-t, t)``. Every range contains
zero, as an affine quantizer needs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from torchslim.errors import ConfigError, DataError

OBSERVERS = ("minmax", "mean-minmax", "percentile", "mse")


def _values(values: Any) -> np.ndarray:
    """Flatten a tensor/array to float64, rejecting NaN and infinities."""
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().to("cpu").float().numpy()
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size and not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        raise DataError(
            f"observer got {bad} NaN/Inf value(s) out of {array.size}: calibration data must be finite"
        )
    return array


class Observer:
    """Base class: collect values with :meth:`update`, then read :meth:`compute_range`.

    Args:
        symmetric: return ranges of the form ``(-t, t)``.
    """

    name = "observer"

    def __init__(self, *, symmetric: bool = False) -> None:
        self.symmetric = bool(symmetric)
        self.count = 0
        self.min = math.inf
        self.max = -math.inf

    def update(self, values: Any) -> None:
        """Observe a batch of values (any shape; a torch tensor or array-like).

        Raises:
            DataError: NaN or infinite values.
        """
        array = _values(values)
        if array.size == 0:
            return
        self.count += int(array.size)
        self.min = min(self.min, float(array.min()))
        self.max = max(self.max, float(array.max()))
        self._update(array)

    def _update(self, array: np.ndarray) -> None:
        """Subclass hook: fold in a flat, finite, non-empty float64 array."""

    def compute_range(self) -> tuple[float, float]:
        """Return ``(lo, hi)`` with ``lo <= 0 <= hi``.

        Raises:
            DataError: nothing was observed.
        """
        if self.count == 0:
            raise DataError(
                f"{type(self).__name__} observed no values: run calibration data through it first"
            )
        lo, hi = self._range()
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if self.symmetric:
            bound = max(-lo, hi)
            return -bound, bound
        return lo, hi

    def _range(self) -> tuple[float, float]:
        return self.min, self.max


class MinMaxObserver(Observer):
    """The smallest and largest value seen."""

    name = "minmax"


class MeanMinMaxObserver(Observer):
    """The mean, over :meth:`update` calls, of each call's smallest and largest value.

    Feed it one calibration sample per call: the range is then the average sample's extremes, so an outlier only
    one sample reaches widens it by 1/n of its excess instead of setting it.
    """

    name = "mean-minmax"

    def __init__(self, *, symmetric: bool = False) -> None:
        super().__init__(symmetric=symmetric)
        self.updates = 0
        self.min_sum = 0.0
        self.max_sum = 0.0

    def _update(self, array: np.ndarray) -> None:
        self.updates += 1
        self.min_sum += float(array.min())
        self.max_sum += float(array.max())

    def _range(self) -> tuple[float, float]:
        return self.min_sum / self.updates, self.max_sum / self.updates


class HistogramObserver(Observer):
    """Keeps a histogram of the nonzero values over ``[min(0, min), max(0, max)]``, plus a zero count.

    Args:
        bins: number of histogram bins (>= 16).
        symmetric: return ranges of the form ``(-t, t)``.
    """

    name = "histogram"

    def __init__(self, *, bins: int = 2048, symmetric: bool = False) -> None:
        super().__init__(symmetric=symmetric)
        if not isinstance(bins, int) or isinstance(bins, bool) or bins < 16:
            raise ConfigError(f"{type(self).__name__}.bins = {bins!r} is invalid: expected an integer >= 16")
        self.bins = bins
        self.zeros = 0
        self.hist = np.zeros(bins, dtype=np.float64)
        self.edges: np.ndarray | None = None

    def _update(self, array: np.ndarray) -> None:
        nonzero = array[array != 0]
        self.zeros += int(array.size - nonzero.size)
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        if hi <= lo:  # only zeros so far
            return
        if self.edges is None or lo < self.edges[0] or hi > self.edges[-1]:
            self._rebin(lo, hi)
        if nonzero.size:
            self.hist += np.histogram(nonzero, bins=self.edges)[0]

    def _rebin(self, lo: float, hi: float) -> None:
        edges = np.linspace(lo, hi, self.bins + 1)
        if self.edges is not None:  # spread the old counts uniformly within their bins
            cumulative = np.concatenate([[0.0], np.cumsum(self.hist)])
            self.hist = np.diff(np.interp(edges, self.edges, cumulative))
        self.edges = edges

    def _cdf(self) -> tuple[np.ndarray, np.ndarray]:
        """Piecewise-linear cumulative counts at the bin edges, zeros put in the bin that holds 0."""
        hist = self.hist.copy()
        index = int(np.clip(np.searchsorted(self.edges, 0.0, side="right") - 1, 0, self.bins - 1))
        hist[index] += self.zeros
        return self.edges, np.concatenate([[0.0], np.cumsum(hist)])


def _inverse_cdf(target: float, edges: np.ndarray, cumulative: np.ndarray) -> float:
    """Smallest x with cumulative(x) >= target, interpolating inside the bin."""
    index = int(np.clip(np.searchsorted(cumulative, target, side="left"), 1, len(edges) - 1))
    below, above = cumulative[index - 1], cumulative[index]
    fraction = 0.0 if above <= below else (target - below) / (above - below)
    return float(edges[index - 1] + fraction * (edges[index] - edges[index - 1]))


class PercentileObserver(HistogramObserver):
    """Range from percentiles: ``(P[100 - p], P[p])``, or ``(-t, t)`` with ``t = P[p]`` of ``|x|``.

    Args:
        percentile: ``p`` in (50, 100]; 100 gives the min-max range.
        bins: histogram bins.
        symmetric: symmetric range from the percentile of absolute values.
    """

    name = "percentile"

    def __init__(self, percentile: float = 99.99, *, bins: int = 2048, symmetric: bool = False) -> None:
        super().__init__(bins=bins, symmetric=symmetric)
        ok = isinstance(percentile, (int, float)) and not isinstance(percentile, bool)
        if not (ok and 50 < percentile <= 100):
            raise ConfigError(
                f"PercentileObserver.percentile = {percentile!r} is invalid: expected a number in (50, 100]"
            )
        self.percentile = float(percentile)

    def _range(self) -> tuple[float, float]:
        if self.edges is None:
            return 0.0, 0.0
        edges, cumulative = self._cdf()
        total = cumulative[-1]
        q = self.percentile / 100.0
        if not self.symmetric:
            lo = _inverse_cdf((1.0 - q) * total, edges, cumulative) if self.min < 0 else 0.0
            hi = _inverse_cdf(q * total, edges, cumulative) if self.max > 0 else 0.0
            return max(lo, self.min), min(hi, self.max)
        # |x| <= t holds for cdf(t) - cdf(-t) of the values; find the smallest t reaching q * total
        bound = max(-edges[0], edges[-1])
        grid = np.linspace(0.0, bound, 4 * self.bins + 1)
        inside = np.interp(grid, edges, cumulative) - np.interp(-grid, edges, cumulative, left=0.0)
        inside[-1] = total
        index = int(np.searchsorted(inside, q * total - 1e-9 * total, side="left"))
        t = float(grid[min(index, len(grid) - 1)])
        return -t, t


def _sawtooth_integral(u: np.ndarray) -> np.ndarray:
    """``K(u) = integral from -1/2 to u of (v - round(v))**2 dv`` (closed form, vectorised)."""
    shifted = u + 0.5
    whole = np.floor(shifted)
    return whole / 12.0 + ((shifted - whole - 0.5) ** 3 + 0.125) / 3.0


class MSEObserver(HistogramObserver):
    """The clipping range minimising the squared error of ``bits``-bit quantization.

    Candidates shrink the observed range: ``(lo * a, hi * b)`` for ``a, b`` on a grid of ``grid``
    fractions in ``(0, 1]`` (``(-t * a, t * a)`` when symmetric), then on a 17-point finer grid around
    the best pair. A candidate's error is computed on
    the histogram (coarsened to at most ``search_bins`` bins) with the values spread uniformly in
    each bin: inside the range, the exact mean squared rounding error on the quantization grid (which
    passes through zero, as ORT's zero point makes it); outside, the squared distance to the range.
    Like every fixed-width histogram, it is coarse for very heavy tails (a range thousands of times
    wider than where most values lie); percentile clipping is the better choice there.

    Args:
        bits: quantizer width (2..16); asymmetric ranges use ``2**bits - 1`` steps, symmetric
            ``2**bits - 2`` (the int8 range [-127, 127]).
        grid: number of candidate fractions per side (>= 2).
        bins: histogram bins.
        search_bins: bins used by the search (the histogram is summed down to this many).
        symmetric: search symmetric ranges.
    """

    name = "mse"

    def __init__(
        self,
        *,
        bits: int = 8,
        grid: int = 32,
        bins: int = 2048,
        search_bins: int = 512,
        symmetric: bool = False,
    ) -> None:
        super().__init__(bins=bins, symmetric=symmetric)
        if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
            raise ConfigError(f"MSEObserver.bits = {bits!r} is invalid: expected an integer in [2, 16]")
        if not isinstance(grid, int) or isinstance(grid, bool) or grid < 2:
            raise ConfigError(f"MSEObserver.grid = {grid!r} is invalid: expected an integer >= 2")
        if not isinstance(search_bins, int) or isinstance(search_bins, bool) or search_bins < 16:
            raise ConfigError(
                f"MSEObserver.search_bins = {search_bins!r} is invalid: expected an integer >= 16"
            )
        self.bits = bits
        self.grid = grid
        self.search_bins = search_bins

    def _coarse(self) -> tuple[np.ndarray, np.ndarray]:
        factor = max(1, -(-self.bins // self.search_bins))
        usable = self.bins - self.bins % factor
        counts = self.hist[:usable].reshape(-1, factor).sum(axis=1)
        edges = self.edges[: usable + 1 : factor]
        if usable < self.bins:  # fold the remainder into the last bin
            counts[-1] += self.hist[usable:].sum()
            edges = np.concatenate([edges[:-1], self.edges[-1:]])
        return edges, counts

    def quantization_error(self, lo: Any, hi: Any) -> np.ndarray:
        """Total squared error of quantizing the observed values to the ranges ``[lo, hi]``.

        Args:
            lo: candidate lower bounds (<= 0), any shape.
            hi: candidate upper bounds (>= 0), broadcastable with ``lo``.

        Returns:
            The error of each candidate (exact zeros cost nothing: zero is on the grid).
        """
        lo, hi = np.broadcast_arrays(np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64))
        shape = lo.shape
        lo, hi = lo.reshape(-1), hi.reshape(-1)
        if self.edges is None:
            return np.zeros(shape)
        edges, counts = self._coarse()
        left, right = edges[:-1], edges[1:]
        centres = (left + right) / 2
        # outside the range: prefix sums over the bin centres, O(1) per candidate
        n = np.concatenate([[0.0], np.cumsum(counts)])
        s1 = np.concatenate([[0.0], np.cumsum(counts * centres)])
        s2 = np.concatenate([[0.0], np.cumsum(counts * centres**2)])
        below = np.searchsorted(centres, lo, side="left")  # centres < lo
        above = np.searchsorted(centres, hi, side="right")  # centres <= hi
        err_below = s2[below] - 2 * lo * s1[below] + lo**2 * n[below]
        err_above = (s2[-1] - s2[above]) - 2 * hi * (s1[-1] - s1[above]) + hi**2 * (n[-1] - n[above])
        # inside: mean of (x - round(x / step) * step)**2 over each bin, in chunks of candidates
        steps = 2**self.bits - (2 if self.symmetric else 1)
        step = np.maximum((hi - lo) / steps, np.finfo(np.float64).tiny)
        err_inside = np.empty_like(lo)
        chunk = max(1, 2**21 // len(counts))
        for start in range(0, len(lo), chunk):
            part = slice(start, start + chunk)
            s = step[part, None]
            integral = _sawtooth_integral(edges / s)  # at every edge once: bins share their edges
            mean_sq = s**3 * np.diff(integral, axis=1) / (right - left)
            inside = (centres >= lo[part, None]) & (centres <= hi[part, None])
            err_inside[part] = (mean_sq * inside) @ counts
        total = np.maximum(err_below, 0.0) + np.maximum(err_above, 0.0) + err_inside
        return total.reshape(shape)

    def _range(self) -> tuple[float, float]:
        if self.edges is None:
            return 0.0, 0.0
        lo0, hi0 = min(self.min, 0.0), max(self.max, 0.0)
        if self.symmetric:
            lo0 = hi0 = max(-lo0, hi0)
            lo0 = -lo0
        # coarse grid of fractions, then a finer grid around the best coarse pair
        a, b = self._search(lo0, hi0, np.linspace(1.0 / self.grid, 1.0, self.grid))
        width = 1.0 / self.grid
        a, b = self._search(lo0, hi0, np.linspace(-width, width, 17), centre=(a, b))
        return lo0 * a, hi0 * b

    def _search(
        self, lo0: float, hi0: float, fractions: np.ndarray, centre: tuple[float, float] | None = None
    ) -> tuple[float, float]:
        """Best fractions ``(a, b)`` of ``(lo0, hi0)``; around ``centre`` (offsets) when given."""
        a_grid = fractions if centre is None else np.clip(centre[0] + fractions, 1e-6, 1.0)
        b_grid = fractions if centre is None else np.clip(centre[1] + fractions, 1e-6, 1.0)
        if self.symmetric:
            errors = self.quantization_error(lo0 * a_grid, hi0 * a_grid)
            best = float(a_grid[int(np.argmin(errors))])
            return best, best
        a_grid = a_grid[:1] if lo0 == 0.0 else a_grid  # one-sided data: nothing to search below zero
        b_grid = b_grid[:1] if hi0 == 0.0 else b_grid
        errors = self.quantization_error(lo0 * a_grid[:, None], hi0 * b_grid[None, :])
        i, j = np.unravel_index(int(np.argmin(errors)), errors.shape)
        return float(a_grid[i]), float(b_grid[j])


def create_observer(
    name: str, *, symmetric: bool = False, percentile: float = 99.99, bits: int = 8, bins: int = 2048
) -> Observer:
    """Build an observer by name.

    Args:
        name: one of ``OBSERVERS`` (``"minmax"``, ``"mean-minmax"``, ``"percentile"``, ``"mse"``).
        symmetric: symmetric ranges.
        percentile: for ``"percentile"``.
        bits: quantizer width, for ``"mse"``.
        bins: histogram bins, for ``"percentile"`` and ``"mse"``.

    Returns:
        A fresh observer.

    Raises:
        ConfigError: unknown name or a bad parameter.
    """
    if name == "minmax":
        return MinMaxObserver(symmetric=symmetric)
    if name == "mean-minmax":
        return MeanMinMaxObserver(symmetric=symmetric)
    if name == "percentile":
        return PercentileObserver(percentile, bins=bins, symmetric=symmetric)
    if name == "mse":
        return MSEObserver(bits=bits, bins=bins, symmetric=symmetric)
    raise ConfigError(
        f"observer = {name!r} is invalid: expected one of {', '.join(repr(o) for o in OBSERVERS)}"
    )
