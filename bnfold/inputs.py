"""Model inputs for verification: shapes, seeded random data, or the user's files.

Dynamic dimensions take, in order: ``--shape INPUT=AxBxC`` for the whole input,
``--dim NAME=VALUE`` for a named symbolic dimension, else the defaults
:data:`DEFAULT_BATCH` for axis 0 and :data:`DEFAULT_DIM` for any other axis.
Random values: floats from a standard normal, signed integers in [0, 10) (safe as
indices), uint8 in [0, 256), bools fair coins, except scalar bools (branch
conditions), which alternate True/False from sample to sample; one generator
seeded per sample.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Tuple

import numpy as np

from .errors import BnfoldError

DEFAULT_BATCH = 2
DEFAULT_DIM = 32
# Random inputs larger than this are refused before numpy is asked for them (a typo in --shape asked
# for terabytes: MemoryError, exit 3): far above any real model's input, far below a machine's memory.
MAX_RANDOM_BYTES = 2**32


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    dims: Tuple[object, ...]  # int, str (symbolic) or None (unknown)


def input_specs(model) -> List[InputSpec]:
    """The inputs a caller must feed: graph inputs that have no initializer."""
    from onnx import helper

    inits = {t.name for t in model.graph.initializer}
    specs = []
    for v in model.graph.input:
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        dims: Tuple[object, ...] = ()
        if tt.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(v.name, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims))
    return specs


def dtype_of_ort_type(type_str: str) -> np.dtype:
    """numpy dtype for an ONNX Runtime type string such as ``tensor(float16)``."""
    from onnx import TensorProto, helper

    name = type_str[len("tensor("):-1] if type_str.startswith("tensor(") else type_str
    onnx_names = {"float": "FLOAT", "double": "DOUBLE"}
    try:
        elem = getattr(TensorProto, onnx_names.get(name, name.upper()))
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    except (AttributeError, KeyError, TypeError):
        raise BnfoldError(f"inputs of type {type_str} are not supported") from None


def resolve_shapes(specs: List[InputSpec], dims: Mapping[str, int],
                   shapes: Mapping[str, Tuple[int, ...]]) -> Tuple[Dict[str, Tuple[int, ...]], List[str]]:
    """Concrete shapes for every input, and notes on each default that was applied."""
    out: Dict[str, Tuple[int, ...]] = {}
    notes: List[str] = []
    for spec in specs:
        if spec.name in shapes:
            out[spec.name] = tuple(shapes[spec.name])
            continue
        shape = []
        for axis, d in enumerate(spec.dims):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif isinstance(d, str) and d in dims:
                shape.append(int(dims[d]))
            else:
                value = DEFAULT_BATCH if axis == 0 else DEFAULT_DIM
                shape.append(value)
                notes.append(f"{spec.name} axis {axis} ({d or 'unknown'}) = {value} by default")
        out[spec.name] = tuple(shape)
    return out, notes


def random_feeds(specs: List[InputSpec], shapes: Mapping[str, Tuple[int, ...]], seed: int,
                 sample: int = 0) -> Dict[str, np.ndarray]:
    """Seeded random feeds. A scalar bool (a branch condition) alternates True/False by
    ``sample``, so that two samples take both branches."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = shapes[spec.name]
        dt = spec.dtype
        nbytes = math.prod(shape) * dt.itemsize
        if nbytes > MAX_RANDOM_BYTES:
            raise BnfoldError(f"input '{spec.name}' of shape {'x'.join(map(str, shape))} would take "
                              f"{nbytes / 2**30:.3g} GiB of random data; give smaller dimensions (--dim, --shape) "
                              "or real inputs (--inputs)")
        if dt.kind == "f" or dt.name == "bfloat16":
            arr = rng.standard_normal(shape).astype(dt)
        elif dt.kind == "b":
            arr = np.asarray(sample % 2 == 0) if shape == () else rng.random(shape) < 0.5
        elif dt == np.uint8:
            arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
        elif dt.kind in "iu":
            arr = rng.integers(0, 10, size=shape).astype(dt)
        else:
            raise BnfoldError(f"cannot generate data for input '{spec.name}' of type {dt}; pass --inputs")
        feeds[spec.name] = np.asarray(arr, dtype=dt)  # 0-d inputs come back from numpy as scalars
    return feeds


def load_feeds(path: os.PathLike, specs: List[InputSpec]) -> Dict[str, np.ndarray]:
    """Feeds from a ``.npz`` (keys = input names) or a ``.npy`` (single-input models)."""
    p = Path(path)
    if p.is_dir():
        raise BnfoldError("is a directory: --inputs takes a .npz (one array per input) or a .npy file", p)
    if not p.is_file():
        raise BnfoldError("no such file", p)
    try:
        with open(p, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise BnfoldError(f"cannot be read ({e.strerror or e})", p) from None
    if not magic:
        raise BnfoldError("is empty: --inputs takes a .npz (one array per input) or a .npy file", p)
    if not (magic.startswith(b"PK") or magic == b"\x93NUMPY"):  # zip (npz) or npy magic
        raise BnfoldError("is neither a .npz nor a .npy file: --inputs takes a .npz (one array per input) or a "
                          ".npy file", p)
    try:
        if p.suffix == ".npy":
            if len(specs) != 1:
                raise BnfoldError(f"a .npy file feeds one input, but the model has {len(specs)}; use .npz", p)
            feeds = {specs[0].name: np.load(p, allow_pickle=False)}
        else:
            with np.load(p, allow_pickle=False) as data:
                feeds = {k: data[k] for k in data.files}
    except BnfoldError:
        raise
    except Exception as e:
        raise BnfoldError(f"cannot be read as numpy data ({e})", p) from None
    missing = [s.name for s in specs if s.name not in feeds]
    if missing:
        raise BnfoldError(f"has no array for input(s) {', '.join(missing)}", p)
    symbols: Dict[str, Tuple[str, int]] = {}
    for s in specs:
        feeds[s.name] = _fitted(p, s, np.asarray(feeds[s.name]), symbols)
    return {s.name: feeds[s.name] for s in specs}


def _dims_text(dims: Tuple[object, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _fitted(path: Path, spec: InputSpec, arr: np.ndarray, symbols: Dict[str, Tuple[str, int]]) -> np.ndarray:
    """``arr`` checked against what the model declares for ``spec`` (rank, fixed and shared
    symbolic dims, a dtype it converts to without changing kind, finite values), so that a
    wrong file is named with the input, not reported as the model failing to run."""
    where = f"array '{spec.name}'"
    if spec.dims and arr.ndim != len(spec.dims):
        raise BnfoldError(f"{where} has shape {list(arr.shape)} (rank {arr.ndim}), but the model's input "
                          f"'{spec.name}' is {_dims_text(spec.dims)} (rank {len(spec.dims)})", path)
    for axis, d in enumerate(spec.dims if spec.dims else ()):
        got = arr.shape[axis]
        if isinstance(d, int) and d > 0 and got != d:
            raise BnfoldError(f"{where} has shape {list(arr.shape)}, but the model's input '{spec.name}' is "
                              f"{_dims_text(spec.dims)} (axis {axis} must be {d})", path)
        if isinstance(d, str) and d:
            seen = symbols.setdefault(d, (spec.name, got))
            if seen[1] != got:
                raise BnfoldError(f"{where} has {d} = {got} on axis {axis}, but array '{seen[0]}' has {d} = "
                                  f"{seen[1]}; the model's inputs share that dimension", path)
    if arr.dtype != spec.dtype:
        if not np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
            raise BnfoldError(f"{where} is {arr.dtype}, but the model's input '{spec.name}' is {spec.dtype}; "
                              "converting would change its values", path)
        arr = arr.astype(spec.dtype)
    if arr.dtype.kind in "fc" and arr.size and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise BnfoldError(f"{where} holds NaN or inf (first at index {tuple(int(i) for i in bad)}, sample "
                          f"{int(bad[0]) if arr.ndim else 0}); verification needs finite inputs", path)
    return arr


def parse_assignments(values, what: str, parse, form: str = "") -> Dict[str, object]:
    """``["a=1", "b=2"]`` into a dict, with a clear error for malformed items (``form``: what a
    valid value looks like, said when one is not)."""
    out = {}
    given: Dict[str, str] = {}  # name -> the item that set it
    for item in values or ():
        name, sep, value = item.rpartition("=")
        if not sep or not name:
            raise BnfoldError(f"{what} '{item}' is not of the form NAME=VALUE")
        if name in given:
            raise BnfoldError(f"{what} {name} is given twice ('{given[name]}' and '{item}'): give it once")
        given[name] = item
        try:
            out[name] = parse(value)
        except ValueError:
            raise BnfoldError(f"{what} '{item}' has an invalid value" + (f" (expected {form})" if form else "")) \
                from None
    return out


SHAPE_FORM = "dimensions separated by 'x', as 1x3x224x224"


def parse_shape(text: str) -> Tuple[int, ...]:
    """``"1x3x224x224"`` (or ``"1,3,224,224"``) into a tuple; ValueError for anything else: an empty
    dimension (``1xx3``, a trailing ``x``), both separators, a sign, a non-integer."""
    sep = "," if "," in text else "x"
    pieces = text.lower().split(sep)
    if not all(p.strip().isdigit() and p.isascii() for p in pieces):  # refuses "", "-1", "+2", the other separator
        raise ValueError(text)
    return tuple(int(p) for p in pieces)
