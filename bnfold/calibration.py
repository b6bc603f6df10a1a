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
  After b batches the data weighs 1 - momentum^b (2 batches at 0.99: 2 %); below 99 %
  the result carries a warning.

Every value is checked: non-finite data is refused naming the file, the array and the
sample; m < 2 (a batch of one sample of 2-D activations) is refused.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from .errors import BnfoldError

ESTIMATORS = ("population", "momentum")
Data = Union[str, "os.PathLike[str]", Iterable[Mapping[str, np.ndarray]]]


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK"


class Chunk:
    """Samples as read from one source: ``arrays`` by input name, ``source`` (a file, or
    None for Python data) and ``where`` (how to name it in a message)."""

    def __init__(self, arrays: Dict[str, np.ndarray], source: Optional[Path], where: str) -> None:
        self.arrays, self.source, self.where = arrays, source, where


def _chunks(data: Data, input_names: List[str]) -> Iterator[Chunk]:
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
            yield Chunk(_load(f, input_names), f, str(f))
    else:
        for k, chunk in enumerate(data):
            missing = [n for n in input_names if n not in chunk]
            if missing:
                raise BnfoldError(f"calibration chunk {k} has no array for input(s) {', '.join(missing)}")
            yield Chunk({n: np.asarray(chunk[n]) for n in input_names}, None, f"calibration chunk {k}")


def _load(f: Path, input_names: List[str]) -> Dict[str, np.ndarray]:
    try:
        with open(f, "rb") as fh:
            head = fh.read(6)
    except OSError as e:
        raise BnfoldError(f"cannot be read ({e.strerror or e})", f) from None
    # Recognise the format first: numpy's own error for other files is a hint about pickles.
    if not (head.startswith(_ZIP_MAGIC) or head == _NPY_MAGIC):
        what = "is empty" if not head else "is neither a .npz nor a .npy file"
        raise BnfoldError(f"{what}: calibration data is a .npz (one array per input) or a .npy", f)
    try:
        if head == _NPY_MAGIC:
            if len(input_names) != 1:
                raise BnfoldError(f"a .npy file feeds one input, the model has {len(input_names)}; use .npz", f)
            return {input_names[0]: np.load(f, allow_pickle=False)}
        with np.load(f, allow_pickle=False) as z:
            if not z.files:
                raise BnfoldError("is an empty .npz: it holds no array", f)
            missing = [n for n in input_names if n not in z.files]
            if missing:
                raise BnfoldError(f"has no array for model input(s) {', '.join(missing)} "
                                  f"(it holds {', '.join(z.files)})", f)
            return {n: z[n] for n in input_names}
    except BnfoldError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # a damaged or object-array file
        raise BnfoldError(f"cannot be read as calibration data ({e})", f) from None


def _check_chunk(chunk: Chunk) -> int:
    """The chunk's sample count; refuses arrays of no samples, unequal lengths or non-finite values."""
    counts = {}
    for name, v in chunk.arrays.items():
        if v.ndim == 0 or v.shape[0] == 0:
            problem = "is a scalar" if v.ndim == 0 else "holds no sample (its leading axis is 0)"
            raise _error(chunk, f"array '{name}' {problem}; samples go on axis 0")
        counts[name] = v.shape[0]
        if v.dtype.kind in "fc":
            bad = ~np.isfinite(v.reshape(v.shape[0], -1)).all(axis=1)
            if bad.any():
                i = int(np.argmax(bad))
                value = v[i][~np.isfinite(v[i])].flat[0]
                raise _error(chunk, f"array '{name}' holds a non-finite value ({value}) in sample {i}: "
                                    "calibration data must be finite")
    if len(set(counts.values())) > 1:
        text = ", ".join(f"'{k}' {n}" for k, n in counts.items())
        raise _error(chunk, f"arrays hold different numbers of samples ({text}): they must share axis 0")
    return next(iter(counts.values()))


def _error(chunk: Chunk, message: str) -> BnfoldError:
    return BnfoldError(message, chunk.source) if chunk.source else BnfoldError(f"{chunk.where}: {message}")


@dataclass
class Batch:
    """One calibration batch: ``feeds`` by input name, and where its samples came from."""

    feeds: Dict[str, np.ndarray]
    sources: List[str]

    @property
    def size(self) -> int:
        return len(next(iter(self.feeds.values())))


def iter_batches(data: Data, input_names: List[str], batch_size: Optional[int],
                 check: Optional[Callable[[Chunk], None]] = None) -> Iterator[Batch]:
    """Batches of ``batch_size`` samples each (chunks as given when ``batch_size`` is None).

    Every chunk is checked (finite values, one sample count) and ``check`` is called on it
    before any of its samples is used, so that problems name the file they are in."""
    check_batch_size(batch_size)
    pending: List[Dict[str, np.ndarray]] = []
    sources: List[str] = []
    have = 0
    for chunk in _chunks(data, input_names):
        n = _check_chunk(chunk)
        if check is not None:
            check(chunk)
        if batch_size is None:
            yield Batch(chunk.arrays, [chunk.where])
            continue
        pending.append(chunk.arrays)
        sources.append(chunk.where)
        have += n
        while have >= batch_size:
            joined = {k: np.concatenate([c[k] for c in pending]) for k in input_names}
            yield Batch({k: v[:batch_size] for k, v in joined.items()}, list(sources))
            rest = {k: v[batch_size:] for k, v in joined.items()}
            have -= batch_size
            pending = [rest] if have else []
            sources = sources[-1:] if have else []
    if pending and have:
        yield Batch({k: np.concatenate([c[k] for c in pending]) for k in input_names}, sources)


# Where the momentum estimator starts, as PyTorch and Keras do (running_mean 0, running_var 1).
MOMENTUM_START = (0.0, 1.0)
# Below this weight of the data in momentum statistics, the start values still show: warn.
MOMENTUM_WARN_WEIGHT = 0.99


def check_momentum(momentum: float) -> None:
    """Refuse a momentum outside [0, 1): at 1 the running average never moves from its start
    values (a no-op); above 1 or below 0 it is not an average."""
    k = float(momentum)
    if k == 1.0:
        raise BnfoldError("momentum 1 keeps the running averages at their start values (mean 0, var 1) whatever "
                          "the data: use a value in [0, 1), e.g. 0.99 (Keras) or 0.9 (PyTorch's momentum 0.1)")
    if not (0.0 <= k < 1.0):
        raise BnfoldError(f"momentum {momentum} is not in [0, 1): running = momentum x running + "
                          "(1 - momentum) x batch must be an average")


def check_batch_size(batch_size: Optional[int]) -> None:
    """Refuse a batch size that is not a whole number >= 1 (None: the chunks as given). 0 gave
    empty batches, refused only later by ONNX Runtime or as "m = 0"."""
    if batch_size is None:
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise BnfoldError(f"batch size {batch_size!r}: a whole number of samples, at least 1")


def moments(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray, int]:
    """Per-channel mean and biased variance of ``x`` ``[N, C, ...]`` in float64, and m,
    the number of values per channel."""
    x3 = np.asarray(x).reshape(x.shape[0], x.shape[1], -1)  # a view: N, C, positions
    m = x3.shape[0] * x3.shape[2]
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite input: the caller refuses it
        mean = x3.mean(axis=(0, 2), dtype=np.float64)
        var = x3.var(axis=(0, 2), dtype=np.float64)  # biased, within the batch; float64 throughout
    return mean, var, m


class Moments:
    """A picklable reducer for ``Runner.run_reduce``: ``{name: moments(outputs[name])}``, so
    that only per-channel moments, not activations, leave ONNX Runtime's worker process."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = list(names)

    def __call__(self, outputs: Mapping[str, np.ndarray]) -> Dict[str, Tuple[np.ndarray, np.ndarray, int]]:
        return {n: moments(outputs[n]) for n in self.names}


class ChannelStats:
    """Streaming per-channel mean and variance, in float64, from per-batch moments."""

    def __init__(self, estimator: str = "population", momentum: float = 0.99) -> None:
        if estimator not in ESTIMATORS:
            raise BnfoldError(f"estimator '{estimator}': use one of {', '.join(ESTIMATORS)}")
        check_momentum(momentum)
        self.estimator = estimator
        self.momentum = float(momentum)
        self.batches = 0
        self._mean: Optional[np.ndarray] = None
        self._var: Optional[np.ndarray] = None

    def update(self, x: np.ndarray) -> None:
        """Add one batch of activations ``[N, C, ...]``."""
        self.update_moments(*moments(x))

    def update_moments(self, mean: np.ndarray, var: np.ndarray, m: int) -> None:
        """Add one batch given by its per-channel mean, biased variance and m values per channel
        (m >= 2: the unbiased variance m/(m-1) x var is undefined for m = 1)."""
        if m < 2:
            raise ValueError("m < 2")  # callers check first, to name the tensor
        unbiased = np.asarray(var, np.float64) * (m / (m - 1))
        mean = np.asarray(mean, np.float64)
        if self._mean is None or self._var is None:
            c = mean.shape[0]
            if self.estimator == "momentum":
                acc_mean, acc_var = np.full(c, MOMENTUM_START[0]), np.full(c, MOMENTUM_START[1])
            else:
                acc_mean, acc_var = np.zeros(c), np.zeros(c)
        else:
            acc_mean, acc_var = self._mean, self._var
        if self.estimator == "population":
            acc_mean += mean
            acc_var += unbiased
        else:
            k = self.momentum
            acc_mean = k * acc_mean + (1 - k) * mean
            acc_var = k * acc_var + (1 - k) * unbiased
        self._mean, self._var = acc_mean, acc_var
        self.batches += 1

    def result(self) -> Tuple[np.ndarray, np.ndarray]:
        if self._mean is None or self._var is None:
            raise BnfoldError("the calibration data holds no sample")
        if self.estimator == "population":
            return self._mean / self.batches, self._var / self.batches
        return self._mean.copy(), self._var.copy()


def data_weight(estimator: str, momentum: float, batches: int) -> float:
    """The weight of the data in the statistics: 1 for population, 1 - momentum^batches for
    momentum (the rest is the start values 0 and 1)."""
    return 1.0 if estimator == "population" else 1.0 - float(momentum) ** batches
