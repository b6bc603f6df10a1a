"""Batch-norm fold arithmetic: pure numpy, float64 throughout, rounded once.

BN in inference mode is ``y = s * x + t`` per channel with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``. Folding it into a
linear op multiplies the op's weight along its output-channel axis by ``s`` and
maps its bias ``b`` to ``b * s + t``; folding it into the *following* op scales
the weight along the input-channel axis and adds the weight applied to ``t``.

Nothing here knows about ONNX graphs.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

FLOAT64 = np.float64


class FoldOverflow(ValueError):
    """The folded values do not fit the target dtype."""

    def __init__(self, what: str, dtype: np.dtype, max_abs: float) -> None:
        super().__init__(f"{what} reaches {max_abs:.6g}, beyond the range of {np.dtype(dtype).name}")
        self.what = what
        self.dtype = np.dtype(dtype)
        self.max_abs = max_abs


class DeferredOverflow(Exception):
    """A fold whose range check was left to the write (``fold.fuse_to_write``) does
    not fit its dtype after all: the fold's records are wrong, and the caller folds again with
    the checks made up front (which refuse that fold with its reason)."""


def bn_affine(
    scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray, epsilon: float
) -> Tuple[np.ndarray, np.ndarray]:
    """Return ``(s, t)`` in float64 such that ``BN(x) == s * x + t`` per channel."""
    gamma = np.asarray(scale, dtype=FLOAT64)
    beta = np.asarray(bias, dtype=FLOAT64)
    mu = np.asarray(mean, dtype=FLOAT64)
    denom = np.sqrt(np.asarray(var, dtype=FLOAT64) + FLOAT64(epsilon))
    s = gamma / denom
    return s, beta - mu * s


def axis_factor(s: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """``s`` shaped to multiply an ``ndim``-D weight along ``axis``."""
    shape = [1] * ndim
    shape[axis % ndim] = s.shape[0]
    return np.asarray(s, dtype=FLOAT64).reshape(shape)


def conv_transpose_factor(s: np.ndarray, shape: Tuple[int, ...], group: int) -> np.ndarray:
    """Per-output-channel scale for a ConvTranspose weight ``[C_in, C_out/group, k...]``.

    Output channel ``g * (C_out/group) + j`` is column ``j`` of the rows that belong
    to group ``g``: the factor is ``[C_in, C_out/group, 1...]``.
    """
    c_in, c_out_g = shape[0], shape[1]
    per_group = np.asarray(s, dtype=FLOAT64).reshape(group, 1, c_out_g)
    rows = np.broadcast_to(per_group, (group, c_in // group, c_out_g)).reshape(c_in, c_out_g)
    return rows.reshape((c_in, c_out_g) + (1,) * (len(shape) - 2))


def conv_input_factor(s: np.ndarray, shape: Tuple[int, ...], group: int) -> np.ndarray:
    """Per-*input*-channel scale for a Conv weight ``[C_out, C_in/group, k...]``.

    Output channel ``o`` belongs to group ``o // (C_out/group)`` and reads input
    channels ``g * (C_in/group) + i``: the factor is ``[C_out, C_in/group, 1...]``.
    """
    c_out, c_in_g = shape[0], shape[1]
    per_group = np.asarray(s, dtype=FLOAT64).reshape(group, 1, c_in_g)
    rows = np.broadcast_to(per_group, (group, c_out // group, c_in_g)).reshape(c_out, c_in_g)
    return rows.reshape((c_out, c_in_g) + (1,) * (len(shape) - 2))


def scale(w: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """``w * factor`` in float64 (``factor`` broadcasts against ``w``). Non-finite weights stay
    non-finite without a warning (inf x 0 is NaN, as ONNX Runtime would compute it)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.multiply(w, factor, dtype=FLOAT64)


# Elements per block in scale_round: big enough to amortise numpy's call overhead,
# small enough that the float64 intermediate stays in cache.
_BLOCK = 1 << 17
# Elements per block of scale_round's fast path: its three passes cost least at 256-512 Ki elements
# (2-4 MiB of float64: the passes overlap better than at 1 MiB; 32 MiB leaves the cache).
_FAST_BLOCK = 1 << 18


def scale_round(w: np.ndarray, factor: np.ndarray, dtype: np.dtype, what: str,
                out: Optional[np.ndarray] = None) -> np.ndarray:
    """``w * factor`` computed in float64 and rounded once to ``dtype``, block by block.

    Same result as ``round_to(scale(w, factor), dtype, what)`` without materialising
    the float64 product of a large weight. ``out`` (of ``w``'s shape and ``dtype``), when
    given, receives the values: a writer streaming many blocks reuses its buffers instead
    of touching fresh memory for each.
    """
    w = np.asarray(w)
    factor = np.asarray(factor, dtype=FLOAT64)
    if w.ndim == 0 or w.size <= _BLOCK:
        small = round_to(scale(w, factor), dtype, what)
        if out is None:
            return small
        out[...] = small
        return out
    if out is None:
        out = np.empty(w.shape, dtype=dtype)
    fast = _cast_flags_overflow(np.dtype(dtype))
    rows = max(1, (_FAST_BLOCK if fast else _BLOCK) // max(1, w[0].size))
    per_row = factor.shape[0] != 1
    tmp = np.empty((rows,) + w.shape[1:], FLOAT64) if fast else None
    for i in range(0, w.shape[0], rows):
        f = factor[i:i + rows] if per_row else factor
        if tmp is not None:
            # the float64 product in one reused buffer (the weights widened into it, then multiplied
            # in place: 1.6x faster than numpy's mixed-type multiply, same values), rounded straight
            # into ``out``; the CPU's overflow flag (numpy raises on it here) says when the careful
            # path below is needed
            t = tmp[:min(rows, w.shape[0] - i)]
            try:
                with np.errstate(over="raise", invalid="ignore"):
                    np.copyto(t, w[i:i + rows])
                    np.multiply(t, f, out=t)
                    np.copyto(out[i:i + rows], t, casting="same_kind")
                continue
            except FloatingPointError:
                pass
        out[i:i + rows] = round_to(scale(w[i:i + rows], f), dtype, what)
    return out


_CAST_FLAGS: Dict[np.dtype, bool] = {}


def _cast_flags_overflow(dtype: np.dtype) -> bool:
    """Whether numpy raises FloatingPointError, under ``errstate(over="raise")``, when a float64
    too large for ``dtype`` is cast to it (numpy >= 1.24 checks the flag for float32 and float16;
    older numpy or other dtypes may not): only then may :func:`scale_round` skip the finiteness
    pass of :func:`round_to`."""
    if dtype not in _CAST_FLAGS:
        flags = False
        if dtype in (np.dtype(np.float32), np.dtype(np.float16)):
            try:
                with np.errstate(over="raise", invalid="ignore"):
                    np.copyto(np.empty(1, dtype), np.array([1e300]), casting="same_kind")
            except FloatingPointError:
                flags = True
        _CAST_FLAGS[dtype] = flags
    return _CAST_FLAGS[dtype]


def check_scale_fits(w: np.ndarray, factor: np.ndarray, dtype: np.dtype, what: str) -> None:
    """Raise :class:`FoldOverflow` exactly when ``scale_round(w, factor, dtype)`` would, without
    computing the product: the largest ``|w|`` along the axes ``factor`` does not vary on,
    times ``|factor|``, is the largest magnitude of the product, and rounding is monotonic."""
    w = np.asarray(w)
    factor = np.asarray(factor, dtype=FLOAT64)
    if w.size == 0:
        return
    axes = tuple(i for i in range(w.ndim) if i >= factor.ndim or factor.shape[i] == 1)
    # block by block along axis 0, so max and min read each block from cache. Only finite weights
    # can overflow (NaN and inf stay what they are): a NaN or inf must not hide the largest finite one
    rows = max(1, (_BLOCK << 2) // max(1, w[0].size)) if w.ndim else 1
    peaks = []
    for i in range(0, w.shape[0] if w.ndim else 1, rows):
        block = w[i:i + rows] if w.ndim else w
        peak = _largest_magnitude(block, axes)
        if not np.isfinite(peak).all():  # rare (corrupt or special data): again without the non-finite
            peak = _largest_magnitude(np.where(np.isfinite(block), block, 0), axes)
        peaks.append(peak)
    peak = np.maximum.reduce(peaks) if (0 in axes or not w.ndim) else np.concatenate(peaks, axis=0)
    round_to(scale(peak, np.abs(factor)), dtype, what)


def _largest_magnitude(block: np.ndarray, axes: Tuple[int, ...]) -> np.ndarray:
    """max |block| over ``axes`` (NaN skipped), from one max and one min (no |block| copy)."""
    return np.fmax(np.fmax.reduce(block, axis=axes, keepdims=True), -np.fmin.reduce(block, axis=axes, keepdims=True))


def conv_input_shift(w: np.ndarray, t: np.ndarray, group: int) -> np.ndarray:
    """Per-output-channel constant a Conv produces from a per-input-channel shift ``t``.

    Exact only when the Conv does not pad (every window sees real input).
    """
    w64 = np.asarray(w, dtype=FLOAT64)
    c_out, c_in_g = w64.shape[0], w64.shape[1]
    k = w64.shape[2:]
    t_g = np.asarray(t, dtype=FLOAT64).reshape((group, 1, c_in_g) + (1,) * len(k))
    per_out = (w64.reshape((group, c_out // group, c_in_g) + k) * t_g).reshape(c_out, -1)
    return per_out.sum(axis=1)


def round_to(values: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """Round float64 ``values`` once to ``dtype``; raise :class:`FoldOverflow` on overflow.

    A finite value that becomes infinite in the target dtype is an overflow; values
    that were already non-finite are left as they are.
    """
    v64 = np.asarray(values, dtype=FLOAT64)
    with np.errstate(over="ignore", invalid="ignore"):
        out = v64.astype(dtype)
    if np.isfinite(out).all():  # the common case: one pass over the small result
        return out
    overflowed = ~np.isfinite(out.astype(FLOAT64)) & np.isfinite(v64)
    if overflowed.any():
        raise FoldOverflow(what, dtype, float(np.abs(v64[overflowed]).max()))
    return out


def fold_bias(bias: Optional[np.ndarray], s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """New bias ``b * s + t`` (``t`` alone when there was no bias), broadcast on the last axis."""
    if bias is None:
        return np.asarray(t, dtype=FLOAT64).copy()
    return np.asarray(bias, dtype=FLOAT64) * s + t
