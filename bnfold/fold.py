"""The fold driver: find every BatchNormalization, fold it or say why not.

For each inference-mode BN (in the main graph, control-flow bodies and model-local
functions) the driver:

1. checks what every fold needs: inference mode, per-channel constant parameters
   with sane values (:func:`_bn_affine`);
2. tries the op *before* it (:func:`_fold_backward`): a host from
   :data:`bnfold.hosts.BACKWARD_HOSTS`, possibly behind a constant ``Add`` and a
   ``Reshape``/``Flatten`` that provably keeps the feature axis on BN's axis 1;
3. otherwise tries the op *after* it (:func:`_fold_forward`);
4. repeats until nothing changes, so chains (Conv -> BN -> BN) fold completely.

Every BN left in place gets a :class:`BNRecord` with a :class:`Reason` and a
sentence naming the node. Weights are computed in float64 and rounded once to the
host's dtype; a fold whose result would overflow that dtype is refused.
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
from onnx import ModelProto, NodeProto, helper

from . import __version__, numerics
from .errors import MalformedModelError
from .graph import (FLOAT_TENSOR_TYPES, Constant, ModelIndex, NotConstant, Scope, attr, has_attribute_refs,
                    is_default_domain)
from .hosts import ACTIVATIONS, BACKWARD_HOSTS, FORWARD_HOSTS, LAYOUT_OPS, BackwardHost, Refusal
from .reasons import Reason

PROVENANCE_KEY = "bnfold"

INTO_PRECEDING = "into_preceding"
INTO_FOLLOWING = "into_following"
REPARAMETERIZED = "reparameterized"


@dataclass(frozen=True)
class BNRecord:
    """What happened to one BatchNormalization node."""

    node: str
    """The BN's name (``BatchNormalization#i`` for an unnamed node, ``i`` its position)."""
    graph: str
    """Where it lives: ``main graph``, a body such as ``If_0.then_branch``, or ``function dom.Name``."""
    folded: bool
    direction: Optional[str] = None
    """``into_preceding``, ``into_following`` or ``reparameterized`` (merged with parallel
    branches into one Conv) when folded."""
    host: Optional[str] = None
    """Name of the node it was folded into."""
    host_op: Optional[str] = None
    reason: Optional[Reason] = None
    """Why it was kept (None when folded)."""
    detail: str = ""
    """One sentence for people."""
    why: str = ""
    """Why it was kept, without the node's name (``detail`` is ``BatchNormalization 'x' kept: <why>``)."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reason"] = None if self.reason is None else self.reason.value
        return d


@dataclass(frozen=True)
class ModelStats:
    bn_count: int
    node_count: int
    weight_bytes: int
    """Bytes of tensor data: initializers and tensor attributes, all scopes."""

    def to_dict(self) -> dict:
        return asdict(self)


class FuseResult:
    """The folded model and a record for every BatchNormalization it had."""

    def __init__(self, model: ModelProto, replacements: Dict[str, np.ndarray], records: List[BNRecord],
                 before: ModelStats, after: ModelStats, source: Optional[str] = None,
                 source_external_data: bool = False, merges: Optional[list] = None,
                 base_dir: Optional[str] = None) -> None:
        self._model = model
        self._replacements = replacements
        self.records = records
        self.before = before
        self.after = after
        self.source = source
        self.source_external_data = source_external_data
        """Whether the source file kept its weights in external data."""
        self._external_unloaded = source_external_data  # untouched tensors still on disk
        self.base_dir = base_dir
        self.merges = merges or []
        """Multi-branch blocks merged into one Conv (:class:`bnfold.reparam.Merge`)."""

    @property
    def model(self) -> ModelProto:
        """The folded model. Folded initializers are written into it on first access;
        :meth:`save` writes them straight to disk instead, sparing that memory."""
        if self._model is None:
            raise ValueError("the model was released (release_model) after saving")
        if self._replacements:
            from .modelio import as_array, set_tensor_data

            for t in self._model.graph.initializer:
                value = self._replacements.pop(t.name, None)
                if value is not None:
                    set_tensor_data(t, as_array(value))
            self._replacements = {}
        if self._external_unloaded:  # bring the untouched external tensors in too
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(self._model, self.base_dir)
            self._external_unloaded = False
        return self._model

    def stage(self, path: Union[str, "os.PathLike[str]"], *, external_data: Optional[bool] = None):
        """Write the model for ``path`` into a private folder beside it (see :class:`StagedModel`)."""
        from pathlib import Path

        from .modelio import external_files, stage_model

        overwriting_source = self.source is not None and Path(path).resolve() == Path(self.source).resolve()
        avoid = () if overwriting_source else external_files(self._model, self.base_dir)
        return stage_model(self._model, path, external_data=external_data, replacements=self._replacements,
                           base_dir=self.base_dir, avoid=avoid)

    def save(self, path: Union[str, "os.PathLike[str]"], *, external_data: Optional[bool] = None) -> None:
        """Write the folded model to ``path`` atomically."""
        self.stage(path, external_data=external_data).commit()

    def release_model(self) -> None:
        """Free the model's memory once it is saved; records and statistics stay."""
        self._model = None
        self._replacements = {}

    @property
    def folded(self) -> List[BNRecord]:
        return [r for r in self.records if r.folded]

    @property
    def kept(self) -> List[BNRecord]:
        return [r for r in self.records if not r.folded]

    def to_dict(self) -> dict:
        return {
            "bnfold_version": __version__,
            "source": self.source,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "folded": len(self.folded),
            "kept": len(self.kept),
            "records": [r.to_dict() for r in self.records],
            "reparameterized": [{"conv": m.conv, "graph": m.graph, "branches": m.branches} for m in self.merges],
        }


def count(model: ModelProto) -> ModelStats:
    """BN count, node count and weight bytes, over all graphs and functions.

    (``ModelProto.ByteSize`` would cost as much as serializing the model.)
    """
    from .modelio import iter_tensors, tensor_nbytes

    bn = nodes = 0

    def walk(graph_nodes):
        nonlocal bn, nodes
        for n in graph_nodes:
            nodes += 1
            bn += n.op_type == "BatchNormalization" and is_default_domain(n)
            for a in n.attribute:
                if a.HasField("g"):
                    walk(a.g.node)
                for g in a.graphs:
                    walk(g.node)

    walk(model.graph.node)
    for f in model.functions:
        walk(f.node)
    weight_bytes = sum(tensor_nbytes(t) or 0 for t in iter_tensors(model))
    return ModelStats(bn, nodes, weight_bytes)


def fuse(model_or_path: Union[ModelProto, str, "os.PathLike[str]"], *, allow_overridable: bool = False,
         reparameterize: bool = False, inplace: bool = False) -> FuseResult:
    """Fold every foldable inference-mode BatchNormalization of a model.

    ``model_or_path`` is a ``ModelProto`` (copied unless ``inplace``) or a path.
    ``allow_overridable`` treats initializers that are also graph inputs (IR >= 4)
    as constants, as most exporters intend. ``reparameterize`` then merges sums of
    parallel linear branches (RepVGG, MobileOne) into single Convs (see
    :mod:`bnfold.reparam`). Returns the folded model and a record per BN; nothing is
    written to disk.
    """
    source = None
    external = False
    if isinstance(model_or_path, ModelProto):
        model = model_or_path if inplace else copy.deepcopy(model_or_path)
    else:
        from .modelio import load_model_info
        source = os.fspath(model_or_path)
        # external data stays on disk: only the tensors a fold touches are read
        model, external = load_model_info(source, load_external=False)
    before = count(model)
    base_dir = os.path.dirname(os.path.abspath(source)) if source else None
    index = ModelIndex(model, allow_overridable=allow_overridable, base_dir=base_dir)
    folds = _fold_all(index)
    merges = []
    if reparameterize:
        from .reparam import reparameterize as merge_branches

        merges = merge_branches(index, _bn_affine)
        absorbed = {id(bn): m for m in merges for bn in m.absorbed_bns}
        folds = [(bn, _absorbed(rec, absorbed[id(bn)]) if id(bn) in absorbed else rec) for bn, rec in folds]
    records = [rec for _, rec in folds]
    replacements: Dict[str, np.ndarray] = {}
    if any(r.folded for r in records) or merges:
        replacements = index.take_replacements()  # before finish(), which may copy nodes
        index.finish()
        _stamp(model, records, merges)
    return FuseResult(model, replacements, records, before, count(model), source, external, merges, base_dir)


def _absorbed(record: BNRecord, merge) -> BNRecord:
    return BNRecord(record.node, record.graph, True, REPARAMETERIZED, merge.conv, "Conv",
                    detail=f"merged with its parallel branches into Conv '{merge.conv}' (re-parameterised)")


def _stamp(model: ModelProto, records: List[BNRecord], merges: list) -> None:
    """Record provenance in metadata_props (appending to an earlier bnfold entry)."""
    n = sum(r.folded for r in records)
    text = f"fuse {__version__}: folded {n} of {len(records)} BatchNormalization"
    if merges:
        text += f", merged {len(merges)} multi-branch blocks"
    for p in model.metadata_props:
        if p.key == PROVENANCE_KEY:
            p.value = f"{p.value}; {text}"
            return
    model.metadata_props.add(key=PROVENANCE_KEY, value=text)


def _fold_all(index: ModelIndex) -> List[Tuple[NodeProto, BNRecord]]:
    outcome: dict = {}
    order: List[Tuple[Scope, NodeProto]] = [
        (scope, node) for scope in index.scopes for node in scope.nodes
        if node.op_type == "BatchNormalization" and is_default_domain(node)
    ]
    progress = True
    while progress:
        progress = False
        for scope, bn in order:
            key = id(bn)
            if key in outcome and outcome[key].folded:
                continue
            outcome[key] = record = _fold_one(scope, bn)
            progress |= record.folded
    return [(bn, outcome[id(bn)]) for _, bn in order]


def _fold_one(scope: Scope, bn: NodeProto) -> BNRecord:
    try:
        return _try_fold(scope, bn)
    except MalformedModelError as e:
        # Malformed tensor data is the input's defect: a reason, never a traceback. Analysis
        # precedes every edit, so a failure here leaves the model as it was. Any other
        # exception is a bug in bnfold and surfaces as an internal error, never a reason.
        return _kept(scope, bn, Refusal(Reason.UNSUPPORTED_HOST, f"bnfold could not analyse it ({e})"))


def _try_fold(scope: Scope, bn: NodeProto) -> BNRecord:
    label = scope.label_of(bn)
    affine = _bn_affine(scope, bn)
    if isinstance(affine, Refusal):
        return _kept(scope, bn, affine)
    s, t = affine
    back = _fold_backward(scope, bn, s, t)
    if isinstance(back, NodeProto):
        return BNRecord(label, scope.label, True, INTO_PRECEDING, scope.label_of(back), back.op_type,
                        detail=f"folded into the preceding {back.op_type} '{scope.label_of(back)}'")
    producer = scope.producer.get(bn.input[0])
    if back.reason == Reason.NO_HOST and producer is not None and producer.op_type == "Concat" \
            and is_default_domain(producer):
        back = _fold_into_concat(scope, bn, s, t)
        if not isinstance(back, Refusal):
            concat, hosts = back
            names = ", ".join(f"{h.op_type} '{scope.label_of(h)}'" for h in hosts)
            return BNRecord(label, scope.label, True, INTO_PRECEDING, scope.label_of(concat), concat.op_type,
                            detail=f"folded, slice by slice, into the ops feeding Concat "
                                   f"'{scope.label_of(concat)}': {names}")
    fwd = _fold_forward(scope, bn, s, t)
    if isinstance(fwd, NodeProto):
        return BNRecord(label, scope.label, True, INTO_FOLLOWING, scope.label_of(fwd), fwd.op_type,
                        detail=f"folded into the following {fwd.op_type} '{scope.label_of(fwd)}'")
    if back.reason == Reason.NO_HOST and isinstance(fwd, Refusal):
        return _kept(scope, bn, fwd)
    if back.reason == Reason.NO_HOST:
        return _kept(scope, bn, Refusal(Reason.NO_HOST, f"{back.detail}, and {fwd}"))
    return _kept(scope, bn, back)


def _kept(scope: Scope, bn: NodeProto, refusal: Refusal) -> BNRecord:
    label = scope.label_of(bn)
    return BNRecord(label, scope.label, False, reason=refusal.reason,
                    detail=f"BatchNormalization '{label}' kept: {refusal.detail}", why=refusal.detail)


# -- the checks every fold shares ----------------------------------------------------------

PARAM_NAMES = ("scale", "B", "mean", "var")


def _bn_affine(scope: Scope, bn: NodeProto) -> Union[Tuple[np.ndarray, np.ndarray], Refusal]:
    """The BN as ``(s, t)`` in float64, or why it cannot be folded at all."""
    if has_attribute_refs(bn):
        return Refusal(Reason.NOT_CONSTANT, "its attributes are set by the calling function")
    if attr(bn, "training_mode", 0):
        return Refusal(Reason.TRAINING_MODE, "training_mode=1: it normalises with batch statistics")
    extra = [o for o in bn.output[1:] if o]
    if extra:
        return Refusal(Reason.TRAINING_MODE,
                       f"it outputs running or saved statistics ({', '.join(extra)}), which only training produces")
    if len(bn.input) < 5 or not all(bn.input[:5]):
        return Refusal(Reason.INVALID_PARAMETERS, "it does not have the 5 inputs X, scale, B, mean, var")
    params = []
    for pname, name in zip(PARAM_NAMES, bn.input[1:5]):
        c = scope.index.resolve(scope, name)
        if isinstance(c, NotConstant):
            reason = Reason.QUANTIZED_WEIGHT if c.reason == Reason.QUANTIZED_WEIGHT else c.reason
            return Refusal(reason, f"its {pname} {c.why}")
        if c.data_type not in FLOAT_TENSOR_TYPES:
            return Refusal(Reason.UNSUPPORTED_DTYPE, f"its {pname} '{name}' is not a float tensor")
        params.append(c.value)
    if int(attr(bn, "spatial", 1)) == 0 and any(p.ndim != 1 for p in params):
        return Refusal(Reason.SPATIAL_PER_ACTIVATION,
                       "spatial=0 with per-activation parameters: no per-channel affine map exists")
    shapes = {p.shape for p in params}
    if len(shapes) != 1 or params[0].ndim != 1:
        return Refusal(Reason.INVALID_PARAMETERS,
                       f"its parameters are not 1-D vectors of one length (shapes {sorted(shapes)})")
    eps = float(attr(bn, "epsilon", 1e-5))
    var = params[3].astype(np.float64)
    if not all(np.isfinite(p.astype(np.float64)).all() for p in params) or not (var + eps > 0).all():
        return Refusal(Reason.INVALID_PARAMETERS, "its parameters hold non-finite values or var + epsilon <= 0")
    return numerics.bn_affine(params[0], params[1], params[2], var, eps)


def _weight(scope: Scope, node: NodeProto, index: int, what: str) -> Union[Constant, Refusal]:
    name = node.input[index] if index < len(node.input) else ""
    if not name:
        return Refusal(Reason.UNSUPPORTED_HOST, f"{node.op_type} '{scope.label_of(node)}' has no {what}")
    c = scope.index.resolve(scope, name)
    if isinstance(c, NotConstant):
        reason = c.reason if c.reason != Reason.NOT_CONSTANT else Reason.HOST_WEIGHT_NOT_CONSTANT
        return Refusal(reason, f"the {what} of {node.op_type} '{scope.label_of(node)}': {c.why}")
    if c.data_type not in FLOAT_TENSOR_TYPES:
        return Refusal(Reason.UNSUPPORTED_DTYPE,
                       f"the {what} of {node.op_type} '{scope.label_of(node)}' is not a float tensor")
    return c


def _attribute_refs(scope: Scope, nodes: List[NodeProto]) -> Optional[Refusal]:
    for node in nodes:
        if has_attribute_refs(node):
            return Refusal(Reason.UNSUPPORTED_HOST, f"{node.op_type} '{scope.label_of(node)}' takes attributes "
                                                    "from the calling function")
    return None


def _feeds_only(scope: Scope, tensor: str, node: NodeProto, nxt: NodeProto) -> Optional[Refusal]:
    """Refuse unless ``tensor`` (made by ``node``) is read only by ``nxt``."""
    if scope.only_consumer(tensor) is nxt:
        return None
    others = scope.uses(tensor) - 1 - len(scope.shape_readers(tensor))
    where = "is a graph output" if tensor in scope.outputs else f"also feeds {others} other node(s)"
    return Refusal(Reason.HOST_OUTPUT_IN_USE,
                   f"'{tensor}', the output of {node.op_type} '{scope.label_of(node)}', {where}")


def _constant_operand(scope: Scope, node: NodeProto) -> Optional[int]:
    """Index of the single constant input of a binary node, if exactly one is constant."""
    if len(node.input) != 2:
        return None
    consts = [i for i in (0, 1) if isinstance(scope.index.resolve(scope, node.input[i]), Constant)]
    return consts[0] if len(consts) == 1 else None


# -- folding into the op before the BN -----------------------------------------------------

@dataclass
class _Path:
    host: NodeProto
    add: Optional[NodeProto] = None
    add_const: int = -1
    layout: Optional[NodeProto] = None
    chain: List[NodeProto] = field(default_factory=list)  # host .. last node before the BN


def _find_host(scope: Scope, x: str, consumer: NodeProto) -> Union[_Path, Refusal]:
    """The linear op (behind an optional constant Add and Reshape/Flatten) producing ``x``
    for ``consumer``, every tensor on the way read by nothing else."""
    node = scope.producer.get(x)
    if node is None:
        where = "an input of the " + scope.label if x in scope.inputs else "defined outside the " + scope.label
        return Refusal(Reason.NO_HOST, f"'{x}' is {where}")
    layout = add = None
    add_const = -1
    if node.op_type in ("Reshape", "Flatten") and is_default_domain(node):
        layout, node = node, scope.producer.get(node.input[0])
    if node is not None and node.op_type == "Add" and is_default_domain(node):
        k = _constant_operand(scope, node)
        if k is not None:
            add, add_const, node = node, k, scope.producer.get(node.input[1 - k])
    first = layout or add
    if node is None or node.op_type not in BACKWARD_HOSTS or not is_default_domain(node):
        shown = node if node is not None and first is None else first
        return _no_host(scope, shown if shown is not None else scope.producer[x], consumer)
    host_rule = BACKWARD_HOSTS[node.op_type]
    if first is not None and not host_rule.feature_last:
        return Refusal(Reason.NO_HOST if first is add else Reason.CHANNEL_AXIS_MISMATCH,
                       f"a {first.op_type} '{scope.label_of(first)}' sits between {node.op_type} "
                       f"'{scope.label_of(node)}' and the {consumer.op_type}")
    chain = [n for n in (node, add, layout) if n is not None]
    for a, b in zip(chain, chain[1:] + [consumer]):
        refusal = _feeds_only(scope, a.output[0], a, b)
        if refusal:
            return refusal
    return _Path(node, add, add_const, layout, chain)


def _no_host(scope: Scope, node: NodeProto, consumer: NodeProto) -> Refusal:
    label = f"{node.op_type} '{scope.label_of(node)}'"
    upstream = scope.producer.get(node.input[0]) if node.input else None
    behind = upstream is not None and upstream.op_type in BACKWARD_HOSTS
    if node.op_type in ACTIVATIONS and behind:
        return Refusal(Reason.ACTIVATION_BETWEEN,
                       f"the non-linearity {label} sits between {upstream.op_type} "
                       f"'{scope.label_of(upstream)}' and the {consumer.op_type}")
    if node.op_type in LAYOUT_OPS and behind:
        return Refusal(Reason.CHANNEL_AXIS_MISMATCH,
                       f"{label} between {upstream.op_type} '{scope.label_of(upstream)}' and the "
                       f"{consumer.op_type} may move the feature axis off BN's axis 1")
    return Refusal(Reason.NO_HOST, f"'{node.output[0]}' comes from {label}, which is not a foldable linear op")


def _check_feature_axis(scope: Scope, path: _Path, n_out: int) -> Optional[Refusal]:
    """For Gemm/MatMul hosts: prove BN's axis 1 is the host's last (feature) axis."""
    host, layout = path.host, path.layout
    index = scope.index
    host_label = f"{host.op_type} '{scope.label_of(host)}'"
    if layout is None:
        if host.op_type == "Gemm":
            return None
        ranks = [index.rank(host.input[0]), index.rank(host.input[1])]
        out_rank = index.rank(host.output[0])
        if out_rank is None and None not in ranks:
            out_rank = max(ranks)
        if out_rank == 2:
            return None
        if out_rank is None:
            return Refusal(Reason.CHANNEL_AXIS_MISMATCH,
                           f"the rank of {host_label}'s output is unknown, so BN's axis 1 cannot be "
                           "proven to be its feature axis")
        return Refusal(Reason.CHANNEL_AXIS_MISMATCH,
                       f"{host_label} produces a {out_rank}-D tensor with features on the last axis, "
                       "but BN normalises axis 1")
    lay_label = f"{layout.op_type} '{scope.label_of(layout)}'"
    in_rank = index.rank(layout.input[0])
    if layout.op_type == "Reshape":
        shape = index.resolve(scope, layout.input[1]) if len(layout.input) > 1 else None
        if not isinstance(shape, Constant):
            return Refusal(Reason.CHANNEL_AXIS_MISMATCH, f"{lay_label} has a shape computed at run time")
        target = [int(v) for v in np.asarray(shape.value).reshape(-1)]
        keeps = len(target) == 2 and (target[1] == n_out or (
            target[1] == 0 and in_rank == 2 and not attr(layout, "allowzero", 0)))
        if keeps:
            return None
        return Refusal(Reason.CHANNEL_AXIS_MISMATCH,
                       f"{lay_label} to {target} does not keep {host_label}'s {n_out} features on axis 1")
    if in_rank is None:
        return Refusal(Reason.CHANNEL_AXIS_MISMATCH, f"the rank of {lay_label}'s input is unknown")
    axis = int(attr(layout, "axis", 1))
    if axis % max(in_rank, 1) == in_rank - 1 and axis < in_rank:
        return None
    return Refusal(Reason.CHANNEL_AXIS_MISMATCH,
                   f"{lay_label} with axis={axis} merges {host_label}'s features with other axes")


def _check_add_bias(scope: Scope, path: _Path, n_out: int) -> Union[np.ndarray, None, Refusal]:
    """The constant of an Add between host and BN, if it broadcasts along features only."""
    if path.add is None:
        return None
    c = _weight(scope, path.add, path.add_const, "constant operand")
    if isinstance(c, Refusal):
        return c
    b = c.value
    core = b.shape
    while core and core[0] == 1:
        core = core[1:]
    out_rank = scope.index.rank(path.host.output[0]) if b.ndim > 2 else 2
    if core not in ((), (n_out,)) or out_rank is None or b.ndim > out_rank:
        return Refusal(Reason.CHANNEL_AXIS_MISMATCH,
                       f"Add '{scope.label_of(path.add)}' adds a constant of shape {list(b.shape)}, "
                       "not a per-feature bias")
    return b


def _fold_backward(scope: Scope, bn: NodeProto, s: np.ndarray, t: np.ndarray) -> Union[NodeProto, Refusal]:
    path = _find_host(scope, bn.input[0], bn)
    if isinstance(path, Refusal):
        return path
    apply = _plan_into_host(scope, path, s, t)
    if isinstance(apply, Refusal):
        return apply
    apply()
    _replace_bn(scope, bn, path.chain[-1])
    return path.host


def _replace_bn(scope: Scope, bn: NodeProto, last: NodeProto) -> None:
    """Remove ``bn`` and let ``last`` (which produced its input) produce its output."""
    scope.redirect_shape_readers(last.output[0], bn.output[0])
    scope.remove_node(bn)
    scope.rename_output(last, 0, bn.output[0])


def _host_weight(scope: Scope, path: _Path) -> Union[Tuple[BackwardHost, np.ndarray], Refusal]:
    host = path.host
    rule: BackwardHost = BACKWARD_HOSTS[host.op_type]
    refusal = _attribute_refs(scope, path.chain) or rule.check(scope, host)
    if refusal:
        return refusal
    w = _weight(scope, host, rule.weight_index, "weight")
    if isinstance(w, Refusal):
        return w
    if w.value.ndim < 2:
        return Refusal(Reason.UNSUPPORTED_HOST, f"the weight of {host.op_type} '{scope.label_of(host)}' is not a matrix")
    return rule, w.value


def _scaled_weight(w: np.ndarray, factor: np.ndarray, dtype) -> Union[np.ndarray, Callable[[], np.ndarray]]:
    """``w * factor`` rounded once, or raise FoldOverflow. A weight mapped from external data
    is only checked here (without computing the product); its values come later, computed
    block by block as the output is written, unless something needs them as an array."""
    if isinstance(w, np.memmap):
        numerics.check_scale_fits(w, factor, dtype, "the folded weight")
        return lambda: numerics.scale_round(w, factor, dtype, "the folded weight")
    return numerics.scale_round(w, factor, dtype, "the folded weight")


def _plan_into_host(scope: Scope, path: _Path, s: np.ndarray, t: np.ndarray) -> Union[Callable[[], None], Refusal]:
    """Check and compute folding ``s * x + t`` into the host of ``path``; return the edit.

    Nothing changes until the returned function is called.
    """
    found = _host_weight(scope, path)
    if isinstance(found, Refusal):
        return found
    rule, w_val = found
    host = path.host
    n_out = rule.out_channels(host, w_val)
    if rule.feature_last:
        refusal = _check_feature_axis(scope, path, n_out)
        if refusal:
            return refusal
    if n_out != s.shape[0]:
        return Refusal(Reason.CHANNEL_COUNT_MISMATCH,
                       f"{host.op_type} '{scope.label_of(host)}' has {n_out} output channels, the BN {s.shape[0]}")
    add_bias = _check_add_bias(scope, path, n_out)
    if isinstance(add_bias, Refusal):
        return add_bias
    host_bias = None
    has_bias_slot = rule.bias_index is not None
    if has_bias_slot and len(host.input) > rule.bias_index and host.input[rule.bias_index]:
        c = _weight(scope, host, rule.bias_index, "bias")
        if isinstance(c, Refusal):
            return c
        host_bias = rule.effective_bias(host, c.value)
    dtype = w_val.dtype
    new_host_bias = new_add = None
    try:
        factor = rule.weight_factor(host, w_val, s)
        new_w = _scaled_weight(w_val, factor, dtype)
        if path.add is not None:  # the Add carries the shift; the host's own bias is only scaled
            new_add = numerics.round_to(numerics.fold_bias(add_bias, s, t), dtype, "the folded bias")
            if host_bias is not None:
                new_host_bias = numerics.round_to(host_bias * s, dtype, "the folded bias")
        elif has_bias_slot:
            new_host_bias = numerics.round_to(numerics.fold_bias(host_bias, s, t), dtype, "the folded bias")
        else:
            new_add = numerics.round_to(t, dtype, "the folded bias")
    except numerics.FoldOverflow as e:
        return Refusal(Reason.OVERFLOW, f"folding into {host.op_type} '{scope.label_of(host)}': {e}")

    def apply() -> None:
        host_label = _name_base(host)
        scope.write_constant(host, rule.weight_index, new_w, f"{host_label}_weight_bnfold", factor=factor)
        if new_host_bias is not None:
            scope.write_constant(host, rule.bias_index, new_host_bias, f"{host_label}_bias_bnfold")
            rule.after_fold(scope, host)
        if path.add is not None:
            scope.write_constant(path.add, path.add_const, new_add, f"{host_label}_bias_bnfold")
        elif not has_bias_slot:
            _insert_bias_add(scope, host, new_add, path.chain)

    return apply


def _fold_into_concat(scope: Scope, bn: NodeProto, s: np.ndarray,
                      t: np.ndarray) -> Union[Tuple[NodeProto, List[NodeProto]], Refusal]:
    """BN after a channel Concat of linear ops: fold one slice of the BN into each op."""
    concat = scope.producer[bn.input[0]]
    label = f"Concat '{scope.label_of(concat)}'"
    refusal = _feeds_only(scope, concat.output[0], concat, bn)
    if refusal:
        return refusal
    if len(set(concat.input)) != len(concat.input):
        return Refusal(Reason.NO_HOST, f"{label} concatenates one tensor more than once")
    paths, sizes = [], []
    for k, x in enumerate(concat.input):
        path = _find_host(scope, x, concat)
        found = path if isinstance(path, Refusal) else _host_weight(scope, path)
        if isinstance(found, Refusal):
            return Refusal(found.reason, f"input {k} of {label}: {found.detail}")
        rule, w_val = found
        paths.append(path)
        sizes.append(rule.out_channels(path.host, w_val))
        rank = 2 if rule.feature_last else w_val.ndim
    axis = int(attr(concat, "axis", 1))
    if axis not in (1, 1 - rank):
        return Refusal(Reason.CHANNEL_AXIS_MISMATCH, f"{label} joins axis {axis}, not BN's channel axis 1")
    if sum(sizes) != s.shape[0]:
        return Refusal(Reason.CHANNEL_COUNT_MISMATCH,
                       f"the inputs of {label} have {sum(sizes)} channels, the BN {s.shape[0]}")
    edges = np.cumsum([0] + sizes)
    applies = []
    for k, (path, a, b) in enumerate(zip(paths, edges, edges[1:])):
        apply = _plan_into_host(scope, path, s[a:b], t[a:b])
        if isinstance(apply, Refusal):
            return Refusal(apply.reason, f"input {k} of {label}: {apply.detail}")
        applies.append(apply)
    for apply in applies:
        apply()
    _replace_bn(scope, bn, concat)
    return concat, [p.host for p in paths]


def _name_base(node: NodeProto) -> str:
    """Prefix for tensors generated for ``node``: its name, else its output's."""
    return node.name or node.output[0]


def _insert_bias_add(scope: Scope, host: NodeProto, bias: np.ndarray, chain: List[NodeProto]) -> None:
    """Give a MatMul a following ``Add`` carrying the folded bias."""
    label = _name_base(host)
    out = host.output[0]
    scope.rename_output(host, 0, scope.index.fresh_name(f"{out}_matmul"))
    add = helper.make_node("Add", [host.output[0], ""], [out], name=scope.index.fresh_name(f"{label}_bias_add"))
    if scope.opset < 7:
        add.attribute.append(helper.make_attribute("broadcast", 1))  # Add-6 broadcasts only when told to
    scope.add_node_after(host, add)
    scope.write_constant(add, 1, bias, f"{label}_bias_bnfold")
    chain.insert(1, add)


# -- folding into the op after the BN ------------------------------------------------------

def _fold_forward(scope: Scope, bn: NodeProto, s: np.ndarray, t: np.ndarray) -> Union[NodeProto, Refusal, str]:
    """Fold into the single following Conv/Gemm; a string says why there is no candidate."""
    y = bn.output[0]
    nxt = scope.only_consumer(y)
    if nxt is None:
        n = scope.uses(y)
        return "its output is a graph output" if y in scope.outputs else f"its output feeds {n} nodes"
    rule = FORWARD_HOSTS.get(nxt.op_type) if is_default_domain(nxt) else None
    if rule is None or nxt.input[0] != y or y in nxt.input[1:]:
        return f"its output feeds {nxt.op_type} '{scope.label_of(nxt)}', not the data input of a Conv or Gemm"
    w = _attribute_refs(scope, [nxt]) or _weight(scope, nxt, 1, "weight")
    if isinstance(w, Refusal):
        return w
    w_val = w.value
    refusal = rule.check(scope, nxt, w_val)
    if refusal:
        return refusal
    if rule.in_channels(nxt, w_val) != s.shape[0]:
        return Refusal(Reason.CHANNEL_COUNT_MISMATCH,
                       f"{nxt.op_type} '{scope.label_of(nxt)}' reads {rule.in_channels(nxt, w_val)} channels, "
                       f"the BN has {s.shape[0]}")
    bias = None
    if len(nxt.input) > 2 and nxt.input[2]:
        c = _weight(scope, nxt, 2, "bias")
        if isinstance(c, Refusal):
            return c
        bias = c.value
    dtype = w_val.dtype
    try:
        factor, b64 = rule.fold(nxt, w_val, bias, s, t)
        new_w = _scaled_weight(w_val, factor, dtype)
        new_b = numerics.round_to(b64, dtype, "the folded bias")
    except numerics.FoldOverflow as e:
        return Refusal(Reason.OVERFLOW, f"folding into {nxt.op_type} '{scope.label_of(nxt)}': {e}")
    label = _name_base(nxt)
    scope.write_constant(nxt, 1, new_w, f"{label}_weight_bnfold", factor=factor)
    scope.write_constant(nxt, 2, new_b, f"{label}_bias_bnfold")
    rule.after_fold(scope, nxt)
    scope.redirect_shape_readers(bn.output[0], bn.input[0])
    scope.set_input(nxt, 0, bn.input[0])
    scope.remove_node(bn)
    return nxt
