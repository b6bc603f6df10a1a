"""Calibration data and streaming per-channel statistics (pure numpy, float64).

Data: a ``.npz`` with one array per model input (leading axis = samples), a folder
of ``.npz`` / ``.npy`` files (each a chunk of samples; ``.npy`` for single-input
models), or, in Python, any iterable of ``{input name: array}`` chunks. Chunks are
re-cut into batches of ``batch_size`` samples (the last batch may be smaller).

Estimators, over N and every spatial position of each channel, with ``m`` the number
of values per channel in one batch:

- ``population`` (the BN paper's inference statistics): mean = the average of the
  batch means; var = m/(m-1) x the average of the (biased) batch variances. Batches of
  unequal size contribute m_b/(m_b-1) x their own variance.
- ``momentum``: ``running = momentum * running + (1 - momentum) * batch`` starting
  from mean 0 and var 1 (as PyTorch and Keras do), with the unbiased batch variance.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from .errors import BnfoldError

ESTIMATORS = ("population", "momentum")
Data = Union[str, "os.PathLike[str]", Iterable[Mapping[str, np.ndarray]]]


def _chunks(data: Data, input_names: List[str]) -> Iterator[Dict[str, np.ndarray]]:
    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if p.is_dir():
            files = sorted(q for q in p.iterdir() if q.suffix in (".npz", ".npy"))
            if not files:
                raise BnfoldError("calibration folder holds no .npz or .npy file", p)
        elif p.is_file():
            files = [p]
        else:
            raise BnfoldError("no such calibration file or folder", p)
        for f in files:
            yield _load(f, input_names)
    else:
        for chunk in data:
            yield {k: np.asarray(chunk[k]) for k in input_names}


def _load(f: Path, input_names: List[str]) -> Dict[str, np.ndarray]:
    try:
        if f.suffix == ".npy":
            if len(input_names) != 1:
                raise BnfoldError(f"a .npy file feeds one input, the model has {len(input_names)}; use .npz", f)
            return {input_names[0]: np.load(f, allow_pickle=False)}
        with np.load(f, allow_pickle=False) as z:
            missing = [n for n in input_names if n not in z.files]
            if missing:
                raise BnfoldError(f"has no array for input(s) {', '.join(missing)}", f)
            return {n: z[n] for n in input_names}
    except BnfoldError:
        raise
    except Exception as e:
        raise BnfoldError(f"cannot be read as calibration data ({e})", f) from None


def iter_batches(data: Data, input_names: List[str], batch_size: Optional[int]) -> Iterator[Dict[str, np.ndarray]]:
    """Feeds of ``batch_size`` samples each (chunks as given when ``batch_size`` is None)."""
    pending: List[Dict[str, np.ndarray]] = []
    have = 0
    for chunk in _chunks(data, input_names):
        n = {v.shape[0] if v.ndim else 0 for v in chunk.values()}
        if len(n) != 1 or 0 in n:
            raise BnfoldError("calibration arrays must share a leading (sample) axis")
        if batch_size is None:
            yield chunk
            continue
        pending.append(chunk)
        have += n.pop()
        while have >= batch_size:
            joined = {k: np.concatenate([c[k] for c in pending]) for k in input_names}
            yield {k: v[:batch_size] for k, v in joined.items()}
            rest = {k: v[batch_size:] for k, v in joined.items()}
            have -= batch_size
            pending = [rest] if have else []
    if pending and have:
        yield {k: np.concatenate([c[k] for c in pending]) for k in input_names}


class ChannelStats:
    """Streaming per-channel mean and variance of activations ``[N, C, ...]``, in float64."""

    def __init__(self, estimator: str = "population", momentum: float = 0.99) -> None:
        if estimator not in ESTIMATORS:
            raise BnfoldError(f"estimator '{estimator}': use one of {', '.join(ESTIMATORS)}")
        self.estimator = estimator
        self.momentum = float(momentum)
        self.batches = 0
        self._mean: Optional[np.ndarray] = None
        self._var: Optional[np.ndarray] = None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        x3 = x.reshape(x.shape[0], x.shape[1], -1)  # a view: N, C, positions
        m = x3.shape[0] * x3.shape[2]
        mean = x3.mean(axis=(0, 2), dtype=np.float64)
        var = x3.var(axis=(0, 2), dtype=np.float64)  # biased, within the batch; float64 throughout
        unbiased = var * (m / (m - 1)) if m > 1 else var
        if self._mean is None:
            c = mean.shape[0]
            start = (np.zeros(c), np.ones(c)) if self.estimator == "momentum" else (np.zeros(c), np.zeros(c))
            self._mean, self._var = start
        if self.estimator == "population":
            self._mean += mean
            self._var += unbiased
        else:
            k = self.momentum
            self._mean = k * self._mean + (1 - k) * mean
            self._var = k * self._var + (1 - k) * unbiased
        self.batches += 1

    def result(self) -> Tuple[np.ndarray, np.ndarray]:
        if self._mean is None:
            raise BnfoldError("the calibration data holds no sample")
        if self.estimator == "population":
            return self._mean / self.batches, self._var / self.batches
        return self._mean.copy(), self._var.copy()
