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
quantisation). Each BN is measured on its input in the model as calibrated so far:
BNs are processed in waves, a BN after every BN upstream of it.

Ops whose output does not carry channels on axis 1 (e.g. MatMul with a 3-D output)
are refused with a reason, never given a wrong BN.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, helper

from .calibration import ChannelStats, Data, iter_batches
from .errors import BnfoldError
from .graph import Constant, ModelIndex, Scope, attr, is_default_domain
from .hosts import ACTIVATIONS, backward_rule, host_names
from .reasons import Reason

DEFAULT_OPS = tuple(host_names())
MODES = ("preserve", "normalize")
Progress = Optional[Callable[[int], None]]


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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reason"] = None if self.reason is None else self.reason.value
        return d


@dataclass
class CalibrationSummary:
    estimator: str
    batches: int
    samples: int
    passes: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class InsertResult:
    model: ModelProto
    records: List[InsertRecord]
    mode: str
    calibration: Optional[CalibrationSummary]

    def to_dict(self) -> dict:
        return {"mode": self.mode, "function_preserving": self.mode == "preserve",
                "inserted": sum(r.inserted for r in self.records),
                "calibration": None if self.calibration is None else self.calibration.to_dict(),
                "records": [r.to_dict() for r in self.records]}


@dataclass
class RecalibrateResult:
    model: ModelProto
    recalibrated: List[str]
    skipped: List[Tuple[str, str]]
    calibration: CalibrationSummary

    def to_dict(self) -> dict:
        return {"recalibrated": self.recalibrated, "skipped": [{"node": n, "why": w} for n, w in self.skipped],
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


def _load(model_or_path) -> Tuple[ModelProto, Optional[str]]:
    if isinstance(model_or_path, ModelProto):
        return copy.deepcopy(model_or_path), None
    from .modelio import load_model

    return load_model(model_or_path), os.fspath(model_or_path)


def _host_site(scope: Scope, node: NodeProto, position: str) -> Union[Tuple[str, int, np.dtype], InsertRecord]:
    """The tensor after which a BN goes, its channel count and dtype, or why none does."""
    label = scope.label_of(node)
    # Ranks are inferred once, from the graph as it is on first use: ask before any BN is
    # inserted (a Gemm given a BN first must not hide the rank of a MatMul after it).
    scope.index.rank(node.output[0])
    rule = backward_rule(node)
    slot = rule.weight_slot if rule is not None else 1
    w = scope.index.resolve(scope, node.input[slot]) if rule is not None and len(node.input) > slot else None
    if not isinstance(w, Constant) or w.value.dtype.kind != "f" or w.value.ndim < 2:
        return InsertRecord(label, node.op_type, False, reason=InsertReason.UNSUPPORTED_WEIGHT,
                            detail=f"the weight of {node.op_type} '{label}' is not a float constant matrix")
    wv = w.value
    channels = rule.out_channels(node, wv)
    rank = rule.output_rank(scope.index, node, wv)
    if rank is None or rule.feature_axis(node, wv) % rank != 1:
        shown = "of unknown rank" if rank is None else f"{rank}-D"
        return InsertRecord(label, node.op_type, False, reason=InsertReason.CHANNEL_AXIS_MISMATCH,
                            detail=f"{node.op_type} '{label}' output is {shown}: its features are not on axis 1")
    tensor = node.output[0]
    if position == "post-activation":
        act = scope.only_consumer(tensor)
        if act is None or act.op_type not in ACTIVATIONS or not is_default_domain(act):
            return InsertRecord(label, node.op_type, False, reason=InsertReason.NO_ACTIVATION,
                                detail=f"the output of {node.op_type} '{label}' does not feed a single activation")
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
           mode: str = "preserve", epsilon: float = 1e-5, progress: Progress = None) -> InsertResult:
    """Insert BatchNormalization after the chosen ops of the main graph (see module doc)."""
    if position not in ("pre-activation", "post-activation"):
        raise BnfoldError(f"position '{position}': use pre-activation or post-activation")
    if mode not in MODES:
        raise BnfoldError(f"mode '{mode}': use preserve or normalize")
    model, path = _load(model_or_path)
    index = ModelIndex(model)
    scope = index.main
    pick, skip = (re.compile(node) if node else None), (re.compile(exclude) if exclude else None)
    records: List[InsertRecord] = []
    added: List[Tuple[NodeProto, np.dtype]] = []
    for n in list(scope.nodes):
        if n.op_type not in ops or not is_default_domain(n):
            continue
        label = scope.label_of(n)
        if (pick and not (pick.search(label) or pick.search(n.output[0]))) or \
                (skip and (skip.search(label) or skip.search(n.output[0]))):
            continue
        site = _host_site(scope, n, position)
        if isinstance(site, InsertRecord):
            records.append(site)
            continue
        tensor, channels, dtype = site
        producer = scope.producer[tensor]
        bn = _add_bn(scope, producer, tensor, channels, dtype, epsilon, momentum, n.name or n.output[0])
        added.append((bn, dtype))
        where = "after its activation" if position == "post-activation" else "before its activation"
        records.append(InsertRecord(label, n.op_type, True, bn.name, tensor,
                                    detail=f"BatchNormalization '{bn.name}' after {n.op_type} '{label}' ({where})"))
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
                    _set_param(model, bn.input[i], v.astype(dtype))

            # preserve keeps every activation as it was: one pass measures all BNs
            summary = _calibrate(model, path, [b for b, _ in added],
                                 {b.name: param_dtype(d, scope.opset) for b, d in added}, calibration,
                                 batch_size, estimator, momentum, set_stats, sequential=mode == "normalize",
                                 progress=progress)
    return InsertResult(model, records, mode, summary)


def recalibrate(model_or_path, calibration: Data, *, batch_size: Optional[int] = 32, estimator: str = "population",
                momentum: float = 0.99, progress: Progress = None) -> RecalibrateResult:
    """Re-estimate running mean and variance of every inference BN of the main graph."""
    model, path = _load(model_or_path)
    index = ModelIndex(model)
    scope = index.main
    bns, skipped, dtypes = [], [], {}
    for n in scope.nodes:
        if n.op_type != "BatchNormalization" or not is_default_domain(n):
            continue
        label = scope.label_of(n)
        consts = [index.resolve(scope, i) for i in n.input[1:5]]
        if attr(n, "training_mode", 0) or any(o for o in n.output[1:]) or len(consts) < 4:
            skipped.append((label, "training mode"))
        elif not all(isinstance(c, Constant) and c.tensor is not None for c in consts):
            skipped.append((label, "its statistics are not initializers"))
        elif consts[2].value.ndim != 1:
            skipped.append((label, "per-activation statistics (spatial=0)"))
        else:
            if not n.name:
                n.name = index.fresh_name("BatchNormalization")
            bns.append(n)
            dtypes[n.name] = consts[2].value.dtype
    # every BN gets statistics tensors of its own, so a shared one is never half-updated
    for n in bns:
        for i in (3, 4):
            scope.write_constant(n, i, np.array(index.resolve(scope, n.input[i]).value), f"{n.name}.recal")
    index.finish()
    index.apply_pending()  # calibration reads the model back

    def set_stats(bn: NodeProto, mean: np.ndarray, var: np.ndarray, dtype: np.dtype) -> None:
        _set_param(model, bn.input[3], mean.astype(dtype))
        _set_param(model, bn.input[4], var.astype(dtype))

    summary = _calibrate(model, path, bns, dtypes, calibration, batch_size, estimator, momentum, set_stats,
                         sequential=True, progress=progress)
    return RecalibrateResult(model, [n.name for n in bns], skipped, summary)


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


def _calibrate(model: ModelProto, path: Optional[str], bns: List[NodeProto], dtypes: Dict[str, np.dtype],
               data: Data, batch_size: Optional[int], estimator: str, momentum: float, set_stats,
               sequential: bool, progress: Progress) -> CalibrationSummary:
    from . import runner

    ChannelStats(estimator, momentum)  # validate the estimator before any run
    waves = _waves(model, bns) if sequential else [bns]
    tmpdir = tempfile.mkdtemp(prefix="bnfold-calibrate-")
    batches = samples = 0
    try:
        for group in waves:
            probe = ModelProto()
            probe.CopyFrom(model)
            del probe.graph.output[:]
            names = [b.input[0] for b in group]
            for n in dict.fromkeys(names):
                probe.graph.output.append(helper.make_empty_tensor_value_info(n))
            probe_path = os.path.join(tmpdir, "probe.onnx")
            with open(probe_path, "wb") as f:
                f.write(probe.SerializeToString())
            run = runner.open_runner(probe_path, runner.CPU)
            specs = list(run.inputs)
            stats = {n: ChannelStats(estimator, momentum) for n in names}
            batches = samples = 0
            for feeds in iter_batches(data, [s.name for s in specs], batch_size):
                feeds = {s.name: np.asarray(feeds[s.name]).astype(s.dtype, copy=False) for s in specs}
                outs = run.run(feeds, list(stats))
                for n, st in stats.items():
                    st.update(outs[n])
                batches += 1
                samples += len(next(iter(feeds.values())))
                if progress:
                    progress(1)
            for b in group:
                mean, var = stats[b.input[0]].result()
                set_stats(b, mean, var, dtypes[b.name])
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return CalibrationSummary(estimator, batches, samples, len(waves))
