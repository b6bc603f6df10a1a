"""Numerical equivalence of two models, judged against measured noise.

Never imports the fold code: the checker stays independent of what it checks.

How it decides (figures behind the constants: docs/VERIFY.md):

1. **Float64 pass** ("calibrated", :mod:`bnfold.exact`), on the first sample: both
   models upcast to float64 and run through onnx.reference with inference
   BatchNormalization. The only legitimate difference of a correct rewrite is the
   rounding of the weights it rewrote, so the *allowance* is measured on both sides:
   the reference's weights, then the candidate's (whose rewritten weights a correct
   fold rounded once), are moved at random within half an ulp of their dtype
   (:data:`PERTURBATIONS` draws each; :data:`PERTURBATIONS_LARGE` for a costly
   model with large outputs) and the largest output move is kept. The
   candidate passes when its float64 deviation from the reference is within
   ``ALLOWANCE_MULTIPLE x allowance + max(FLOAT64_FLOOR, OUTPUT_FLOOR_ULPS ulps of
   the output dtype)`` (all relative to max|reference output|): a deviation below one
   ulp of the output's own dtype at that scale is not visible in the output.
2. **Runtime comparisons** in the models' own dtype (ONNX Runtime, optimisations
   off; CPU, and CUDA where it works): an element fails when it differs by more
   than ``atol = scale x (RUNTIME_NOISE_MULTIPLE x noise + ALLOWANCE_MULTIPLE x
   allowance + FLOAT64_FLOOR + DTYPE_FLOOR_ULPS ulps)``, where ``scale`` is
   max|reference output| over all samples and ``noise`` is the reference's own
   measured deviation from its float64 result on each provider involved.

When the float64 pass is over its time budget (``exact_budget_s``, default
:data:`EXACT_BUDGET_S`) or cannot evaluate the model, the verdict is
**runtime-calibrated**: the reference itself is rerun on each provider with its
weights moved :data:`RUNTIME_ULPS` ulp up or down at random (:data:`RUNTIME_DRAWS`
draws; :data:`RUNTIME_DRAWS_SMALL` for outputs under :data:`RUNTIME_SMALL_OUTPUT`
elements of a model under :data:`RUNTIME_SMALL_MODEL` weights); the largest output move
(and, across providers, the reference's own CPU/CUDA difference) is the floor, and the candidate passes within
``multiple x floor + RUNTIME_FLOOR_ULPS ulps`` of the output dtype (multiple: :data:`RUNTIME_MULTIPLE_FULL`
when every moved weight is float32/float64, :data:`RUNTIME_MULTIPLE` with float16/bfloat16 weights).

Only weights a rewrite can round are ever moved (:func:`bnfold.exact.float_initializers`):
those read only by compute nodes (readers of a float weight of rank >= 2) or by element-wise
affine ops, never a Resize scale or a Pow exponent.

Explicit ``rtol``/``atol``/``output_tolerances`` turn an output into the classic
element-wise "fixed" check: an element fails only when its absolute difference
exceeds *both* ``atol`` and ``rtol * |reference|``; missing parts take
:data:`DEFAULT_TOLERANCES` (``atol`` a fraction of max|reference| over all
samples). NaN must meet NaN and infinities must match in every mode; a shape or
dtype difference fails the output; comparing zero elements is an error. Every
output reports its method, the measured ``floor``, the applied ``limit`` and the
fraction of it ``used``.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np

from . import inputs as inputs_mod
from . import runner
from .errors import BnfoldError

if TYPE_CHECKING:
    import onnx

# dtype -> (rtol, atol as a fraction of max|reference|): the fixed check (explicit tolerances)
DEFAULT_TOLERANCES: Dict[str, Tuple[float, float]] = {
    "float64": (1e-7, 1e-9),
    "float32": (1e-3, 1e-4),
    "float16": (2e-2, 5e-3),
    "bfloat16": (6e-2, 2e-2),
}
CROSS_PROVIDER_FACTOR = 10.0  # fixed check only: CPU vs CUDA
LOCALIZE_BATCH = 64
# Calibrated verdict (figures that set these: docs/VERIFY.md).
ALLOWANCE_MULTIPLE = 2.0
RUNTIME_NOISE_MULTIPLE = 4.0
PERTURBATIONS = 2  # half-ulp draws per side (reference, candidate)
PERTURBATIONS_LARGE = 1  # per side, for a costly model with large outputs
COSTLY_EVALUATION_S = 0.5  # estimated seconds of one float64 evaluation
FLOAT64_FLOOR = 1e-9  # relative to max|output|: float64 evaluation-order noise (BN cancellation)
OUTPUT_FLOOR_ULPS = 1.0  # float64 limit floor: ulps of the output dtype at max|output|
DTYPE_FLOOR_ULPS = 16
EXACT_BUDGET_S = 10.0
# Runtime-calibrated verdict (float64 pass skipped or impossible).
RUNTIME_DRAWS = 2
RUNTIME_DRAWS_SMALL = 6  # small outputs (a maximum over few elements is a noisy floor) of a cheap model
RUNTIME_SMALL_OUTPUT = 1000  # float output elements, over all samples
RUNTIME_SMALL_MODEL = 1_000_000  # weight values moved
RUNTIME_ULPS = 1.0
RUNTIME_FRACTION = 1.0  # share of float32/float64 weights moved in each draw
RUNTIME_FRACTION_HALF = 1.0 / 12  # float16/bfloat16: the variance of rounding to nearest (ulp**2 / 12)
RUNTIME_MULTIPLE = 2.0  # a model with float16/bfloat16 weights (a random 1/12 of them moved)
# Every float32/float64 weight moved: that re-draws the runtime's own arithmetic rounding only in part,
# and in deep or attention networks that rounding, not the weights', sets the reference's error
# (levit_128s dynamo fp32: a fold closer to float64 than the reference used 103% of a 2x limit).
RUNTIME_MULTIPLE_FULL = 3.0
RUNTIME_FLOOR_ULPS = 4.0
RUNTIME_SEED = 20261204
ModelLike = Union[str, "os.PathLike[str]", "onnx.ModelProto"]


@dataclass
class Tolerance:
    rtol: Optional[float] = None
    atol: Optional[float] = None  # absolute when given

    def resolve(self, dtype: np.dtype, scale: float, factor: float = 1.0) -> Tuple[float, float]:
        d_rtol, d_atol = DEFAULT_TOLERANCES.get(np.dtype(dtype).name, (0.0, 0.0))
        rtol = self.rtol if self.rtol is not None else d_rtol * factor
        atol = self.atol if self.atol is not None else d_atol * factor * scale
        return rtol, atol


ToleranceLike = Union[Tolerance, Tuple[Optional[float], Optional[float]]]
"""A :class:`Tolerance` or its ``(rtol, atol)``."""


@dataclass
class OutputResult:
    """How one output compared, over all samples (``rtol``/``atol``: the tolerances applied).

    ``scale`` is max finite |reference| over all samples; ``floor`` the measured noise the
    tolerance is built on and ``limit`` = ``atol / scale``, both relative to ``scale``
    (``floor`` is None for the fixed check); ``used`` the largest |difference| / its bound
    over the elements (the fraction of the limit used: above 1 fails; inf for NaN/inf
    mismatches)."""

    name: str
    equivalent: bool
    dtype: str = ""
    shape: List[int] = field(default_factory=list)
    rtol: float = 0.0
    atol: float = 0.0
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    mean_abs_error: float = 0.0
    cosine_similarity: Optional[float] = 1.0  # None when NaN/inf are involved (not meaningful)
    fail_fraction: float = 0.0
    worst: Optional[dict] = None
    problem: Optional[str] = None
    compared: int = 0  # elements compared
    method: str = "calibrated"  # calibrated | runtime-calibrated | fixed
    scale: float = 0.0
    floor: Optional[float] = None
    limit: float = 0.0
    used: float = 0.0

@dataclass
class Comparison:
    name: str
    reference_provider: str
    candidate_provider: str
    equivalent: bool
    outputs: List[OutputResult]
    placement: Optional[dict] = None  # CUDA comparisons: nodes per provider, as ONNX Runtime placed them


@dataclass
class ExactOutput:
    """One output in float64 (figures relative to ``scale`` = max|reference float64 output|).

    ``allowance`` (the measured floor) is the larger of ``reference_allowance`` and
    ``candidate_allowance``: the largest output move of a half-ulp perturbation of each side's
    rewritable weights; ``limit`` = ALLOWANCE_MULTIPLE x allowance + ``output_floor``."""

    name: str
    equivalent: bool
    scale: float
    allowance: float
    deviation: float  # candidate float64 vs reference float64
    limit: float
    used: float  # deviation / limit
    reference_allowance: float = 0.0
    candidate_allowance: float = 0.0
    output_floor: float = 0.0  # max(FLOAT64_FLOOR, OUTPUT_FLOOR_ULPS ulps of the output dtype)
    reference_noise: Optional[float] = None  # reference on the CPU runtime vs float64
    candidate_noise: Optional[float] = None  # candidate on the CPU runtime vs reference float64
    direction: Optional[str] = None  # closer | further | same: candidate vs reference, to exact arithmetic
    problem: Optional[str] = None


@dataclass
class ExactCheck:
    """The float64 pass: run, or skipped (``why``; the verdict is then runtime-calibrated)."""

    ran: bool
    equivalent: Optional[bool]
    why: Optional[str] = None
    estimated_s: float = 0.0
    seconds: float = 0.0
    perturbations: int = PERTURBATIONS  # draws per side
    multiple: float = ALLOWANCE_MULTIPLE
    outputs: List[ExactOutput] = field(default_factory=list)


@dataclass
class RuntimeCheck:
    """The runtime calibration: the reference rerun with its rewritable weights moved ``ulps`` ulp
    at random, ``draws`` times per provider. ``floors``: provider -> output -> largest output move
    (relative to max|reference output|); ``cross``: output -> the reference's CPU vs CUDA
    difference (when both ran)."""

    why: str
    draws: int = RUNTIME_DRAWS
    ulps: float = RUNTIME_ULPS
    multiple: float = RUNTIME_MULTIPLE
    floor_ulps: float = RUNTIME_FLOOR_ULPS
    weights: int = 0  # weights moved
    seconds: float = 0.0
    floors: Dict[str, Dict[str, float]] = field(default_factory=dict)
    cross: Dict[str, float] = field(default_factory=dict)


@dataclass
class VerifyReport:
    """The verdict, with per-output figures for every comparison made."""

    reference: str
    candidate: str
    equivalent: bool
    samples: int
    seed: int
    inputs: Dict[str, dict]
    notes: List[str]
    comparisons: List[Comparison]
    skipped: List[dict]
    localized: Optional[dict] = None
    timing: Dict[str, float] = field(default_factory=dict)
    method: str = "calibrated"  # calibrated | runtime-calibrated (float64 pass skipped) | fixed (explicit tolerances)
    exact: Optional[ExactCheck] = None
    runtime: Optional[RuntimeCheck] = None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_junit(self) -> str:
        """JUnit XML: one test case per (comparison, output) (see :mod:`bnfold.reports`)."""
        from .reports import junit_for_verify

        return junit_for_verify(self.to_dict(), candidate=self.candidate)


def _compare(name: str, refs: Sequence[np.ndarray], cands: Sequence[np.ndarray], rtol: Optional[float],
             atol_rel: Optional[float], atol_abs: Optional[float], method: str) -> OutputResult:
    """Element-wise comparison of one output over all samples.

    The applied ``atol`` is ``atol_abs`` when given, else ``atol_rel x scale`` with ``scale`` =
    max finite |reference| over *all* samples: one tolerance, the one reported.
    """
    r = OutputResult(name, True, method=method)
    ref0 = refs[0]
    r.dtype, r.shape = str(ref0.dtype), list(np.shape(ref0))
    for ref, cand in zip(refs, cands):
        if np.shape(ref) != np.shape(cand) or ref.dtype != cand.dtype:
            r.equivalent = False
            r.problem = (f"reference is {ref.dtype}{list(np.shape(ref))}, "
                         f"candidate is {cand.dtype}{list(np.shape(cand))}")
            r.cosine_similarity = None
            return r
    is_float = ref0.dtype.kind in "fc" or ref0.dtype.name == "bfloat16"
    scale = 0.0
    if is_float:
        for ref in refs:
            a = np.asarray(ref, np.float64).reshape(-1)
            fin = a[np.isfinite(a)]
            if fin.size:
                scale = max(scale, float(np.abs(fin).max()))
    d_rtol, d_atol = DEFAULT_TOLERANCES.get(ref0.dtype.name, (0.0, 0.0))
    r.rtol = (d_rtol if rtol is None else rtol) if is_float else 0.0
    if not is_float:
        r.atol = 0.0
    elif atol_abs is not None:
        r.atol = atol_abs
    else:
        r.atol = (d_atol if atol_rel is None else atol_rel) * (scale if scale > 0 else 1.0)
    failing = 0
    sum_abs = 0.0
    dot = nr = nc = 0.0
    non_finite = False
    worst_score = -1.0
    for k, (ref, cand) in enumerate(zip(refs, cands)):
        shape = np.shape(ref)
        if not is_float:
            bad = np.asarray(ref != cand).reshape(-1)
            failing += int(bad.sum())
            r.compared += bad.size
            if bad.any() and r.worst is None:
                idx = np.unravel_index(int(np.argmax(bad)), shape)
                r.worst = {"sample": k, "index": [int(i) for i in idx],
                           "reference": np.asarray(ref)[idx].item(), "candidate": np.asarray(cand)[idx].item()}
            continue
        # 1-d views: 0-d (scalar) tensors work like any other
        a = np.asarray(ref, np.float64).reshape(-1)
        b = np.asarray(cand, np.float64).reshape(-1)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(a - b)
            diff[a == b] = 0.0  # equal infinities
            diff[np.isnan(a) & np.isnan(b)] = 0.0
            diff[np.isnan(diff)] = np.inf  # NaN on one side only, or inf - inf of opposite signs
            bound = np.maximum(r.atol, r.rtol * np.abs(a))
            fail = (diff > r.atol) & (diff > r.rtol * np.abs(a))
            # NaN must meet NaN and an infinity the same infinity, whatever the tolerances
            ok = np.isfinite(a) & np.isfinite(b)
            fail |= ~ok & (diff > 0)
            rel = diff / np.maximum(np.abs(a), np.finfo(np.float64).tiny)
            rel[diff == 0] = 0.0
        non_finite |= not bool(ok.all())
        failing += int(fail.sum())
        r.compared += a.size
        if not a.size:
            continue
        r.max_abs_error = max(r.max_abs_error, float(diff.max()))
        r.max_rel_error = max(r.max_rel_error, float(rel.max()))
        sum_abs += float(diff[np.isfinite(diff)].sum())
        dot += float(np.dot(a[ok], b[ok]))
        nr += float(np.dot(a[ok], a[ok]))
        nc += float(np.dot(b[ok], b[ok]))
        with np.errstate(invalid="ignore", divide="ignore"):
            score = diff / np.where(bound > 0, bound, np.finfo(np.float64).tiny)
        i = int(np.argmax(score))
        if float(score[i]) > worst_score:
            worst_score = float(score[i])
            idx = np.unravel_index(i, shape)
            r.worst = {"sample": k, "index": [int(j) for j in idx], "reference": float(a[i]), "candidate": float(b[i])}
    r.equivalent = failing == 0
    r.scale = scale
    r.limit = r.atol / scale if scale > 0 else r.atol
    r.used = max(worst_score, 0.0) if is_float else (0.0 if failing == 0 else float("inf"))
    r.fail_fraction = failing / max(r.compared, 1)
    r.mean_abs_error = sum_abs / max(r.compared, 1)
    if non_finite or not is_float:
        r.cosine_similarity = None  # over finite elements only it would hide the NaN/inf rows
    else:
        denom = np.sqrt(nr) * np.sqrt(nc)
        r.cosine_similarity = float(dot / denom) if denom > 0 else (1.0 if nr == nc else 0.0)
    return r


def _non_finite_notes(runs: Sequence[Mapping[str, np.ndarray]], out_names: Sequence[str]) -> List[str]:
    """A note per float output that is NaN or inf in the reference: the candidate matching it
    there passes, which says nothing about the values the model should have computed."""
    notes = []
    for o in out_names:
        values = [np.asarray(run[o]) for run in runs if o in run]
        if not values or not _is_float(values[0].dtype):
            continue
        total = sum(v.size for v in values)
        bad = total - sum(int(np.isfinite(v.astype(np.float64)).sum()) for v in values)
        if bad:
            notes.append(f"output {o}: {bad / total:.0%} of the reference's values are NaN or inf; the candidate "
                         "matches them there, which checks nothing about them (corrupt weights or inputs?)")
    return notes


def parse_providers(spec: str) -> Tuple[List[str], List[dict]]:
    """``auto|cpu|cuda|cpu,cuda`` into the providers to use and the skipped ones (with why)."""
    parts = [p.strip().lower() for p in spec.split(",") if p.strip()]
    if not parts or any(p not in ("auto", runner.CPU, runner.CUDA) for p in parts) or (
            "auto" in parts and len(parts) > 1):
        raise BnfoldError(f"--providers '{spec}': use auto, cpu, cuda or cpu,cuda")
    if parts == ["auto"]:
        ok, why = runner.cuda_status()
        return ([runner.CPU, runner.CUDA] if ok else [runner.CPU]), ([] if ok else [{"name": "cuda", "why": why}])
    if runner.CUDA in parts:
        ok, why = runner.cuda_status()
        if not ok:
            raise BnfoldError(f"--providers {spec}: CUDA is not usable here: {why}")
    return parts, []


def _comparisons(providers: Sequence[str]) -> List[Tuple[str, str, str, float]]:
    """(name, reference provider, candidate provider, fixed-check tolerance factor)."""
    out = []
    if runner.CPU in providers:
        out.append(("cpu", runner.CPU, runner.CPU, 1.0))
    if runner.CUDA in providers:
        out.append(("cuda", runner.CUDA, runner.CUDA, 1.0))
        out.append(("cpu-vs-cuda", runner.CPU, runner.CUDA, CROSS_PROVIDER_FACTOR))
    return out


# -- models given as protos ----------------------------------------------------------------------

@contextlib.contextmanager
def _as_paths(models: Sequence[ModelLike], external_data_dir: Optional[os.PathLike]) -> Iterator[List[str]]:
    """Paths for paths, and for in-memory ``onnx.ModelProto`` a file in a private temporary folder.

    External data a proto still refers to resolves against ``external_data_dir`` (default: the current
    directory): each referenced file is linked into the temporary folder beside the model.
    """
    import onnx

    tmp: Optional[str] = None
    paths: List[str] = []
    try:
        for k, m in enumerate(models):
            if not isinstance(m, onnx.ModelProto):
                paths.append(os.fspath(m))
                continue
            if tmp is None:
                tmp = tempfile.mkdtemp(prefix="bnfold-verify-")
            path = os.path.join(tmp, f"model{k}.onnx")
            base = Path(external_data_dir or os.getcwd())
            for loc in _external_locations(m):
                src = (base / loc).resolve()
                dst = Path(tmp) / loc
                if not src.is_file():
                    raise BnfoldError(f"the in-memory model refers to external data '{loc}', not found in {base}")
                if not dst.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(src, dst)
            if m.ByteSize() > 2**31 - 2**26:  # protobuf's 2 GB limit: move the weights out
                m2 = onnx.ModelProto()
                m2.CopyFrom(m)
                onnx.save_model(m2, path, save_as_external_data=True, location=f"model{k}.data")
            else:
                with open(path, "wb") as f:
                    f.write(m.SerializeToString())
            paths.append(path)
        yield paths
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _external_locations(model) -> List[str]:
    from onnx import TensorProto

    locs = []
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location" and e.value not in locs:
                    locs.append(e.value)
    return locs


# -- options -------------------------------------------------------------------------------------

def _spec_text(spec) -> str:
    dims = ",".join("?" if d is None else str(d) for d in spec.dims)
    return f"{spec.name} {np.dtype(spec.dtype).name}[{dims}]"


def _check_interfaces(ref_specs, cand_specs, cand_path: str) -> None:
    """Same input names, dtypes and ranks, and no fixed dimension that disagrees."""
    ref_by, cand_by = {s.name: s for s in ref_specs}, {s.name: s for s in cand_specs}
    diffs = []
    for name in ref_by.keys() | cand_by.keys():
        a, b = ref_by.get(name), cand_by.get(name)
        if a is None or b is None:
            diffs.append(f"{name} only in the {'candidate' if a is None else 'reference'}")
            continue
        fixed_clash = len(a.dims) == len(b.dims) and any(
            isinstance(x, int) and isinstance(y, int) and x > 0 and y > 0 and x != y for x, y in zip(a.dims, b.dims))
        if np.dtype(a.dtype) != np.dtype(b.dtype) or len(a.dims) != len(b.dims) or fixed_clash:
            diffs.append(f"reference {_spec_text(a)}, candidate {_spec_text(b)}")
    if diffs:
        raise BnfoldError("the inputs differ: " + "; ".join(sorted(diffs)), cand_path)


def _check_options(specs, output_names: Sequence[str], dims: Mapping[str, int],
                   shapes: Mapping[str, Tuple[int, ...]], output_tolerances: Mapping[str, ToleranceLike]) -> None:
    """Every name given must exist in the model; values must be usable; --dim and --shape must not collide."""
    symbols = sorted({d for s in specs for d in s.dims if isinstance(d, str)})
    for name, value in dims.items():
        if name not in symbols:
            raise BnfoldError(f"--dim {name}: the model has no dimension named '{name}' "
                              f"(its named dimensions: {', '.join(symbols) or 'none'})")
        if int(value) <= 0:
            raise BnfoldError(f"--dim {name}={value}: a dimension must be a positive integer")
    by_name = {s.name: s for s in specs}
    for name, shape in shapes.items():
        spec = by_name.get(name)
        if spec is None:
            raise BnfoldError(f"--shape {name}: the model has no input named '{name}' "
                              f"(its inputs: {', '.join(by_name) or 'none'})")
        if spec.dims and len(shape) != len(spec.dims):
            raise BnfoldError(f"--shape {name}: {len(shape)} dimension(s) given, the input has {len(spec.dims)}")
        if any(int(d) <= 0 for d in shape):
            raise BnfoldError(f"--shape {name}: every dimension must be a positive integer")
        for axis, (want, d) in enumerate(zip(shape, spec.dims)):
            if isinstance(d, int) and d > 0 and d != want:
                raise BnfoldError(f"--shape {name}: axis {axis} is fixed at {d} in the model, not {want}")
        both = [d for d in spec.dims if isinstance(d, str) and d in dims]
        if both:
            raise BnfoldError(f"--shape {name} and --dim {', '.join(both)} both set input '{name}': give one")
    unknown = [o for o in output_tolerances if o not in output_names]
    if unknown:
        raise BnfoldError(f"--output-tol {unknown[0]}: the model has no output named '{unknown[0]}' "
                          f"(its outputs: {', '.join(output_names)})")


def _check_not_vacuous(feeds_list: Sequence[Mapping[str, np.ndarray]], source: Optional[os.PathLike]) -> None:
    if not feeds_list:
        raise BnfoldError("no input samples: nothing would be compared", source)
    for feeds in feeds_list:
        for name, arr in feeds.items():
            if np.size(arr) == 0:
                raise BnfoldError(f"input '{name}' has 0 elements (shape {list(np.shape(arr))}): "
                                  "nothing would be compared", source)


# -- the verdict ---------------------------------------------------------------------------------

def verify(reference: ModelLike, candidate: ModelLike, *, providers: str = "auto", samples: Optional[int] = None,
           seed: int = 0, dims: Optional[Mapping[str, int]] = None,
           shapes: Optional[Mapping[str, Tuple[int, ...]]] = None, inputs: Optional[os.PathLike] = None,
           rtol: Optional[float] = None, atol: Optional[float] = None,
           output_tolerances: Optional[Mapping[str, ToleranceLike]] = None, localize: bool = False,
           validated: bool = False, exact_budget_s: float = EXACT_BUDGET_S,
           external_data_dir: Optional[os.PathLike] = None) -> VerifyReport:
    """Run ``reference`` and ``candidate`` on the same inputs and judge every output (see the module docstring).

    Either model may be a path or an in-memory ``onnx.ModelProto`` (written to a private temporary
    folder; external data it refers to resolves against ``external_data_dir``, default the current
    directory). ``samples`` random input sets (default 2) or the arrays of ``inputs`` (then ``samples``
    must not be given: the file is the one sample). ``output_tolerances`` maps output names to a
    :class:`Tolerance` or an ``(rtol, atol)`` pair. ``exact_budget_s``: the float64 pass is skipped
    (runtime-calibrated verdict, said in the report) when its estimated cost exceeds this; 0 never runs it.
    ``validated`` skips bnfold's own checks of the files for callers that just made or checked them.

    Raises :class:`BnfoldError` when a model cannot be loaded or run, an option names something the
    model lacks, the two models' inputs differ, nothing would be compared, the providers asked for
    are not usable, or a tolerance is not a finite number >= 0.
    """
    _check_arguments(samples, seed, inputs, rtol, atol, output_tolerances)
    with _as_paths([reference, candidate], external_data_dir) as (ref_path, cand_path):
        return _verify(ref_path, cand_path, providers=providers, samples=2 if samples is None else samples,
                       seed=seed, dims=dict(dims or {}), shapes=dict(shapes or {}), inputs=inputs, rtol=rtol,
                       atol=atol, output_tolerances=dict(output_tolerances or {}), localize=localize,
                       validated=validated, exact_budget_s=exact_budget_s)


def check_options(model: onnx.ModelProto, *, samples: Optional[int] = None, seed: int = 0,
                  dims: Optional[Mapping[str, int]] = None, shapes: Optional[Mapping[str, Tuple[int, ...]]] = None,
                  inputs: Optional[os.PathLike] = None, rtol: Optional[float] = None, atol: Optional[float] = None,
                  output_tolerances: Optional[Mapping[str, ToleranceLike]] = None, **runtime: Any) -> None:
    """The checks :func:`verify` makes of its options, against ``model`` alone and without running it
    (``runtime``: the options only a run uses, accepted and not checked). For a caller with nothing
    to verify (a fold that changed nothing): an option naming an input or output the model lacks, or an
    ``inputs`` file that does not fit it, is still an error, not silently unused."""
    _check_arguments(samples, seed, inputs, rtol, atol, output_tolerances)
    specs = inputs_mod.input_specs(model)
    _check_options(specs, [o.name for o in model.graph.output], dict(dims or {}), dict(shapes or {}),
                   dict(output_tolerances or {}))
    if inputs is not None:
        inputs_mod.load_feeds(inputs, specs)


def _check_arguments(samples: Optional[int], seed: int, inputs: Optional[os.PathLike], rtol: Optional[float],
                     atol: Optional[float], output_tolerances: Optional[Mapping[str, ToleranceLike]]) -> None:
    """The option checks that need no model."""
    if seed < 0:
        raise BnfoldError(f"--seed {seed}: a seed is an integer >= 0")
    if inputs is not None and samples is not None:
        raise BnfoldError("--samples does not apply with --inputs: the file's arrays are the one sample compared")
    if samples is not None and samples < 1:
        raise BnfoldError(f"--samples {samples}: at least 1")
    _check_tolerance("--rtol", rtol)
    _check_tolerance("--atol", atol)
    for name, tol in (output_tolerances or {}).items():
        t = tol if isinstance(tol, Tolerance) else Tolerance(*tol)
        _check_tolerance(f"--output-tol {name}: rtol", t.rtol)
        _check_tolerance(f"--output-tol {name}: atol", t.atol)


def _check_tolerance(what: str, value: Optional[float]) -> None:
    """A tolerance is a finite number >= 0: NaN compares false with every difference, so
    ``rtol=nan`` passed any two models (the CLI refuses it; the library must too)."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise BnfoldError(f"{what} {value}: a tolerance must be a finite number >= 0")


def _verify(ref_path: str, cand_path: str, *, providers: str, samples: int, seed: int, dims: Dict[str, int],
            shapes: Dict[str, Tuple[int, ...]], inputs: Optional[os.PathLike], rtol: Optional[float],
            atol: Optional[float], output_tolerances: Dict[str, ToleranceLike], localize: bool, validated: bool,
            exact_budget_s: float) -> VerifyReport:
    t0 = time.perf_counter()
    if not validated:
        from .modelio import load_model

        for p in (ref_path, cand_path):  # clear messages for unusable files, external data checked
            load_model(p, load_external=False)
    use, skipped = parse_providers(providers)
    notes: List[str] = []
    runners: Dict[Tuple[str, str], runner.Runner] = {}

    def open_(path: str, provider: str, note: bool = True) -> runner.Runner:
        r = runner.open_runner(path, provider)
        if r.reference_fallback:
            # onnx.reference, but with inference BatchNormalization at every opset (its own uses
            # batch statistics below opset 15)
            from . import exact
            from .modelio import load_model

            r.session = exact.OwnDtypeEvaluator(load_model(path))
            if note:
                notes.append(f"{Path(path).name}: ONNX Runtime has no kernel for it; used onnx.reference "
                             "(inference BatchNormalization)")
        return r

    def get(path: str, provider: str) -> runner.Runner:
        key = (path, provider)
        if key not in runners:
            runners[key] = open_(path, provider)
        return runners[key]

    ref_runner = get(ref_path, use[0])
    specs = list(ref_runner.inputs)
    cand_runner = get(cand_path, use[-1])
    _check_interfaces(specs, list(cand_runner.inputs), cand_path)
    out_names = list(ref_runner.output_names)
    _check_options(specs, out_names, dims, shapes, output_tolerances)
    if inputs is not None:
        feeds_list = [inputs_mod.load_feeds(inputs, specs)]
        input_info = {k: {"shape": list(v.shape), "dtype": str(v.dtype), "source": os.fspath(inputs)}
                      for k, v in feeds_list[0].items()}
    else:
        shape_map, shape_notes = inputs_mod.resolve_shapes(specs, dims, shapes)
        notes.extend(shape_notes)
        feeds_list = [inputs_mod.random_feeds(specs, shape_map, seed + k, k) for k in range(samples)]
        input_info = {s.name: {"shape": list(shape_map[s.name]), "dtype": str(s.dtype), "source": "random"}
                      for s in specs}
    _check_not_vacuous(feeds_list, inputs)
    explicit = {k: v if isinstance(v, Tolerance) else Tolerance(*v) for k, v in output_tolerances.items()}
    fixed_all = rtol is not None or atol is not None
    cand_outs = set(cand_runner.output_names)

    # every run once: (path, provider) -> one dict of outputs per sample
    results: Dict[Tuple[str, str], List[Dict[str, np.ndarray]]] = {}
    infer_s = 0.0
    for _, ref_p, cand_p, _ in _comparisons(use):
        for path, prov, names in ((ref_path, ref_p, out_names),
                                  (cand_path, cand_p, [o for o in out_names if o in cand_outs])):
            if (path, prov) not in results:
                t = time.perf_counter()
                results[(path, prov)] = [get(path, prov).run(feeds, names) for feeds in feeds_list]
                infer_s += time.perf_counter() - t
    # every output is in hand: the sessions' memory goes back before the runtime calibration opens
    # its own (a 3 GB model peaked at 9.8 GB with them open)
    for r in runners.values():
        r.close()
    runners.clear()

    # the float64 pass, unless every output has explicit tolerances
    exact_check: Optional[ExactCheck] = None
    exact_out: Dict[str, Tuple[np.ndarray, np.ndarray, float]] = {}
    ref64_more: Dict[str, List[np.ndarray]] = {}
    runtime_check: Optional[RuntimeCheck] = None
    if use and (ref_path, use[0]) in results:  # "max abs 0" between two NaN outputs must not read as a clean pass
        notes.extend(_non_finite_notes(results[(ref_path, use[0])], out_names))
    t_cal = time.perf_counter()
    if not fixed_all and any(o not in explicit for o in out_names):
        first = results[(ref_path, use[0])][0]
        dtypes = {o: np.asarray(v).dtype for o, v in first.items()}
        elements = sum(np.size(v) for o, v in first.items() if _is_float(dtypes[o]))
        exact_check, exact_out, ref64_more = _exact_pass(ref_path, cand_path, out_names, dtypes, feeds_list[0],
                                                         exact_budget_s, elements, feeds_list[1:])
        if not exact_check.ran:
            runtime_check = _runtime_calibration(ref_path, out_names, feeds_list, results, use,
                                                 lambda path, p: open_(path, p, note=False),
                                                 f"float64 pass skipped: {exact_check.why}")
            notes.append(f"float64 pass skipped ({exact_check.why}); runtime-calibrated verdict: the reference "
                         f"rerun with its weights moved {RUNTIME_ULPS:g} ulp at random ({runtime_check.draws} draws)")
    calibration_s = time.perf_counter() - t_cal
    calibrated = exact_check is not None and exact_check.ran
    noises: Dict[Tuple[str, str], float] = {}

    def noise(provider: str, o: str) -> float:
        """The reference's own deviation from float64 on this provider, the largest over the samples
        (relative to max|output| over them all, the scale the comparison applies it to): one sample's
        rounding noise says little about another's (levit_128s: 2.6e-6 on one, 1.05e-5 on the next).
        Measured once per provider and output, however many comparisons use it."""
        if (provider, o) not in noises:
            ref64s = [exact_out[o][0]] + ref64_more.get(o, [])
            scale = max(_scale_of([r]) for r in ref64s) or 1.0
            got = results[(ref_path, provider)]
            noises[(provider, o)] = max(_rel_dev(got[i][o], r, scale) for i, r in enumerate(ref64s))
        return noises[(provider, o)]

    if calibrated and exact_check is not None:
        for eo in exact_check.outputs:
            if eo.name in exact_out and runner.CPU in use and not eo.problem:
                ref64, _, scale = exact_out[eo.name]
                eo.reference_noise = noise(runner.CPU, eo.name)
                cand_cpu = results.get((cand_path, runner.CPU), [{}])[0].get(eo.name)
                if cand_cpu is not None and np.shape(cand_cpu) == np.shape(ref64):
                    eo.candidate_noise = _rel_dev(cand_cpu, ref64, scale)
                    eo.direction = ("closer" if eo.candidate_noise < eo.reference_noise else
                                    "further" if eo.candidate_noise > eo.reference_noise else "same")

    comparisons: List[Comparison] = []
    first_failure = None
    for name, ref_p, cand_p, factor in _comparisons(use):
        refs = results[(ref_path, ref_p)]
        cands = results[(cand_path, cand_p)]
        outs = []
        for o in out_names:
            if o not in cand_outs:
                outs.append(OutputResult(o, False, problem="missing from the candidate's outputs",
                                         cosine_similarity=None, used=float("inf")))
                continue
            r_list, c_list = [s[o] for s in refs], [s[o] for s in cands]
            dtype = np.asarray(r_list[0]).dtype
            is_float = _is_float(dtype)
            if o in explicit or fixed_all:
                tol = explicit.get(o, Tolerance(rtol, atol))
                d_rtol, d_atol = DEFAULT_TOLERANCES.get(dtype.name, (0.0, 0.0))
                res = _compare(o, r_list, c_list, tol.rtol if tol.rtol is not None else d_rtol * factor,
                               None if tol.atol is not None else d_atol * factor, tol.atol, "fixed")
            elif calibrated and exact_check is not None and o in exact_out and is_float:
                allowance = next(e.allowance for e in exact_check.outputs if e.name == o)
                floor = max(noise(ref_p, o), noise(cand_p, o))
                rel = (RUNTIME_NOISE_MULTIPLE * floor + ALLOWANCE_MULTIPLE * allowance + FLOAT64_FLOOR
                       + DTYPE_FLOOR_ULPS * _eps(dtype))
                res = _compare(o, r_list, c_list, 0.0, rel, None, "calibrated")
                res.floor = floor
            elif runtime_check is not None and o in runtime_check.floors.get(runner.PROVIDER_NAMES[ref_p], {}):
                floor = _runtime_floor(runtime_check, o, ref_p, cand_p)
                if not np.isfinite(floor):  # the perturbed reference changed finiteness or shape: no floor
                    d_rtol, d_atol = DEFAULT_TOLERANCES.get(dtype.name, (0.0, 0.0))
                    res = _compare(o, r_list, c_list, d_rtol * factor, d_atol * factor, None, "fixed")
                    msg = (f"output '{o}': moving the reference's weights by an ulp changed which values are "
                           "finite (or the shape); fixed tolerances by dtype for it")
                    if msg not in notes:
                        notes.append(msg)
                elif is_float:
                    rel = runtime_check.multiple * floor + RUNTIME_FLOOR_ULPS * _eps(dtype)
                    res = _compare(o, r_list, c_list, 0.0, rel, None, "runtime-calibrated")
                else:  # a fraction of differing elements, as the perturbed reference shows it
                    res = _compare(o, r_list, c_list, 0.0, 0.0, None, "runtime-calibrated")
                    allowed = runtime_check.multiple * floor
                    res.limit = allowed
                    res.used = res.fail_fraction / allowed if allowed else (0.0 if res.equivalent else float("inf"))
                    res.equivalent = res.problem is None and res.fail_fraction <= allowed
                if res.method != "fixed":
                    res.floor = floor
            else:  # a calibrated verdict whose float64 pass could not judge this output (e.g. non-float)
                res = _compare(o, r_list, c_list, 0.0, 0.0, None, "calibrated" if calibrated else "fixed")
            outs.append(res)
        if first_failure is None and not all(r.equivalent for r in outs):
            bad = next(r for r in outs if not r.equivalent)
            first_failure = (ref_p, cand_p, bad)
        comp = Comparison(name, runner.PROVIDER_NAMES[ref_p], runner.PROVIDER_NAMES[cand_p],
                          all(r.equivalent for r in outs), outs)
        comparisons.append(comp)
    if sum(r.compared for c in comparisons for r in c.outputs) == 0 and all(
            r.problem is None for c in comparisons for r in c.outputs):
        raise BnfoldError("0 output elements compared: the verdict would be vacuous", cand_path)
    _place_cuda(comparisons, use, providers, ref_path, cand_path, feeds_list[0])
    equivalent = all(c.equivalent for c in comparisons) and (exact_check is None or exact_check.equivalent
                                                              is not False)
    method = "fixed" if fixed_all or (explicit and all(o in explicit for o in out_names)) else (
        "calibrated" if calibrated else "runtime-calibrated")
    localized = None
    if localize and not equivalent:
        if calibrated and exact_check is not None and exact_check.equivalent is False:
            localized = localize_exact(ref_path, cand_path, feeds_list[0])
        elif first_failure is not None:
            ref_p, cand_p, bad = first_failure
            scale_rel = bad.atol / max(_scale_of([s[bad.name] for s in results[(ref_path, ref_p)]]), 1e-300)
            localized = localize_divergence(ref_path, cand_path, ref_p, cand_p, feeds_list[0], bad.rtol, scale_rel)
    timing = {"total_s": time.perf_counter() - t0, "inference_s": infer_s,
              "float64_s": exact_check.seconds if exact_check else 0.0,
              "runtime_calibration_s": runtime_check.seconds if runtime_check else 0.0,
              "calibration_s": calibration_s}
    return VerifyReport(ref_path, cand_path, equivalent, len(feeds_list), seed, input_info, notes, comparisons,
                        skipped, localized, timing, method, exact_check, runtime_check)


def _is_float(dtype: np.dtype) -> bool:
    """A real floating-point dtype, bfloat16 included (numpy calls it kind 'V')."""
    return dtype.kind == "f" or dtype.name == "bfloat16"


def _eps(dtype: np.dtype) -> float:
    """The spacing of 1.0 in ``dtype`` (bfloat16: 2**-7)."""
    return 2.0 ** -7 if np.dtype(dtype).name == "bfloat16" else float(np.finfo(dtype).eps)


def _runtime_floor(check: RuntimeCheck, o: str, ref_p: str, cand_p: str) -> float:
    """The measured floor for output ``o`` compared across these providers: the larger perturbation move
    of the two, and the reference's own difference between them."""
    floors = [check.floors[runner.PROVIDER_NAMES[p]][o] for p in {ref_p, cand_p}]
    if ref_p != cand_p:
        floors.append(check.cross.get(o, 0.0))
    return max(floors)


def _runtime_calibration(ref_path: str, out_names: Sequence[str], feeds_list: Sequence[Mapping[str, np.ndarray]],
                         results: Dict[Tuple[str, str], List[Dict[str, np.ndarray]]], use: Sequence[str],
                         get, why: str) -> RuntimeCheck:
    """Rerun the reference on each provider with its rewritable weights moved RUNTIME_ULPS ulp at random.

    Each draw is a perturbed copy of the reference written to a private temporary folder and run on
    every sample; the floor of an output is its largest move over draws and samples, relative to
    max|reference output| on that provider (non-float outputs: the largest fraction of elements changed).
    """
    import onnx

    from . import exact
    from .modelio import load_model, read_tensor, stage_model

    t = time.perf_counter()
    check = RuntimeCheck(why)
    model = load_model(ref_path, load_external=False)  # external weights stay on disk, read one at a time
    base_dir = os.path.dirname(os.path.abspath(ref_path))
    by_name = {tp.name: tp for tp in model.graph.initializer}
    targets = exact.float_initializer_names(model)
    fractions = {n: _fraction(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(by_name[n].data_type))) for n in targets}
    check.weights = len(targets)
    check.multiple = (RUNTIME_MULTIPLE_FULL if targets and all(f == RUNTIME_FRACTION for f in fractions.values())
                      else RUNTIME_MULTIPLE)
    refs = {p: results[(ref_path, p)] for p in use}
    scales = {p: {o: _scale_of([s[o] for s in refs[p]]) or 1.0 for o in out_names} for p in use}
    floors: Dict[str, Dict[str, float]] = {runner.PROVIDER_NAMES[p]: {o: 0.0 for o in out_names} for p in use}
    elements = sum(np.size(s[o]) for s in refs[use[0]] for o in out_names if _is_float(np.asarray(s[o]).dtype))
    values = sum(int(np.prod(by_name[n].dims)) for n in targets)
    small = elements < RUNTIME_SMALL_OUTPUT and values <= RUNTIME_SMALL_MODEL
    check.draws = (RUNTIME_DRAWS_SMALL if small else RUNTIME_DRAWS) if targets else 0
    tmp = tempfile.mkdtemp(prefix="bnfold-runtime-calibration-")
    try:
        for d in range(check.draws):
            rng = np.random.default_rng(RUNTIME_SEED + d)

            def moved(name: str, rng: np.random.Generator = rng) -> np.ndarray:
                return exact.moved_ulps(read_tensor(by_name[name], base_dir), rng, RUNTIME_ULPS, fractions[name])

            # the perturbed copy is written a tensor at a time (the writer asks for the values in
            # initializer order, the order the draws were always taken in), beside external data if
            # the reference has some or passes protobuf's 2 GB: memory holds one weight, not the model
            draw = onnx.ModelProto()
            draw.CopyFrom(model)
            path = os.path.join(tmp, f"perturbed{d}.onnx")
            stage_model(draw, path, replacements={n: functools.partial(moved, n) for n in targets},
                        base_dir=base_dir).commit()
            del draw
            for p in use:
                r = get(path, p)
                try:
                    got = [r.run(dict(feeds), list(out_names)) for feeds in feeds_list]
                finally:
                    r.close()
                prov = runner.PROVIDER_NAMES[p]
                for o in out_names:
                    for k, sample in enumerate(got):
                        move = _move(sample[o], refs[p][k][o], scales[p][o])
                        floors[prov][o] = max(floors[prov][o], move)
            for f in os.listdir(tmp):  # this draw's files: the next is written beside nothing
                os.remove(os.path.join(tmp, f))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    check.floors = floors
    if runner.CPU in use and runner.CUDA in use:
        for o in out_names:
            check.cross[o] = max(_move(c[o], g[o], scales[runner.CPU][o])
                                 for c, g in zip(refs[runner.CPU], refs[runner.CUDA]))
    check.seconds = time.perf_counter() - t
    return check


def _fraction(dtype: np.dtype) -> float:
    """Share of a weight tensor moved one ulp in a runtime draw. float32/float64: every value, which also
    re-rounds the runtime's own arithmetic at its full size; float16/bfloat16 (which ONNX Runtime's CPU
    provider computes in float32, so weight rounding dominates): a random 1/12, whose variance equals that
    of rounding to nearest, so the floor is the size of a correct fold's rounding, not 3.5 x it."""
    return RUNTIME_FRACTION if np.dtype(dtype).itemsize >= 4 else RUNTIME_FRACTION_HALF


def _move(got: np.ndarray, ref: np.ndarray, scale: float) -> float:
    """How far ``got`` is from ``ref``: relative to ``scale`` for floats, the fraction of elements that
    differ otherwise (a shape change counts as everything)."""
    g, r = np.asarray(got), np.asarray(ref)
    if g.shape != r.shape:
        return 1.0 if r.dtype.kind not in "fc" else float("inf")
    if r.dtype.kind not in "fc" and r.dtype.name != "bfloat16":
        return float(np.mean(g != r)) if r.size else 0.0
    return _rel_dev(g, r, scale)


def _scale_of(arrays: Sequence[np.ndarray]) -> float:
    s = 0.0
    for a in arrays:
        a = np.asarray(a, np.float64).reshape(-1)
        fin = a[np.isfinite(a)]
        if fin.size:
            s = max(s, float(np.abs(fin).max()))
    return s


def _rel_dev(got: np.ndarray, ref64: np.ndarray, scale: float) -> float:
    """max|got - ref64| / scale over elements finite on both sides; inf where finiteness differs."""
    a = np.asarray(got, np.float64).reshape(-1)
    b = np.asarray(ref64, np.float64).reshape(-1)
    if a.shape != b.shape:
        return float("inf")
    fa, fb = np.isfinite(a), np.isfinite(b)
    with np.errstate(invalid="ignore"):
        if np.any(fa != fb) or np.any((~fa) & (a != b) & ~(np.isnan(a) & np.isnan(b))):
            return float("inf")
    both = fa & fb
    if not both.any():
        return 0.0
    return float(np.abs(a[both] - b[both]).max()) / (scale if scale > 0 else 1.0)


def _exact_pass(ref_path: str, cand_path: str, out_names: Sequence[str], dtypes: Mapping[str, np.dtype],
                feeds: Mapping[str, np.ndarray], budget_s: float, out_elements: int = 0,
                more_feeds: Sequence[Mapping[str, np.ndarray]] = ()
                ) -> Tuple[ExactCheck, Dict[str, Tuple[np.ndarray, np.ndarray, float]], Dict[str, List[np.ndarray]]]:
    """Reference and candidate in float64, and the half-ulp allowance of both sides, on one sample;
    the reference alone in float64 on ``more_feeds`` (the other samples: the runtime's noise on each).

    ``dtypes``: each output's dtype in the models themselves (its ulp sets the output floor);
    ``out_elements``: float output elements of that sample."""
    from . import exact
    from .modelio import load_model, uses_external_data

    if budget_s <= 0:
        return ExactCheck(False, None, why="turned off"), {}, {}
    shapes = {k: tuple(np.shape(v)) for k, v in feeds.items()}
    # the estimate needs shapes only: external weights are read if the pass runs
    # (a 3 GB model: 21 s of reading and copying for an estimate that ruled the pass out)
    ref_m, cand_m = load_model(ref_path, load_external=False), load_model(cand_path, load_external=False)
    est = max(exact.estimate_seconds(ref_m, shapes).seconds, exact.estimate_seconds(cand_m, shapes).seconds)
    # a costly model with large outputs (whose maximum over many elements is a stable floor) takes fewer draws
    draws = PERTURBATIONS_LARGE if est > COSTLY_EVALUATION_S and out_elements >= RUNTIME_SMALL_OUTPUT else PERTURBATIONS
    runs = 2 * (1 + draws) + len(more_feeds)
    estimated = est * runs
    check = ExactCheck(False, None, estimated_s=estimated, perturbations=draws)
    if estimated > budget_s:
        check.why = f"estimated {estimated:.0f} s for {runs} float64 runs, over the {budget_s:g} s budget"
        return check, {}, {}
    t = time.perf_counter()
    if uses_external_data(ref_m):
        ref_m = load_model(ref_path)
    if uses_external_data(cand_m):
        cand_m = load_model(cand_path)
    cand_names = [o for o in out_names if o in {x.name for x in cand_m.graph.output}]
    try:
        ref_ev, cand_ev = exact.evaluator(ref_m), exact.evaluator(cand_m)
        ref64 = dict(zip(out_names, ref_ev.run(out_names, feeds)))
        cand64 = dict(zip(cand_names, cand_ev.run(cand_names, feeds)))
        rng = np.random.default_rng(12345)
        ref_targets, cand_targets = exact.float_initializers(ref_m), exact.float_initializers(cand_m)
        ref_moves = [dict(zip(out_names, ref_ev.run_perturbed(ref_targets, rng, out_names, feeds)))
                     for _ in range(draws)]
        cand_moves = [dict(zip(cand_names, cand_ev.run_perturbed(cand_targets, rng, cand_names, feeds)))
                      for _ in range(draws)]
        more = [dict(zip(out_names, ref_ev.run(out_names, f))) for f in more_feeds]
    except (NotImplementedError, RuntimeError, TypeError, ValueError, KeyError, IndexError) as e:
        # onnx.reference lacks this op or cannot evaluate the model: reported, runtime-calibrated verdict
        check.why = f"the float64 evaluator cannot run the model: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return check, {}, {}
    del ref_m, cand_m
    check.ran = True
    check.seconds = time.perf_counter() - t
    kept: Dict[str, Tuple[np.ndarray, np.ndarray, float]] = {}
    for o in out_names:
        r64 = np.asarray(ref64[o])
        if o not in cand64:
            check.outputs.append(ExactOutput(o, False, 0.0, 0.0, float("inf"), 0.0, float("inf"),
                                             problem="missing from the candidate's outputs"))
            continue
        c64 = np.asarray(cand64[o])
        if r64.shape != c64.shape:
            check.outputs.append(ExactOutput(o, False, _scale_of([r64]) or 1.0, 0.0, float("inf"), 0.0, float("inf"),
                                             problem=f"reference shape {list(r64.shape)}, candidate {list(c64.shape)}"))
            continue
        if r64.dtype.kind not in "fc":  # a fraction of elements may differ as much as perturbations make them
            diff = _move(c64, r64, 1.0)
            ra = _finite_max(_move(p[o], r64, 1.0) for p in ref_moves)
            ca = _finite_max(_move(p[o], c64, 1.0) for p in cand_moves)
            allow = max(ra, ca)
            limit = ALLOWANCE_MULTIPLE * allow
            check.outputs.append(ExactOutput(o, diff <= limit, 1.0, allow, diff, limit,
                                             diff / limit if limit else (0.0 if diff == 0 else float("inf")), ra, ca))
            continue
        scale = _scale_of([r64]) or 1.0
        ra = _finite_max(_rel_dev(p[o], r64, scale) for p in ref_moves)
        ca = _finite_max(_rel_dev(p[o], c64, scale) for p in cand_moves)
        allow = max(ra, ca)
        dt = np.dtype(dtypes.get(o, np.float64))
        out_floor = max(FLOAT64_FLOOR, OUTPUT_FLOOR_ULPS * _eps(dt) if _is_float(dt) else 0.0)
        dev = _rel_dev(c64, r64, scale)
        limit = ALLOWANCE_MULTIPLE * allow + out_floor
        check.outputs.append(ExactOutput(o, dev <= limit, scale, allow, dev, limit, dev / limit, ra, ca, out_floor))
        kept[o] = (r64, c64, scale)
    check.equivalent = all(e.equivalent for e in check.outputs)
    ref64_more = {o: [np.asarray(m[o]) for m in more] for o in kept}
    return check, kept, ref64_more


def _finite_max(moves) -> float:
    """The largest finite move (a draw that changed which values are finite sets no allowance)."""
    return max((m for m in moves if np.isfinite(m)), default=0.0)


def _place_cuda(comparisons: List[Comparison], use: Sequence[str], spec: str, ref_path: str, cand_path: str,
                feeds: Mapping[str, np.ndarray]) -> None:
    """For comparisons that run on CUDA: how many nodes ONNX Runtime placed on each provider.

    With ``--providers`` naming cuda explicitly, compute nodes (those reading float weights) left on
    the CPU make the comparison not what it says: a clear error.
    """
    if runner.CUDA not in use:
        return
    placed = {}
    for label, path in (("reference", ref_path), ("candidate", cand_path)):
        placed[label] = runner.node_placement(path, runner.CUDA, dict(feeds))
    explicit = "cuda" in [p.strip().lower() for p in spec.split(",")]
    for label, nodes in placed.items():
        names, ops = _weight_readers(ref_path if label == "reference" else cand_path)
        fell_back = sorted(n for n, (op, prov) in nodes.items()
                           if prov != runner.PROVIDER_NAMES[runner.CUDA] and (n in names or op in ops))
        if fell_back and explicit:
            path = ref_path if label == "reference" else cand_path
            raise BnfoldError(f"--providers {spec}: ONNX Runtime placed {len(fell_back)} compute node(s) of the "
                              f"{label} on the CPU, not CUDA (e.g. {', '.join(fell_back[:3])}): "
                              "the CUDA comparison would not test CUDA", path)
    for c in comparisons:
        if c.candidate_provider != runner.PROVIDER_NAMES[runner.CUDA]:
            continue
        info = {}
        for label, nodes in placed.items():
            counts: Dict[str, int] = {}
            for _op, prov in nodes.values():
                counts[prov] = counts.get(prov, 0) + 1
            info[label] = {"nodes": len(nodes), "by_provider": counts}
        c.placement = info


def _weight_readers(path: str) -> Tuple[Set[str], Set[str]]:
    """The compute nodes of a model: those reading a float weight (an initializer with at least one
    axis). Returns their names, and the op types of the unnamed ones (ORT names those itself).
    Which ops they are follows from the model, not from a list of op names."""
    from .exact import FLOAT_TYPES
    from .modelio import load_model

    model = load_model(path, load_external=False)
    weights = {t.name for t in model.graph.initializer if t.dims and t.data_type in FLOAT_TYPES}
    readers = [n for n in model.graph.node if any(i in weights for i in n.input)]
    return {n.name for n in readers if n.name}, {n.op_type for n in readers if not n.name}


# -- localization --------------------------------------------------------------------------------

def _producers(model) -> Dict[str, str]:
    return {o: f"{n.op_type} '{n.name}'" for n in model.graph.node for o in n.output if o}


def _shared_order(ref, cand) -> List[str]:
    """Intermediate tensors (not graph outputs) produced under the same name in both, in the reference's order."""
    cand_names = {o for n in cand.graph.node for o in n.output if o}
    outputs = {o.name for o in ref.graph.output}
    return [o for n in ref.graph.node for o in n.output if o and o in cand_names and o not in outputs]


def localize_exact(ref_path: str, cand_path: str, feeds: Mapping[str, np.ndarray]) -> dict:
    """Name the first shared intermediate tensor whose float64 value moved beyond its own half-ulp allowance.

    Each intermediate gets the allowance measured like the outputs' (each side's rewritable weights
    perturbed within half an ulp), so a tensor is blamed only for moving more than rounding could move it.
    """
    from . import exact
    from .modelio import load_model

    ref, cand = load_model(ref_path), load_model(cand_path)
    order = _shared_order(ref, cand)
    ref_ev, cand_ev = exact.evaluator(ref), exact.evaluator(cand)
    refs = ref_ev.run(order, feeds) if order else []
    cands = cand_ev.run(order, feeds) if order else []
    rng = np.random.default_rng(12345)
    moves = []
    if order:
        ref_targets, cand_targets = exact.float_initializers(ref), exact.float_initializers(cand)
        moves = ([(False, ref_ev.run_perturbed(ref_targets, rng, order, feeds)) for _ in range(PERTURBATIONS)]
                 + [(True, cand_ev.run_perturbed(cand_targets, rng, order, feeds)) for _ in range(PERTURBATIONS)])
    rp, cp = _producers(ref), _producers(cand)
    for k, name in enumerate(order):
        r, c = np.asarray(refs[k]), np.asarray(cands[k])
        if r.dtype.kind != "f":
            if r.shape != c.shape or np.any(r != c):
                return _blame(name, rp, cp, k + 1, len(order), {"deviation": None, "limit": 0.0})
            continue
        scale = _scale_of([r]) or 1.0
        dev = _rel_dev(c, r, scale) if r.shape == c.shape else float("inf")
        allow = _finite_max(_rel_dev(p[k], c if side else r, scale) for side, p in moves
                            if np.shape(p[k]) == (c if side else r).shape)
        limit = ALLOWANCE_MULTIPLE * allow + FLOAT64_FLOOR
        if dev > limit:
            return _blame(name, rp, cp, k + 1, len(order), {"deviation": dev, "limit": limit, "allowance": allow})
    return {"first_divergent": None, "producer": None, "candidate_producer": None, "checked": len(order),
            "total": len(order), "method": "float64", "result": None}


def _blame(name: str, rp: Dict[str, str], cp: Dict[str, str], checked: int, total: int, result: dict,
           method: str = "float64") -> dict:
    return {"first_divergent": name, "producer": rp.get(name), "candidate_producer": cp.get(name),
            "checked": checked, "total": total, "method": method, "result": result}


def localize_divergence(ref_path: str, cand_path: str, ref_provider: str, cand_provider: str,
                        feeds: Dict[str, np.ndarray], rtol: float, atol_rel: float) -> dict:
    """Name the first intermediate tensor (in the reference's order) that differs at runtime.

    Only tensors present under the same name in both main graphs are compared, each with
    ``atol = atol_rel x`` its own max|reference| (the failing output's relative tolerance).
    They are exposed as extra outputs in batches of :data:`LOCALIZE_BATCH` on temporary
    copies written beside each model (so external data still resolves).
    """
    from .modelio import load_model

    ref = load_model(ref_path, load_external=False)
    cand = load_model(cand_path, load_external=False)
    order = _shared_order(ref, cand)
    rp, cp = _producers(ref), _producers(cand)
    for start in range(0, len(order), LOCALIZE_BATCH):
        batch = order[start:start + LOCALIZE_BATCH]
        got = [_run_with_outputs(model, path, provider, batch, feeds)
               for model, path, provider in ((ref, ref_path, ref_provider), (cand, cand_path, cand_provider))]
        for name in batch:
            res = _compare(name, [got[0][name]], [got[1][name]], rtol, atol_rel, None, "runtime")
            if not res.equivalent:
                return _blame(name, rp, cp, start + batch.index(name) + 1, len(order), asdict(res), "runtime")
    return {"first_divergent": None, "producer": None, "candidate_producer": None, "checked": len(order),
            "total": len(order), "method": "runtime", "result": None}


def _run_with_outputs(model, path: str, provider: str, names: List[str], feeds) -> Dict[str, np.ndarray]:
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    for n in names:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    folder = Path(path).parent
    fd, tmp = tempfile.mkstemp(dir=folder if os.access(folder, os.W_OK) else None, prefix=".bnfold-localize-",
                               suffix=".onnx")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(probe.SerializeToString())
        r = runner.open_runner(tmp, provider)
        if r.reference_fallback:
            from . import exact

            r.session = exact.OwnDtypeEvaluator(probe)
        return r.run(feeds, names)
    finally:
        os.unlink(tmp)
