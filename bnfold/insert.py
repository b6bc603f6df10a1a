"""Adding BatchNormalization to trained graphs, and re-estimating BN statistics.

``insert`` puts a BN after every chosen op (Conv, ConvTranspose, Gemm, 2-D MatMul by
default), before its activation (the BN paper's placement) or after it:

- without data the BN is exactly the identity in the model's dtype: scale 1, bias 0,
  mean 0 and a variance chosen so that ``var + eps`` is exactly 1 in that dtype;
- with calibration data it carries measured statistics (see :mod:`bnfold.calibration`):
  ``preserve`` mode sets scale = sqrt(var + eps) and bias = mean, so the function is
  unchanged within rounding; ``normalize`` mode sets scale 1 and bias 0, so the
  activations come out standardised (outputs change, on purpose).

``recalibrate`` re-estimates the running mean and variance of a model's inference BNs
from new data, keeping scale and bias (AdaBN; re-estimation after pruning or
quantisation). Two methods (also for ``insert`` in ``normalize`` mode):

- default: one pass over the data in which every BN normalises with the statistics of
  the current batch while they are measured (torch's ``update_bn``, AdaBN). The probe
  model computes them inside ONNX Runtime (optimisations on), so only per-channel sums
  leave it and memory holds one batch;
- ``exact``: each BN is measured on its input in the model as calibrated so far: BNs
  are processed in waves, a BN after every BN upstream of it, one pass per wave.

``insert`` in ``preserve`` mode measures unchanged activations: one pass, exact.

Ops whose output does not carry channels on axis 1 (e.g. MatMul with a 3-D output)
are refused with a reason, never given a wrong BN.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union, cast

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, helper, numpy_helper

from .calibration import (MOMENTUM_START, MOMENTUM_WARN_WEIGHT, Batch, ChannelStats, Chunk, Data,
                          Moments, check_batch_size, check_momentum, data_weight, iter_batches)
from .errors import BnfoldError
from .graph import Constant, ModelIndex, Scope, attr, is_default_domain, names_read, subgraphs
from .hosts import ACTIVATIONS, backward_rule, host_names
from .reasons import Reason, Refusal

DEFAULT_OPS = tuple(host_names())
MODES = ("preserve", "normalize")
# Called after each batch with (samples so far in this pass, pass number from 1, passes).
Progress = Optional[Callable[[int, int, int], None]]


InsertReason = Reason  # insert's codes live with all the others (reasons.py)


@dataclass(frozen=True)
class InsertRecord:
    host: str
    host_op: str
    inserted: bool
    bn: Optional[str] = None
    tensor: Optional[str] = None
    reason: Optional[InsertReason] = None
    detail: str = ""

    @property
    def refusal(self) -> Optional[Refusal]:
        """Why no BN was inserted (None when one was)."""
        return None if self.reason is None else Refusal(self.reason, self.detail)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reason"] = None if self.reason is None else self.reason.value
        return d


@dataclass(frozen=True)
class SkippedBN:
    """A BatchNormalization ``recalibrate`` left as it was, and why (a :class:`Refusal`)."""

    node: str
    refusal: Refusal

    def to_dict(self) -> dict:
        return {"node": self.node, "reason": self.refusal.reason.value, "detail": self.refusal.detail}


@dataclass
class CalibrationSummary:
    """How statistics were measured. ``data_weight``: the weight of the data in them (1 for
    population; 1 - momentum^batches for momentum, the rest being the start values 0 and 1).
    ``warnings``: sentences the CLI shows (e.g. momentum statistics still near their start)."""

    estimator: str
    batches: int
    samples: int
    passes: int
    method: str = "exact"
    data_weight: float = 1.0
    warnings: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _SavesModel:
    """``save()`` for a result holding a whole model in ``self.model``."""

    model: ModelProto
    source_external_data: bool

    def save(self, path: Union[str, "os.PathLike[str]"], *, external_data: Optional[bool] = None) -> None:
        """Write the model to ``path`` atomically (staged beside it, then renamed); with external
        data in ``<path>.data`` when the source model had it (or ``external_data=True``)."""
        from .modelio import stage_model

        use = external_data if external_data is not None else (self.source_external_data or None)
        with stage_model(self.model, path, external_data=use) as staged:
            staged.commit()


@dataclass
class InsertResult(_SavesModel):
    model: ModelProto
    records: List[InsertRecord]
    mode: str
    calibration: Optional[CalibrationSummary]
    source_external_data: bool = False

    def to_dict(self) -> dict:
        return {"mode": self.mode, "function_preserving": self.mode == "preserve",
                "inserted": sum(r.inserted for r in self.records),
                "calibration": None if self.calibration is None else self.calibration.to_dict(),
                "records": [r.to_dict() for r in self.records]}


@dataclass
class RecalibrateResult(_SavesModel):
    model: ModelProto
    recalibrated: List[str]
    skipped: List[SkippedBN]
    calibration: CalibrationSummary
    source_external_data: bool = False

    def to_dict(self) -> dict:
        return {"recalibrated": self.recalibrated, "skipped": [s.to_dict() for s in self.skipped],
                "calibration": self.calibration.to_dict()}


def identity_variance(dtype: np.dtype, epsilon: float) -> np.ndarray:
    """A variance ``v`` with ``sqrt(v + eps) == 1`` exactly in ``dtype`` (checked, not assumed)."""
    dt = np.dtype(dtype)
    one, eps = dt.type(1), dt.type(epsilon)
    v = dt.type(one - eps)
    for _ in range(64):
        total = dt.type(v + eps)
        if total == one and dt.type(np.sqrt(total)) == one:
            return np.asarray(v, dtype=dt)
        v = np.nextafter(v, dt.type(2) if total < one else dt.type(0), dtype=dt)
    raise BnfoldError(f"no variance makes sqrt(var + {epsilon}) exactly 1 in {dt.name}")


def param_dtype(dtype: np.dtype, opset: int) -> np.dtype:
    """float32 statistics for float16/bfloat16 activations where BatchNormalization-15 allows
    it: no float16 variance makes ``var + eps`` exactly 1 in the float32 arithmetic runtimes
    use, so the identity BN would not be exact. Before opset 15 the parameters must share
    the activations' dtype, and the identity holds within one float16 rounding step."""
    dt = np.dtype(dtype)
    return np.dtype(np.float32) if opset >= 15 and dt.itemsize == 2 else dt


def _load(model_or_path) -> Tuple[ModelProto, Optional[str], bool]:
    """The model (a copy), its path (None for a proto) and whether its file used external data."""
    if isinstance(model_or_path, ModelProto):
        return copy.deepcopy(model_or_path), None, False
    from .modelio import load_model_info

    model, external = load_model_info(model_or_path)
    return model, os.fspath(model_or_path), external


def _regex(pattern: Optional[str], option: str) -> Optional["re.Pattern[str]"]:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise BnfoldError(f"{option} '{pattern}' is not a valid regular expression ({e})") from None


def check_ops(ops: Sequence[str]) -> None:
    """Refuse op types that cannot host a BN, suggesting the right spelling of a known one."""
    for op in ops:
        if op in DEFAULT_OPS:
            continue
        known = {o.lower(): o for o in DEFAULT_OPS}
        hint = f"did you mean {known[op.lower()]}? " if op.lower() in known else ""
        raise BnfoldError(f"{op} is not a supported host op: {hint}BNs go after {', '.join(DEFAULT_OPS)}")


def check_epsilon(epsilon: float) -> None:
    if not (np.isfinite(epsilon) and epsilon > 0):
        raise BnfoldError(f"epsilon {epsilon} must be a positive number (BN divides by sqrt(var + epsilon))")


def _host_site(scope: Scope, node: NodeProto, position: str) -> Union[Tuple[str, int, np.dtype], Refusal]:
    """The tensor after which a BN goes, its channel count and dtype, or why none does."""
    label = scope.label_of(node)
    # Ranks are inferred once, from the graph as it is on first use: ask before any BN is
    # inserted (a Gemm given a BN first must not hide the rank of a MatMul after it).
    scope.index.rank(node.output[0])
    rule = backward_rule(node)
    slot = rule.weight_slot if rule is not None else 1
    w = scope.index.resolve(scope, node.input[slot]) if rule is not None and len(node.input) > slot else None
    if rule is None or not isinstance(w, Constant) or w.value.dtype.kind != "f" or w.value.ndim < 2:
        return Refusal(Reason.UNSUPPORTED_WEIGHT, f"the weight of {node.op_type} '{label}' is not a float constant "
                                                  "matrix")
    wv = w.value
    channels = rule.out_channels(node, wv)
    rank = rule.output_rank(scope.index, node, wv)
    if rank is None or rule.feature_axis(node, wv) % rank != 1:
        shown = "of unknown rank" if rank is None else f"{rank}-D"
        return Refusal(Reason.CHANNEL_AXIS_MISMATCH,
                       f"{node.op_type} '{label}' output is {shown}: its features are not on axis 1")
    tensor = node.output[0]
    if position == "post-activation":
        act = scope.only_consumer(tensor)
        if act is None or act.op_type not in ACTIVATIONS or not is_default_domain(act):
            return Refusal(Reason.NO_ACTIVATION, f"the output of {node.op_type} '{label}' does not feed a single "
                                                 "activation")
        tensor = act.output[0]
    return tensor, channels, wv.dtype


def _add_bn(scope: Scope, producer: NodeProto, tensor: str, channels: int, dtype: np.dtype, epsilon: float,
            momentum: float, base: str) -> NodeProto:
    """Insert an identity BN after ``tensor``: it takes over the name, so consumers and graph
    outputs are untouched."""
    index = scope.index
    k = list(producer.output).index(tensor)
    pre = index.fresh_name(f"{tensor}_pre_bn")
    scope.rename_output(producer, k, pre)
    name = index.fresh_name(f"{base}_bn")
    bn = helper.make_node("BatchNormalization", [pre, "", "", "", ""], [tensor], name=name, epsilon=float(epsilon),
                          momentum=float(momentum))
    if scope.opset < 7:
        bn.attribute.append(helper.make_attribute("is_test", 1))
    scope.add_node_after(producer, bn)
    dtype = param_dtype(dtype, scope.opset)
    ones, zeros = np.ones(channels, dtype), np.zeros(channels, dtype)
    var = np.full(channels, identity_variance(dtype, epsilon), dtype)
    for i, (suffix, value) in enumerate((("scale", ones), ("bias", zeros), ("mean", zeros), ("var", var)), 1):
        scope.write_constant(bn, i, value, f"{name}.{suffix}")
    return bn


def insert(model_or_path, *, ops: Sequence[str] = DEFAULT_OPS, node: Optional[str] = None,
           exclude: Optional[str] = None, position: str = "pre-activation", calibration: Optional[Data] = None,
           batch_size: Optional[int] = 32, estimator: str = "population", momentum: float = 0.99,
           mode: str = "preserve", epsilon: float = 1e-5, exact: bool = False,
           progress: Progress = None) -> InsertResult:
    """Insert BatchNormalization after the chosen ops of the main graph (see module doc).

    ``exact`` matters for ``normalize`` mode only (see :func:`recalibrate`)."""
    if position not in ("pre-activation", "post-activation"):
        raise BnfoldError(f"position '{position}': use pre-activation or post-activation")
    if mode not in MODES:
        raise BnfoldError(f"mode '{mode}': use preserve or normalize")
    check_ops(ops)
    check_epsilon(epsilon)
    check_momentum(momentum)  # written into the new BNs even without data
    pick, skip = _regex(node, "--node"), _regex(exclude, "--exclude")
    if calibration is not None:
        ChannelStats(estimator, momentum)  # refuse a bad estimator before loading anything
        check_batch_size(batch_size)
    model, path, external = _load(model_or_path)
    index = ModelIndex(model)
    scope = index.main
    records: List[InsertRecord] = []
    added: List[Tuple[NodeProto, np.dtype]] = []
    selected = 0
    for n in list(scope.nodes):
        if n.op_type not in ops or not is_default_domain(n):
            continue
        label = scope.label_of(n)
        if (pick and not (pick.search(label) or pick.search(n.output[0]))) or \
                (skip and (skip.search(label) or skip.search(n.output[0]))):
            continue
        selected += 1
        site = _host_site(scope, n, position)
        if isinstance(site, Refusal):
            records.append(InsertRecord(label, n.op_type, False, reason=site.reason, detail=site.detail))
            continue
        tensor, channels, dtype = site
        producer = scope.producer[tensor]
        bn = _add_bn(scope, producer, tensor, channels, dtype, epsilon, momentum, n.name or n.output[0])
        added.append((bn, dtype))
        where = "after its activation" if position == "post-activation" else "before its activation"
        records.append(InsertRecord(label, n.op_type, True, bn.name, tensor,
                                    detail=f"BatchNormalization '{bn.name}' after {n.op_type} '{label}' ({where})"))
    if not selected:
        what = " or ".join(ops)
        filters = "".join(f" {o} '{p}'" for o, p in (("matching --node", node), ("outside --exclude", exclude)) if p)
        raise BnfoldError(f"has no {what} node{filters}: no BatchNormalization to insert", path)
    summary = None
    if added:
        index.finish()
        index.apply_pending()  # calibration reads the model back
        if calibration is not None:
            def set_stats(bn: NodeProto, mean: np.ndarray, var: np.ndarray, dtype: np.dtype) -> None:
                eps = float(attr(bn, "epsilon", 1e-5))
                scale = np.sqrt(var + eps) if mode == "preserve" else np.ones_like(var)
                bias = mean if mode == "preserve" else np.zeros_like(mean)
                for i, v in ((1, scale), (2, bias), (3, mean), (4, var)):
                    _set_param(model, bn.input[i], _param_value(v, dtype, bn, i, path))

            # preserve keeps every activation as it was: one pass measures all BNs
            summary = _calibrate(model, path, [b for b, _ in added],
                                 {b.name: param_dtype(d, scope.opset) for b, d in added}, calibration,
                                 batch_size, estimator, momentum, set_stats, sequential=mode == "normalize",
                                 progress=progress, exact=exact)
    return InsertResult(model, records, mode, summary, external)


def recalibrate(model_or_path, calibration: Data, *, batch_size: Optional[int] = 32, estimator: str = "population",
                momentum: float = 0.99, exact: bool = False, progress: Progress = None) -> RecalibrateResult:
    """Re-estimate running mean and variance of every inference BN of the main graph.

    By default in one pass over the data during which every BN normalises with its current
    batch statistics (torch's ``update_bn``, AdaBN), at about inference speed. With
    ``exact``, each BN is measured with every BN upstream of it at its final statistics: one
    pass per dependency wave (module doc)."""
    ChannelStats(estimator, momentum)  # refuse a bad estimator before loading anything
    check_batch_size(batch_size)
    model, path, external = _load(model_or_path)
    index = ModelIndex(model)
    scope = index.main
    bns: List[NodeProto] = []
    skipped: List[SkippedBN] = []
    dtypes: Dict[str, np.dtype] = {}
    for n in scope.nodes:
        if n.op_type != "BatchNormalization" or not is_default_domain(n):
            continue
        label = scope.label_of(n)
        consts = [index.resolve(scope, i) for i in n.input[1:5]]
        if attr(n, "training_mode", 0) or any(o for o in n.output[1:]):
            skipped.append(SkippedBN(label, Refusal(Reason.TRAINING_MODE, f"BatchNormalization '{label}' runs in "
                                                    "training mode: it normalises with batch statistics")))
        elif len(consts) < 4:
            skipped.append(SkippedBN(label, Refusal(Reason.INVALID_PARAMETERS, f"BatchNormalization '{label}' does "
                                                    "not have the 5 inputs X, scale, B, mean, var")))
        elif not all(isinstance(c, Constant) and c.tensor is not None for c in consts):
            skipped.append(SkippedBN(label, Refusal(Reason.NOT_CONSTANT, f"the parameters of BatchNormalization "
                                                    f"'{label}' are not all initializers")))
        elif cast(Constant, consts[2]).value.ndim != 1:
            skipped.append(SkippedBN(label, Refusal(Reason.SPATIAL_PER_ACTIVATION, f"BatchNormalization '{label}' "
                                                    "has per-activation statistics (spatial=0)")))
        else:
            if not n.name:
                n.name = index.fresh_name("BatchNormalization")
            bns.append(n)
            dtypes[n.name] = cast(Constant, consts[2]).value.dtype
    if not bns:
        why = "; ".join(str(s.refusal) for s in skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        raise BnfoldError("has no inference BatchNormalization to recalibrate" + (f" ({why})" if why else ""),
                          path)
    # every BN gets statistics tensors of its own, so a shared one is never half-updated
    for n in bns:
        for i in (3, 4):
            stat = index.resolve(scope, n.input[i])
            assert isinstance(stat, Constant)  # checked when the BN was chosen
            scope.write_constant(n, i, np.array(stat.value), f"{n.name}.recal")
    index.finish()
    index.apply_pending()  # calibration reads the model back

    def set_stats(bn: NodeProto, mean: np.ndarray, var: np.ndarray, dtype: np.dtype) -> None:
        _set_param(model, bn.input[3], _param_value(mean, dtype, bn, 3, path))
        _set_param(model, bn.input[4], _param_value(var, dtype, bn, 4, path))

    summary = _calibrate(model, path, bns, dtypes, calibration, batch_size, estimator, momentum, set_stats,
                         sequential=True, progress=progress, exact=exact)
    return RecalibrateResult(model, [n.name for n in bns], skipped, summary, external)


_PARAM_NAMES = {1: "scale", 2: "bias", 3: "running mean", 4: "running variance"}


def _param_value(value: np.ndarray, dtype: np.dtype, bn: NodeProto, i: int, path: Optional[str]) -> np.ndarray:
    """A measured BN parameter (float64) rounded once to its dtype; refused when it does not fit (a
    variance of 1e60 from calibration data of scale 1e30 was written as inf into float32, exit 0)."""
    from .numerics import FoldOverflow, round_to

    try:
        return round_to(value, dtype, f"the {_PARAM_NAMES[i]} of BatchNormalization '{bn.name}'")
    except FoldOverflow as e:
        raise BnfoldError(f"{e}: the calibration data's values are too large for this model", path) from None


def _set_param(model: ModelProto, name: str, value: np.ndarray) -> None:
    from .modelio import set_tensor_data

    for t in model.graph.initializer:
        if t.name == name:
            set_tensor_data(t, value)
            return
    raise BnfoldError(f"parameter '{name}' is not an initializer")


def _waves(model: ModelProto, bns: List[NodeProto]) -> List[List[NodeProto]]:
    """Group ``bns`` so that every BN comes after all BNs upstream of it."""
    targets = {b.name for b in bns}  # by name: node objects may have been copied by graph edits
    upstream: Dict[str, set] = {}
    wave: Dict[str, int] = {}
    for n in model.graph.node:
        up = set()
        for i in n.input:
            up |= upstream.get(i, set())
        if n.name in targets:
            wave[n.name] = 1 + max((wave[a] for a in up), default=-1)
            up = up | {n.name}
        for o in n.output:
            upstream[o] = up
    groups: Dict[int, List[NodeProto]] = {}
    for b in bns:
        groups.setdefault(wave.get(b.name, 0), []).append(b)
    return [groups[k] for k in sorted(groups)]


def _shape_check(specs, where: str) -> Callable[[Chunk], None]:
    """A check that every calibration array fits its model input (rank, fixed dims, kind)."""

    def check(chunk: Chunk) -> None:
        for spec in specs:
            a = chunk.arrays[spec.name]
            if not spec.dims:  # no shape recorded (or a scalar input): ONNX Runtime will judge
                continue
            fixed = [(i, d) for i, d in enumerate(spec.dims) if isinstance(d, int) and d > 0 and i > 0]
            if a.ndim != len(spec.dims) or any(a.shape[i] != d for i, d in fixed):
                want = "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else (d or "?")
                                       for d in spec.dims) + "]"
                message = (f"array '{spec.name}' has shape {list(a.shape)}, but input '{spec.name}' of {where} "
                           f"takes {want}")
                raise BnfoldError(message, chunk.source) if chunk.source else \
                    BnfoldError(f"{chunk.where}: {message}")
            if np.dtype(spec.dtype).kind == "f" and a.dtype.kind not in "fiub":
                raise BnfoldError(f"array '{spec.name}' has dtype {a.dtype}, input '{spec.name}' takes "
                                  f"{np.dtype(spec.dtype).name}", chunk.source)

    return check


def _calibrate(model: ModelProto, path: Optional[str], bns: List[NodeProto], dtypes: Dict[str, np.dtype],
               data: Data, batch_size: Optional[int], estimator: str, momentum: float, set_stats,
               sequential: bool, progress: Progress, exact: bool = False) -> CalibrationSummary:
    """Measure the input statistics of ``bns`` and hand each BN's to ``set_stats``.

    Not ``sequential`` (every BN an identity while measured): one pass, exact. ``sequential``:
    by default one pass in which every BN normalises with its current batch statistics;
    ``exact``: one pass per wave, every BN measured with those upstream at their final values.
    """
    if sequential and exact or _opset(model) < 7:
        return _calibrate_waves(model, path, bns, dtypes, data, batch_size, estimator, momentum, set_stats,
                                sequential, progress)
    if sequential and batch_size == 1:
        raise BnfoldError(f"--batch-size 1: {ONE_SAMPLE_WHY}; use --batch-size 8 or more (default 32), or --exact "
                          "(every BN measured with those upstream at their final statistics)", path)
    return _calibrate_batch(model, path, bns, dtypes, data, batch_size, estimator, momentum, set_stats,
                            normalize=sequential, progress=progress)


# Why the default method cannot use batches of one sample (refusals say it).
ONE_SAMPLE_WHY = ("with the default method every BN normalises each batch with that batch's own statistics, so a "
                  "batch of one sample is normalised per sample (instance normalisation): the BNs after it would "
                  "measure activations the model never produces, and their variances would leave out the spread "
                  "between samples")


def _opset(model: ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=1)


def _run_pass(model: ModelProto, path: Optional[str], outputs: List[str], data: Data, batch_size: Optional[int],
              optimized: bool, on_batch: Callable[[Any, int, Batch], None], tick: Callable[[int], None],
              reducer: Optional[Callable[[Dict[str, np.ndarray]], Any]] = None,
              batch_statistics: bool = False) -> Tuple[int, int]:
    """One pass over the data through ``model`` (written to a private folder), calling
    ``on_batch(result, k, batch)`` per batch, where ``result`` is ``reducer(outputs)``
    computed in ONNX Runtime's worker process (the outputs themselves when ``reducer`` is
    None); returns (batches, samples). ``batch_statistics``: the probe normalises with
    batch statistics, so a batch of one sample is refused."""
    from . import runner
    from .modelio import save_model

    where = path or "the model"
    tmpdir = tempfile.mkdtemp(prefix="bnfold-calibrate-")
    try:
        probe_path = os.path.join(tmpdir, "probe.onnx")
        save_model(model, probe_path)  # external data above protobuf's 2 GB limit
        try:
            run = runner.open_runner(probe_path, runner.CPU, optimized=optimized, name=path)
        except BnfoldError as e:
            raise BnfoldError(e.message, path) from None
        specs = list(run.inputs)
        fixed = {s.dims[0] for s in specs if s.dims and isinstance(s.dims[0], int) and s.dims[0] > 0}
        if fixed and batch_statistics and min(fixed) == 1:
            raise BnfoldError("its inputs take batches of exactly 1 sample (a fixed batch dimension), and "
                              f"{ONE_SAMPLE_WHY}: use --batch-size 1 --exact", path)
        if fixed and batch_size is not None and batch_size not in fixed:
            raise BnfoldError(f"its inputs take batches of exactly {min(fixed)} sample(s) (a fixed batch "
                              f"dimension): use --batch-size {min(fixed)}", path)
        batches = samples = 0
        for batch in iter_batches(data, [s.name for s in specs], batch_size, _shape_check(specs, where)):
            if fixed and batch.size not in fixed:
                raise BnfoldError(f"its inputs take batches of exactly {min(fixed)} sample(s), and calibration "
                                  f"batch {batches} from {', '.join(batch.sources)} holds {batch.size}: use a "
                                  f"sample count that is a multiple of {min(fixed)}", path)
            if batch_statistics and batch.size == 1:
                raise BnfoldError(f"calibration batch {batches} from {', '.join(batch.sources)} holds 1 sample: "
                                  f"{ONE_SAMPLE_WHY}; use a sample count that leaves no final batch of one, or "
                                  "--exact", path)
            feeds = {s.name: np.asarray(batch.feeds[s.name]).astype(s.dtype, copy=False) for s in specs}
            try:
                outs = run.run(feeds, outputs) if reducer is None else run.run_reduce(feeds, outputs, reducer)
            except BnfoldError as e:
                raise BnfoldError(f"{e.message}, on calibration data from {', '.join(batch.sources)}",
                                  path) from None
            on_batch(outs, batches, batch)
            batches += 1
            samples += batch.size
            tick(samples)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return batches, samples


def _calibrate_waves(model: ModelProto, path: Optional[str], bns: List[NodeProto], dtypes: Dict[str, np.dtype],
                     data: Data, batch_size: Optional[int], estimator: str, momentum: float, set_stats,
                     sequential: bool, progress: Progress) -> CalibrationSummary:
    """The exact method: per wave, the BN inputs as graph outputs of the model as calibrated
    so far, cut to the nodes they need (early waves run a fraction of the model), ONNX
    Runtime optimisations on (the measured tensors are graph outputs: no fusion removes
    them; upstream BNs, at their final statistics, fold into their Convs as in inference),
    statistics in numpy float64 in the worker."""
    where = path or "the model"
    producers = _producers(model)
    waves = _waves(model, bns) if sequential else [bns]
    batches = samples = 0
    for k, group in enumerate(waves, 1):
        names = list(dict.fromkeys(b.input[0] for b in group))
        probe = _model_up_to(model, names)
        stats = {n: ChannelStats(estimator, momentum) for n in names}

        def on_batch(outs: Dict[str, Tuple[np.ndarray, np.ndarray, int]], i: int, batch: Batch) -> None:
            for n, st in stats.items():  # noqa: B023 (called only during this wave's pass)
                _update(st, *outs[n], n, i, batch, where, producers.get(n))

        # the activations are reduced to moments where ONNX Runtime runs: only those travel back
        batches, samples = _run_pass(probe, path, names, data, batch_size, True, on_batch,
                                     _ticker(progress, k, len(waves)), reducer=Moments(names))
        del probe
        for b in group:
            mean, var = stats[b.input[0]].result()
            set_stats(b, mean, var, dtypes[b.name])
    return _summary(estimator, momentum, batches, samples, len(waves), "exact")


def _model_up_to(model: ModelProto, outputs: List[str]) -> ModelProto:
    """A model whose outputs are ``outputs`` and whose nodes and initializers are only those
    they depend on (names a subgraph reads from the enclosing scope count as inputs)."""
    needed = set(outputs)
    keep: List[NodeProto] = []
    for n in reversed(model.graph.node):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(n.input)
            for _, body in subgraphs(n):
                needed |= names_read(body)
    probe = ModelProto()  # not a copy of the whole model: its weights are copied once, below, if needed
    probe.ir_version = model.ir_version
    probe.opset_import.extend(model.opset_import)
    probe.functions.extend(model.functions)
    g = probe.graph
    g.name = model.graph.name
    g.input.extend(model.graph.input)
    g.node.extend(reversed(keep))
    g.initializer.extend(t for t in model.graph.initializer if t.name in needed)
    g.sparse_initializer.extend(t for t in model.graph.sparse_initializer if t.values.name in needed)
    g.output.extend(helper.make_empty_tensor_value_info(n) for n in outputs)
    return probe


def _ticker(progress: Progress, k: int, passes: int) -> Callable[[int], None]:
    return (lambda samples: progress(samples, k, passes)) if progress else (lambda samples: None)


def _calibrate_batch(model: ModelProto, path: Optional[str], bns: List[NodeProto], dtypes: Dict[str, np.dtype],
                     data: Data, batch_size: Optional[int], estimator: str, momentum: float, set_stats,
                     normalize: bool, progress: Progress) -> CalibrationSummary:
    """One pass, ONNX Runtime optimisations on: the probe computes every BN input's batch mean
    and variance inside the graph (per-sample float32 sums combined in float64; graph outputs,
    so no fusion removes them) and, with ``normalize``, each BN normalises with them (torch's
    update_bn, AdaBN). Only these small tensors leave ONNX Runtime."""
    where = path or "the model"
    probe, taps = batch_stats_probe(model, [b.name for b in bns], normalize)
    outputs = [t for tap in taps.values() for t in tap[:3]]
    stats = {b.name: ChannelStats(estimator, momentum) for b in bns}
    inputs = {b.name: b.input[0] for b in bns}
    producers = _producers(model)

    def on_batch(outs: Dict[str, np.ndarray], i: int, batch: Batch) -> None:
        for name, tap in taps.items():
            _update(stats[name], outs[tap.mean].reshape(-1), outs[tap.var].reshape(-1),
                    tap.values_per_channel(outs[tap.shape]), inputs[name], i, batch, where,
                    producers.get(inputs[name]))

    batches, samples = _run_pass(probe, path, outputs, data, batch_size, True, on_batch, _ticker(progress, 1, 1),
                                 batch_statistics=normalize)
    del probe
    for b in bns:
        mean, var = stats[b.name].result()
        set_stats(b, mean, var, dtypes[b.name])
    return _summary(estimator, momentum, batches, samples, 1, "batch" if normalize else "exact")


class Tap(NamedTuple):
    """Where a probe reports one BN input's batch statistics: graph outputs ``mean`` and
    ``var`` (biased, float64, [1, C, 1, ...]) and ``shape``, whose first entry is N; the
    values per channel m = N x ``positions``, or N x the product of ``shape[2:]`` when
    ``positions`` (spatial positions per sample) is None."""

    mean: str
    var: str
    shape: str
    positions: Optional[int]

    def values_per_channel(self, shape: np.ndarray) -> int:
        dims = [int(d) for d in shape]
        return dims[0] * (self.positions if self.positions is not None else int(np.prod(dims[2:])))


def batch_stats_probe(model: ModelProto, bn_names: Sequence[str], normalize: bool
                      ) -> Tuple[ModelProto, Dict[str, Tap]]:
    """A copy of ``model`` whose outputs are, per BN named, its input's batch mean and biased
    variance over every axis but 1 and what gives m (a :class:`Tap`).
    With ``normalize`` each of these BNs normalises with those batch statistics (its mean and
    variance inputs are replaced by them; scale, bias and epsilon stay: a training-mode BN, as
    torch's update_bn runs it); otherwise the BNs are untouched."""
    probe = ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    opset = _opset(probe)
    taken = {t.name for t in graph.initializer} | {v.name for v in graph.input} | \
        {o for n in graph.node for o in n.output} | {n.name for n in graph.node}
    counter = iter(range(1 << 30))

    def fresh(base: str) -> str:
        name = base
        while name in taken:
            name = f"{base}_{next(counter)}"
        taken.add(name)
        return name

    inits = {t.name: t for t in graph.initializer}
    index = ModelIndex(model)  # ranks and dtypes of the BN inputs
    targets = set(bn_names)
    nodes: List[NodeProto] = []
    taps: Dict[str, Tap] = {}
    del graph.output[:]
    for n in list(graph.node):
        if n.name not in targets or n.op_type != "BatchNormalization":
            nodes.append(n)
            continue
        p = fresh(f"{n.name}.calib")
        # these helpers are called only within this iteration (B023: the late binding is intended)
        t = lambda *names: [fresh(f"{p}.{s}") for s in names]  # noqa: E731, B023
        c = lambda suffix, value: _probe_const(graph, fresh(f"{p}.{suffix}"), value)  # noqa: E731, B023

        def reduce(op: str, x: str, out: str, axes: List[int]) -> NodeProto:
            if opset >= (13 if op == "ReduceSum" else 18):  # when axes became an input
                return helper.make_node(op, [x, c("axes", np.array(axes, np.int64))], [out], keepdims=1)  # noqa: B023
            return helper.make_node(op, [x], [out], axes=axes, keepdims=1)

        x = n.input[0]
        xf, new = x, []
        elem = index.elem_type(x)
        if elem not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):  # float16, bfloat16: sums in float32
            xf = t("xf")[0]
            new = [helper.make_node("Cast", [x], [xf], to=onnx.TensorProto.FLOAT)]
        shape, mean, ex2, msq, v0, var = t("shape", "mean", "ex2", "msq", "v0", "var")
        positions: Optional[int] = None
        rank = index.rank(x)
        if rank is not None and rank >= 3 and elem != onnx.TensorProto.DOUBLE:
            # Per-sample channel means of x and x*x by GlobalAveragePool (float32), combined in
            # float64. ONNX Runtime runs GlobalAveragePool and Mul in its blocked (NCHWc) layout
            # beside the Conv that made x; ReduceSum needs the plain layout, a reorder copy of
            # x first (mobilenetv2, batch 32: 3.8x plain inference with ReduceSum, 1.9x this way).
            sq, p1, p2, p1d, p2d = t("sq", "p1", "p2", "p1d", "p2d")
            dims = index.shape(x) or []
            if all(isinstance(d, int) for d in dims[2:]):
                # N from the pooled tensor's shape: Shape(x) would make ORT reorder x out of NCHWc
                # for nothing (insert --calibration, mobilenetv2: a third of the probe's time)
                positions = int(np.prod([int(d) for d in dims[2:] if d is not None]))
                new.append(helper.make_node("Shape", [p1], [shape]))
            else:
                new.append(helper.make_node("Shape", [x], [shape]))
            new += [helper.make_node("GlobalAveragePool", [xf], [p1]),
                    helper.make_node("Mul", [xf, xf], [sq]),
                    helper.make_node("GlobalAveragePool", [sq], [p2]),
                    helper.make_node("Cast", [p1], [p1d], to=onnx.TensorProto.DOUBLE),
                    helper.make_node("Cast", [p2], [p2d], to=onnx.TensorProto.DOUBLE),
                    reduce("ReduceMean", p1d, mean, [0]), reduce("ReduceMean", p2d, ex2, [0])]
        else:
            # [N, C] (or a rank unknown here): sums over [N, C, positions] after a Reshape
            x3, size, ch, m, m64, p1, p2, p1d, p2d, s1, s2 = t(
                "x3", "size", "ch", "m", "m64", "p1", "p2", "p1d", "p2d", "s1", "s2")
            new += [helper.make_node("Shape", [x], [shape]),
                    helper.make_node("Reshape", [xf, c("to3d", np.array([0, 0, -1], np.int64))], [x3]),
                    reduce("ReduceSum", x3, p1, [2]), reduce("ReduceSumSquare", x3, p2, [2]),
                    helper.make_node("Cast", [p1], [p1d], to=onnx.TensorProto.DOUBLE),
                    helper.make_node("Cast", [p2], [p2d], to=onnx.TensorProto.DOUBLE),
                    reduce("ReduceSum", p1d, s1, [0]), reduce("ReduceSum", p2d, s2, [0]),
                    helper.make_node("Size", [x], [size]),
                    helper.make_node("Gather", [shape, c("one", np.array(1, np.int64))], [ch]),
                    helper.make_node("Div", [size, ch], [m]),
                    helper.make_node("Cast", [m], [m64], to=onnx.TensorProto.DOUBLE),
                    helper.make_node("Div", [s1, m64], [mean]),
                    helper.make_node("Div", [s2, m64], [ex2])]
        # var = E[x^2] - mean^2 in float64 (clipped at 0 against rounding)
        new += [helper.make_node("Mul", [mean, mean], [msq]),
                helper.make_node("Sub", [ex2, msq], [v0]),
                helper.make_node("Max", [v0, c("zero", np.array(0.0, np.float64))], [var])]
        taps[n.name] = Tap(mean, var, shape, positions)
        if normalize:
            mean_c, var_c, mean_t, var_t = t("mean_c", "var_c", "mean_t", "var_t")
            flat = c("flat", np.array([-1], np.int64))
            to = inits[n.input[3]].data_type if n.input[3] in inits else onnx.TensorProto.FLOAT
            new += [helper.make_node("Reshape", [mean, flat], [mean_c]),
                    helper.make_node("Reshape", [var, flat], [var_c]),
                    helper.make_node("Cast", [mean_c], [mean_t], to=to),
                    helper.make_node("Cast", [var_c], [var_t], to=to)]
            bn = NodeProto()
            bn.CopyFrom(n)
            bn.input[3], bn.input[4] = mean_t, var_t
            new.append(bn)
        else:
            nodes.append(n)
        nodes.extend(new)
        graph.output.extend(helper.make_empty_tensor_value_info(o) for o in taps[n.name][:3])
    del graph.node[:]
    graph.node.extend(nodes)
    return probe, taps


def _probe_const(graph, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _producers(model: ModelProto) -> Dict[str, str]:
    """Each main-graph tensor's producer, as a message names it (``Gemm 'fc'``)."""
    return {o: f"{n.op_type} '{n.name}'" for n in model.graph.node for o in n.output if o}


def _update(stats: ChannelStats, mean: np.ndarray, var: np.ndarray, m: int, tensor: str, k: int, batch: Batch,
            where: str, producer: Optional[str] = None) -> None:
    """Add one batch's moments of ``tensor``, refusing what would give meaningless statistics."""
    if m < 2:
        # a model whose batch dimension is fixed at 1 asks for --batch-size 1 first: say what works then too
        of = f" (the output of {producer})" if producer else ""
        raise BnfoldError(f"calibration batch {k} ({batch.size} sample(s)) gives m = {m} value per channel at "
                          f"tensor '{tensor}'{of}: the variance needs m >= 2 (use --batch-size 2 or more, and a "
                          "sample count that leaves no final batch of one; a model whose batch dimension is fixed "
                          "at 1 cannot give it 2 values: leave that op out, insert --exclude REGEX)", where)
    if not (np.isfinite(mean).all() and np.isfinite(var).all()):
        raise BnfoldError(f"tensor '{tensor}' gives statistics that are not finite (inf or NaN) on calibration "
                          f"batch {k}, from {', '.join(batch.sources)}: its values, or their squares, pass the range "
                          "of the model's dtype", where)
    stats.update_moments(mean, var, m)


def _summary(estimator: str, momentum: float, batches: int, samples: int, passes: int,
             method: str) -> CalibrationSummary:
    weight = data_weight(estimator, momentum, batches)
    warnings = []
    if weight < MOMENTUM_WARN_WEIGHT:
        start_mean, start_var = MOMENTUM_START
        warnings.append(f"momentum {momentum} over {batches} batch(es): the data weighs {weight:.1%} of the "
                        f"statistics, the start values (mean {start_mean:g}, var {start_var:g}) {1 - weight:.1%}; "
                        "use more batches, a lower --momentum, or --estimator population")
    return CalibrationSummary(estimator, batches, samples, passes, method, round(weight, 6), warnings)
