"""Numerical equivalence of two models through ONNX Runtime.

Never imports the fold code: the checker stays independent of what it checks.

Both models run on the same inputs with graph optimisations disabled. Each output
is compared element-wise; an element fails only when its absolute difference
exceeds *both* ``atol`` and ``rtol * |reference|``, NaN must meet NaN, infinities
must match, and a shape or dtype difference fails the output.

Default tolerances depend on the output dtype (:data:`DEFAULT_TOLERANCES`) and
scale with the output's magnitude: the default ``atol`` is ``atol_scale *
max|reference|`` of that output, so a model whose outputs are around 1e4 is judged
as strictly as one around 1. An explicit ``atol`` is absolute.

Comparisons: ``cpu`` (reference on CPU vs candidate on CPU), and where CUDA works,
``cuda`` (both on CUDA, TF32 off) and ``cpu-vs-cuda`` (reference on CPU vs candidate
on CUDA, tolerances times :data:`CROSS_PROVIDER_FACTOR`).
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import inputs as inputs_mod
from . import runner
from .errors import BnfoldError

# dtype -> (rtol, atol as a fraction of max|reference|)
DEFAULT_TOLERANCES: Dict[str, Tuple[float, float]] = {
    "float64": (1e-7, 1e-9),
    "float32": (1e-3, 1e-4),
    "float16": (2e-2, 5e-3),
    "bfloat16": (6e-2, 2e-2),
}
CROSS_PROVIDER_FACTOR = 10.0
LOCALIZE_BATCH = 64


@dataclass
class Tolerance:
    rtol: Optional[float] = None
    atol: Optional[float] = None  # absolute when given

    def resolve(self, dtype: np.dtype, scale: float, factor: float = 1.0) -> Tuple[float, float]:
        d_rtol, d_atol = DEFAULT_TOLERANCES.get(np.dtype(dtype).name, (0.0, 0.0))
        rtol = self.rtol if self.rtol is not None else d_rtol * factor
        atol = self.atol if self.atol is not None else d_atol * factor * scale
        return rtol, atol


@dataclass
class OutputResult:
    """How one output compared, over all samples."""

    name: str
    equivalent: bool
    dtype: str = ""
    shape: List[int] = field(default_factory=list)
    rtol: float = 0.0
    atol: float = 0.0
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    mean_abs_error: float = 0.0
    cosine_similarity: float = 1.0
    fail_fraction: float = 0.0
    worst: Optional[dict] = None
    problem: Optional[str] = None


@dataclass
class Comparison:
    name: str
    reference_provider: str
    candidate_provider: str
    equivalent: bool
    outputs: List[OutputResult]


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

    def to_dict(self) -> dict:
        return asdict(self)

    def to_junit(self) -> str:
        """JUnit XML: one test case per (comparison, output) (see :mod:`bnfold.reports`)."""
        from .reports import junit_for_verify

        return junit_for_verify(self.to_dict(), candidate=self.candidate)


class _Accumulator:
    """Running per-output statistics over samples."""

    def __init__(self, name: str) -> None:
        self.r = OutputResult(name, True)
        self.sum_abs = 0.0
        self.count = 0
        self.failing = 0
        self.dot = self.nr = self.nc = 0.0
        self.worst_score = -1.0

    def add(self, ref: np.ndarray, cand: np.ndarray, tol: Tolerance, factor: float, sample: int) -> None:
        r = self.r
        r.dtype, r.shape = str(ref.dtype), list(ref.shape)
        if ref.shape != cand.shape or ref.dtype != cand.dtype:
            r.equivalent = False
            r.problem = (f"reference is {ref.dtype}{list(ref.shape)}, candidate is {cand.dtype}{list(cand.shape)}")
            return
        if ref.dtype.kind not in "fc" and ref.dtype.name != "bfloat16":
            bad = ref != cand
            self.failing += int(bad.sum())
            self.count += ref.size
            if bad.any():
                r.equivalent = False
                idx = np.unravel_index(int(np.argmax(bad)), ref.shape)
                r.worst = {"sample": sample, "index": [int(i) for i in idx],
                           "reference": ref[idx].item(), "candidate": cand[idx].item()}
            r.fail_fraction = self.failing / max(self.count, 1)
            return
        a = ref.astype(np.float64)
        b = cand.astype(np.float64)
        finite = np.isfinite(a)
        scale = float(np.abs(a[finite]).max()) if finite.any() else 0.0
        rtol, atol = tol.resolve(ref.dtype, scale if scale > 0 else 1.0, factor)
        r.rtol, r.atol = rtol, max(r.atol, atol)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(a - b)
            diff[a == b] = 0.0  # equal infinities
            both_nan = np.isnan(a) & np.isnan(b)
            diff[both_nan] = 0.0
            diff[np.isnan(diff)] = np.inf  # NaN on one side only, or inf - inf of opposite signs
            bound = np.maximum(atol, rtol * np.abs(a))
            fail = (diff > atol) & (diff > rtol * np.abs(a))
            # NaN must meet NaN and an infinity the same infinity, whatever the tolerances
            fail |= ~(np.isfinite(a) & np.isfinite(b)) & (diff > 0)
            rel = diff / np.maximum(np.abs(a), np.finfo(np.float64).tiny)
            rel[diff == 0] = 0.0
        n_fail = int(fail.sum())
        self.failing += n_fail
        self.count += a.size
        if n_fail:
            r.equivalent = False
        if a.size:
            r.max_abs_error = max(r.max_abs_error, float(diff.max()))
            r.max_rel_error = max(r.max_rel_error, float(rel.max()))
            self.sum_abs += float(diff[np.isfinite(diff)].sum())
            ok = np.isfinite(a) & np.isfinite(b)
            self.dot += float(np.dot(a[ok], b[ok]))
            self.nr += float(np.dot(a[ok], a[ok]))
            self.nc += float(np.dot(b[ok], b[ok]))
            with np.errstate(invalid="ignore", divide="ignore"):
                score = diff / np.where(bound > 0, bound, np.finfo(np.float64).tiny)
            k = int(np.argmax(score))
            if float(score.flat[k]) > self.worst_score:
                self.worst_score = float(score.flat[k])
                idx = np.unravel_index(k, a.shape)
                r.worst = {"sample": sample, "index": [int(i) for i in idx],
                           "reference": float(a[idx]), "candidate": float(b[idx])}
        r.mean_abs_error = self.sum_abs / max(self.count, 1)
        r.fail_fraction = self.failing / max(self.count, 1)
        denom = np.sqrt(self.nr) * np.sqrt(self.nc)
        r.cosine_similarity = float(self.dot / denom) if denom > 0 else (1.0 if self.nr == self.nc else 0.0)


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
    """(name, reference provider, candidate provider, tolerance factor)."""
    out = []
    if runner.CPU in providers:
        out.append(("cpu", runner.CPU, runner.CPU, 1.0))
    if runner.CUDA in providers:
        out.append(("cuda", runner.CUDA, runner.CUDA, 1.0))
        out.append(("cpu-vs-cuda", runner.CPU, runner.CUDA, CROSS_PROVIDER_FACTOR))
    return out


def verify(reference: os.PathLike, candidate: os.PathLike, *, providers: str = "auto", samples: int = 2,
           seed: int = 0, dims: Optional[Mapping[str, int]] = None,
           shapes: Optional[Mapping[str, Tuple[int, ...]]] = None, inputs: Optional[os.PathLike] = None,
           rtol: Optional[float] = None, atol: Optional[float] = None,
           output_tolerances: Optional[Mapping[str, object]] = None, localize: bool = False,
           validated: bool = False) -> VerifyReport:
    """Run ``reference`` and ``candidate`` on the same inputs and compare every output.

    Models are passed to ONNX Runtime by path. Raises :class:`BnfoldError` when a
    model cannot be loaded or run, or the providers asked for are not usable.
    ``output_tolerances`` maps output names to a :class:`Tolerance` or an ``(rtol, atol)``
    pair (None for the default). ``validated`` skips bnfold's own checks of the files (format, versions, external
    data locations) for callers that just made or checked them.
    """
    t0 = time.perf_counter()
    ref_path, cand_path = os.fspath(reference), os.fspath(candidate)
    if not validated:
        from .modelio import load_model

        for p in (ref_path, cand_path):  # clear messages for unusable files, external data checked
            load_model(p, load_external=False)
    use, skipped = parse_providers(providers)
    notes: List[str] = []
    runners: Dict[Tuple[str, str], runner.Runner] = {}

    def get(path: str, provider: str) -> runner.Runner:
        key = (path, provider)
        if key not in runners:
            runners[key] = runner.open_runner(path, provider)
            if runners[key].reference_fallback:
                notes.append(f"{Path(path).name}: ONNX Runtime has no kernel for it; used onnx.reference")
        return runners[key]

    ref_runner = get(ref_path, use[0])
    specs = list(ref_runner.inputs)
    cand_specs = {s.name for s in get(cand_path, use[-1]).inputs}
    missing = [s.name for s in specs if s.name not in cand_specs]
    if missing:
        raise BnfoldError(f"lacks the reference's input(s) {', '.join(missing)}", cand_path)
    if inputs is not None:
        feeds_list = [inputs_mod.load_feeds(inputs, specs)]
        input_info = {k: {"shape": list(v.shape), "dtype": str(v.dtype), "source": os.fspath(inputs)}
                      for k, v in feeds_list[0].items()}
    else:
        shape_map, shape_notes = inputs_mod.resolve_shapes(specs, dims or {}, shapes or {})
        notes.extend(shape_notes)
        feeds_list = [inputs_mod.random_feeds(specs, shape_map, seed + k, k) for k in range(max(samples, 1))]
        input_info = {s.name: {"shape": list(shape_map[s.name]), "dtype": str(s.dtype), "source": "random"}
                      for s in specs}
    base = Tolerance(rtol, atol)
    per_output = {k: v if isinstance(v, Tolerance) else Tolerance(*v) for k, v in (output_tolerances or {}).items()}
    out_names = list(ref_runner.output_names)
    cand_outs = set(get(cand_path, use[-1]).output_names)

    comparisons: List[Comparison] = []
    infer_s = 0.0
    first_failure = None
    for name, ref_p, cand_p, factor in _comparisons(use):
        accs = {o: _Accumulator(o) for o in out_names}
        for k, feeds in enumerate(feeds_list):
            t = time.perf_counter()
            ref_out = get(ref_path, ref_p).run(feeds, out_names)
            cand_out = get(cand_path, cand_p).run(feeds, [o for o in out_names if o in cand_outs])
            infer_s += time.perf_counter() - t
            for o in out_names:
                if o not in cand_out:
                    accs[o].r.equivalent = False
                    accs[o].r.problem = "missing from the candidate's outputs"
                    continue
                accs[o].add(ref_out[o], cand_out[o], per_output.get(o, base), factor, k)
            if first_failure is None and not all(a.r.equivalent for a in accs.values()):
                first_failure = (ref_p, cand_p, factor, feeds)
        outs = [accs[o].r for o in out_names]
        comparisons.append(Comparison(name, runner.PROVIDER_NAMES[ref_p], runner.PROVIDER_NAMES[cand_p],
                                      all(o.equivalent for o in outs), outs))
    equivalent = all(c.equivalent for c in comparisons)
    localized = None
    if localize and first_failure is not None:
        localized = localize_divergence(ref_path, cand_path, *first_failure, base)
    timing = {"total_s": time.perf_counter() - t0, "inference_s": infer_s}
    return VerifyReport(ref_path, cand_path, equivalent, len(feeds_list), seed, input_info, notes, comparisons,
                        skipped, localized, timing)


def localize_divergence(ref_path: str, cand_path: str, ref_provider: str, cand_provider: str, factor: float,
                        feeds: Dict[str, np.ndarray], tol: Tolerance) -> dict:
    """Name the first intermediate tensor (in the reference's order) that differs.

    Only tensors present under the same name in both main graphs are compared.
    They are exposed as extra outputs in batches of :data:`LOCALIZE_BATCH` on
    temporary copies written beside each model (so external data still resolves).
    """
    from .modelio import load_model

    ref = load_model(ref_path, load_external=False)
    cand = load_model(cand_path, load_external=False)
    cand_names = {o for n in cand.graph.node for o in n.output if o}
    producers = {}
    order = []
    for n in ref.graph.node:
        for o in n.output:
            if o and o in cand_names:
                order.append(o)
                producers[o] = f"{n.op_type} '{n.name}'"
    outputs = {o.name for o in ref.graph.output}
    order = [o for o in order if o not in outputs]
    for start in range(0, len(order), LOCALIZE_BATCH):
        batch = order[start:start + LOCALIZE_BATCH]
        got = []
        for model, path, provider in ((ref, ref_path, ref_provider), (cand, cand_path, cand_provider)):
            got.append(_run_with_outputs(model, path, provider, batch, feeds))
        for name in batch:
            acc = _Accumulator(name)
            acc.add(got[0][name], got[1][name], tol, factor, 0)
            if not acc.r.equivalent:
                return {"first_divergent": name, "producer": producers[name], "checked": start + batch.index(name) + 1,
                        "result": asdict(acc.r)}
    return {"first_divergent": None, "producer": None, "checked": len(order),
            "result": None}


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
        return runner.open_runner(tmp, provider).run(feeds, names)
    finally:
        os.unlink(tmp)
