"""The fold driver: find every BatchNormalization, fold it or say why not.

For each inference-mode BN (in the main graph, control-flow bodies and model-local
functions) the driver:

1. checks what every fold needs: inference mode, per-channel constant parameters
   with sane values (:func:`_bn_affine`);
2. tries the op *before* it (:func:`_fold_backward`): a host from
   :data:`bnfold.hosts.RULES`, possibly behind one constant ``Add``, value-preserving
   ops (Identity, inference Dropout, same-type Cast) and layout ops that provably
   keep the feature axis on BN's axis 1 (:func:`_track_features`); or, behind a
   channel Concat, one host per slice (:func:`_fold_into_concat`);
3. otherwise tries the op *after* it (:func:`_fold_forward`), directly or behind a
   Flatten from axis 1 for hosts reading ``[N, K]`` features;
4. folds BNs already decomposed into a per-channel ``Mul`` (+ ``Add``) of constants
   the same way (:func:`_fold_decomposed`), recorded apart;
5. repeats until nothing changes, so chains (Conv -> BN -> BN) fold completely.

Weights and parameters computed from constants only are evaluated by
:meth:`bnfold.graph.ModelIndex.resolve`.

Every BN left in place gets a :class:`BNRecord` with a :class:`Reason` and a
sentence naming the node. Weights are computed in float64 and rounded once to the
host's dtype; a fold whose result would overflow that dtype is refused.

Naming: *fuse* is what a user asks of a model (``bnfold fuse``, :func:`fuse`, :class:`FuseResult`);
*fold* is what happens to each BN (this module, :class:`BNRecord` ``folded``, the reasons a BN is
not folded). The module is not called ``fuse``: a submodule ``bnfold.fuse`` would shadow the
function ``bnfold.fuse`` once imported.
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
from onnx import ModelProto, NodeProto

from . import __version__, numerics
from .errors import MalformedModelError, SourceChangedError
from .graph import FLOAT_TENSOR_TYPES, Constant, ModelIndex, Scope, attr, has_attribute_refs, is_default_domain
from .hosts import (ACTIVATIONS, CONV, LAYOUT_OPS, PASS_THROUGH, HostRule, backward_rule, forward_rule, host_names,
                    name_base)
from .modelio.pending import PendingValue, as_array, scale_checked
from .modelio.tensors import (external_files, in_model_file, iter_tensors, path_identity, read_tensor,
                              set_tensor_data, tensor_nbytes)
from .reasons import Reason, Refusal

if TYPE_CHECKING:
    from .modelio.write import StagedModel
    from .reparam import Merge

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

    def __init__(self, model: ModelProto, replacements: Dict[str, PendingValue], records: List[BNRecord],
                 before: ModelStats, after: ModelStats, source: Optional[str] = None,
                 source_external_data: bool = False, merges: Optional[list] = None,
                 base_dir: Optional[str] = None, unmerged: Optional[List[Refusal]] = None,
                 decomposed: Optional[List[BNRecord]] = None, source_identity: Optional[str] = None,
                 data_identities: Optional[Dict[str, str]] = None) -> None:
        self._model = model
        self._released = False
        self._replacements = replacements
        self.records = records
        self.before = before
        self.after = after
        self.source = source
        self.source_external_data = source_external_data
        """Whether the source file kept its weights in external data."""
        self.source_identity = source_identity
        """The source file's identity as it was read (:func:`bnfold.modelio.tensors.file_identity`)."""
        self.data_identities = data_identities or {}
        """Each external data file of the source (its path) and its identity when the model was loaded."""
        self._external_unloaded = source_external_data  # untouched tensors still on disk
        self.base_dir = base_dir
        self.merges = merges or []
        """Multi-branch blocks merged into one Conv (:class:`bnfold.reparam.Merge`)."""
        self.unmerged = unmerged
        self.decomposed = decomposed or []
        """BNs already decomposed into a per-channel ``Mul`` (+ ``Add``) of constants after a host:
        one record each, ``node`` naming the Mul (not counted in ``records``)."""
        """With ``reparameterize``: why each candidate block was not merged; None when not asked."""

    def to_model(self) -> ModelProto:
        """The folded model as one in-memory ``ModelProto``.

        The first call writes the folded initializers into it and, when the source kept
        its weights in external data, reads the untouched ones from disk, so the result is
        self-contained (and as large as the model). :meth:`save` and :meth:`stage` stream
        the weights to disk instead, sparing that memory. Later calls return the same object.
        """
        if self._released:
            raise ValueError("the model was released (release_model) after saving")
        if self._replacements:
            for t in self._model.graph.initializer:
                value = self._replacements.pop(t.name, None)
                if value is not None:
                    set_tensor_data(t, as_array(value))
            self._replacements = {}
        for t in self._model.graph.initializer:  # weights left in the model file at load
            if in_model_file(t):
                set_tensor_data(t, read_tensor(t, self.base_dir))
        if self._external_unloaded:  # bring the untouched external tensors in too
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(self._model, self.base_dir or "")
            self._external_unloaded = False
        return self._model

    def stage(self, path: Union[str, "os.PathLike[str]"], *, external_data: Optional[bool] = None) -> StagedModel:
        """Write the model for ``path`` into a private folder beside it (see :class:`StagedModel`).

        New files take the source model's mode (a replaced file keeps its own)."""
        from .modelio.write import stage_model

        if self._released:
            raise ValueError("the model was released (release_model) after saving")
        overwriting_source = self.source is not None and Path(path).resolve() == Path(self.source).resolve()
        avoid = () if overwriting_source else external_files(self._model, self.base_dir)
        with _source_named(self.source):
            return stage_model(self._model, path, external_data=external_data, replacements=self._replacements,
                               base_dir=self.base_dir, avoid=avoid, source=self.source)

    def source_unchanged(self) -> bool:
        """Whether the source file and its external data files are still the ones that were read
        (True when there is none to compare: a model given in memory, a pipe)."""
        return self.changed_input() is None

    def changed_input(self) -> Optional[str]:
        """The first input file (the source model, then its external data files) that is no longer
        the one read: replaced, rewritten or removed since; None if none is."""
        files = dict(self.data_identities)
        if self.source is not None and self.source_identity is not None:
            files = {self.source: self.source_identity, **files}
        return next((path for path, identity in files.items() if path_identity(path) != identity), None)

    def save(self, path: Union[str, "os.PathLike[str]"], *, external_data: Optional[bool] = None) -> None:
        """Write the folded model to ``path`` atomically."""
        self.stage(path, external_data=external_data).commit()

    def release_model(self) -> None:
        """Free the model's memory once it is saved; records and statistics stay."""
        self._model = ModelProto()
        self._released = True
        self._replacements = {}

    @property
    def skeleton(self) -> ModelProto:
        """The folded model's protobuf as it stands, for reading only: its graph's inputs, outputs and
        nodes, without the folded weights (pending until written) or the external ones (on disk)."""
        if self._released:
            raise ValueError("the model was released (release_model) after saving")
        return self._model

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
            **({"decomposed_bn": [r.to_dict() for r in self.decomposed]} if self.decomposed else {}),
            **({} if self.unmerged is None else
               {"not_reparameterized": [{"reason": r.reason.value, "detail": r.detail} for r in self.unmerged]}),
        }


def count(model: ModelProto) -> ModelStats:
    """BN count, node count and weight bytes, over all graphs and functions.

    (``ModelProto.ByteSize`` would cost as much as serializing the model.)
    """
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
    return _fuse(model_or_path, allow_overridable=allow_overridable, reparameterize=reparameterize,
                 inplace=inplace, defer_range_checks=False)


def fuse_to_write(path: Union[str, "os.PathLike[str]"], *, allow_overridable: bool = False,
                  reparameterize: bool = False) -> FuseResult:
    """:func:`fuse` for a caller that writes the result at once (the workflow; not part of the
    public API): a fold into a weight in an external data file is recorded without reading the
    weight to check that the fold fits its dtype; the write computes it, and raises
    :class:`~bnfold.numerics.DeferredOverflow` if it does not fit, on which the caller folds
    again with :func:`fuse`, which refuses that fold with its reason. One read of such weights
    instead of two."""
    return _fuse(path, allow_overridable=allow_overridable, reparameterize=reparameterize, inplace=False,
                 defer_range_checks=True)


def _fuse(model_or_path: Union[ModelProto, str, "os.PathLike[str]"], *, allow_overridable: bool,
          reparameterize: bool, inplace: bool, defer_range_checks: bool) -> FuseResult:
    source = identity = None
    data_identities: Dict[str, str] = {}
    external = False
    if isinstance(model_or_path, ModelProto):
        model = model_or_path if inplace else copy.deepcopy(model_or_path)
    else:
        from .modelio.load import load_source

        source = os.fspath(model_or_path)
        # external data stays on disk: only the tensors a fold touches are read
        model, external, identity = load_source(source, load_external=False, leave_weights=True)
    base_dir = os.path.dirname(os.path.abspath(source)) if source else None
    if identity is not None:  # before any weight is read (one that does not exist is reported when read)
        data_identities = {str(f): i for f in sorted(external_files(model, base_dir))
                           if (i := path_identity(f)) is not None}
    before = count(model)
    index = ModelIndex(model, allow_overridable=allow_overridable, base_dir=base_dir,
                       defer_range_checks=defer_range_checks)
    with _source_named(source):
        folds, decomposed = _fold_all(index)
    merges: List[Merge] = []
    unmerged = None
    if reparameterize:
        from .reparam import reparameterize as merge_branches

        merges, unmerged = merge_branches(index, _bn_affine)
        absorbed = {id(bn): m for m in merges for bn in m.absorbed_bns}
        folds = [(bn, _absorbed(rec, absorbed[id(bn)]) if id(bn) in absorbed else rec) for bn, rec in folds]
    records = [rec for _, rec in folds]
    replacements: Dict[str, PendingValue] = {}
    if any(r.folded for r in records + decomposed) or merges:
        replacements = index.take_replacements()  # before finish(), which may copy nodes
        index.finish()
        _stamp(model, records, merges)
    return FuseResult(model, replacements, records, before, count(model), source, external, merges, base_dir,
                      unmerged, decomposed, source_identity=identity, data_identities=data_identities)


@contextlib.contextmanager
def _source_named(source: Optional[str]) -> Iterator[None]:
    """A weight read from the model file found the file changed: say so naming the model as the
    caller gave it (the reader knows only the absolute path it opened)."""
    try:
        yield
    except SourceChangedError:
        if source is None:
            raise
        raise SourceChangedError(source) from None


def _absorbed(record: BNRecord, merge) -> BNRecord:
    return BNRecord(record.node, record.graph, True, REPARAMETERIZED, merge.conv, CONV.op_type,
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


def _fold_all(index: ModelIndex) -> Tuple[List[Tuple[NodeProto, BNRecord]], List[BNRecord]]:
    """Fold BNs, and BNs already decomposed into Mul/Add (:func:`_fold_decomposed`), until
    nothing changes; return the BN records and the decomposed ones."""
    outcome: dict = {}
    order: List[Tuple[Scope, NodeProto]] = [
        (scope, node) for scope in index.scopes for node in scope.nodes
        if node.op_type == "BatchNormalization" and is_default_domain(node)
    ]
    muls: List[Tuple[Scope, NodeProto]] = [
        (scope, node) for scope in index.scopes for node in scope.nodes
        if node.op_type == "Mul" and is_default_domain(node) and len(node.input) == 2
    ]
    affine: Dict[int, BNRecord] = {}
    progress = True
    while progress:
        progress = False
        for scope, bn in order:
            key = id(bn)
            if key in outcome and outcome[key].folded:
                continue
            outcome[key] = record = _fold_one(scope, bn)
            progress |= record.folded
        for scope, mul in muls:
            if id(mul) in affine and affine[id(mul)].folded or id(mul) in scope.removed:
                continue
            rec = _fold_decomposed(scope, mul)
            if rec is not None:
                affine[id(mul)] = rec
                progress |= rec.folded
    return [(bn, outcome[id(bn)]) for _, bn in order], [affine[id(m)] for _, m in muls if id(m) in affine]


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
        sliced = _fold_into_concat(scope, bn, s, t)
        if not isinstance(sliced, Refusal):
            concat, hosts = sliced
            names = ", ".join(f"{h.op_type} '{scope.label_of(h)}'" for h in hosts)
            return BNRecord(label, scope.label, True, INTO_PRECEDING, scope.label_of(concat), concat.op_type,
                            detail=f"folded, slice by slice, into the ops feeding Concat "
                                   f"'{scope.label_of(concat)}': {names}")
        back = sliced  # why the Concat's inputs do not fold
    fwd = _fold_forward(scope, bn, s, t)
    if isinstance(fwd, NodeProto):
        return BNRecord(label, scope.label, True, INTO_FOLLOWING, scope.label_of(fwd), fwd.op_type,
                        detail=f"folded into the following {fwd.op_type} '{scope.label_of(fwd)}'")
    if isinstance(fwd, Refusal) and (back.reason == Reason.NO_HOST or fwd.reason == Reason.FOLLOWING_CONV_PADDED):
        # a following Conv that pads is the reason that matters, whatever precedes the BN
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
        if isinstance(c, Refusal):
            reason = Reason.QUANTIZED_WEIGHT if c.reason == Reason.QUANTIZED_WEIGHT else c.reason
            return Refusal(reason, f"its {pname} {c.detail}")
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
    with np.errstate(invalid="ignore"):  # a signalling NaN (corrupt data) warns as it is cast: it is refused below
        var = params[3].astype(np.float64)
        finite = all(np.isfinite(p.astype(np.float64)).all() for p in params)
    if not finite or not (var + eps > 0).all():
        return Refusal(Reason.INVALID_PARAMETERS, "its parameters hold non-finite values or var + epsilon <= 0")
    return numerics.bn_affine(params[0], params[1], params[2], var, eps)


def _weight(scope: Scope, node: NodeProto, index: int, what: str) -> Union[Constant, Refusal]:
    name = node.input[index] if index < len(node.input) else ""
    if not name:
        return Refusal(Reason.UNSUPPORTED_HOST, f"{node.op_type} '{scope.label_of(node)}' has no {what}")
    c = scope.index.resolve(scope, name)
    if isinstance(c, Refusal):
        reason = c.reason if c.reason != Reason.NOT_CONSTANT else Reason.HOST_WEIGHT_NOT_CONSTANT
        return Refusal(reason, f"the {what} of {node.op_type} '{scope.label_of(node)}': {c.detail}")
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

# Ops the backward search walks through between a host and its BN: layout ops whose
# effect on the feature axis is tracked (:func:`_track_features`), value-preserving
# ops, and one constant Add (a bias).
WALK_LAYOUT = LAYOUT_OPS
WALK_PASS_THROUGH = PASS_THROUGH


@dataclass
class _Path:
    host: NodeProto
    rule: HostRule
    add: Optional[NodeProto] = None
    add_const: int = -1
    chain: List[NodeProto] = field(default_factory=list)  # host .. last node before the BN


def _passes_values(scope: Scope, node: NodeProto) -> bool:
    """An op between host and BN that leaves values untouched at inference."""
    if node.op_type not in WALK_PASS_THROUGH:
        return False
    if node.op_type == "Dropout":  # inference mode: no training_mode input, or a constant false one
        if len(node.output) > 1 and node.output[1]:
            return False
        if len(node.input) > 2 and node.input[2]:
            mode = scope.index.resolve(scope, node.input[2])
            return isinstance(mode, Constant) and not bool(np.asarray(mode.value).any())
        return scope.opset >= 7 or attr(node, "is_test", 0) == 1  # Dropout-6 and older: is_test
    if node.op_type == "Cast":  # only to the type it already has
        src = scope.index.elem_type(node.input[0])
        return src is not None and src == attr(node, "to")
    return True


def _find_host(scope: Scope, x: str, consumer: NodeProto) -> Union[_Path, Refusal]:
    """The host op producing ``x`` for ``consumer``, behind layout ops, value-preserving ops
    and one constant Add, every tensor on the way read by nothing else."""
    node = scope.producer.get(x)
    if node is None:
        where = "an input of the " + scope.label if x in scope.inputs else "defined outside the " + scope.label
        return Refusal(Reason.NO_HOST, f"'{x}' is {where}")
    between: List[NodeProto] = []  # BN-side first
    add = None
    add_const = -1
    while node is not None and is_default_domain(node) and backward_rule(node) is None and node.input:
        if node.op_type in WALK_LAYOUT or _passes_values(scope, node):
            between.append(node)
            node = scope.producer.get(node.input[0])
            continue
        k = _constant_operand(scope, node) if node.op_type == "Add" and add is None else None
        if k is None:
            break
        add, add_const = node, k
        between.append(node)
        node = scope.producer.get(node.input[1 - k])
    rule = backward_rule(node)
    if node is None or rule is None:  # name the node the search stopped at
        shown = node if node is not None else (between[-1] if between else scope.producer[x])
        return _no_host(scope, shown, consumer)
    chain: List[NodeProto] = [node] + between[::-1]
    for a, b in zip(chain, chain[1:] + [consumer]):
        refusal = _feeds_only(scope, a.output[0], a, b)
        if refusal:
            return refusal
    return _Path(node, rule, add, add_const, chain)


def _no_host(scope: Scope, node: NodeProto, consumer: NodeProto) -> Refusal:
    label = f"{node.op_type} '{scope.label_of(node)}'"
    upstream = scope.producer.get(node.input[0]) if node.input else None
    if upstream is None or backward_rule(upstream) is None:
        pass
    elif node.op_type in ACTIVATIONS:
        return Refusal(Reason.ACTIVATION_BETWEEN,
                       f"the non-linearity {label} sits between {upstream.op_type} "
                       f"'{scope.label_of(upstream)}' and the {consumer.op_type}")
    elif node.op_type in LAYOUT_OPS:
        return Refusal(Reason.CHANNEL_AXIS_MISMATCH,
                       f"{label} between {upstream.op_type} '{scope.label_of(upstream)}' and the "
                       f"{consumer.op_type} may move the feature axis off BN's axis 1")
    return Refusal(Reason.NO_HOST, f"'{node.output[0]}' comes from {label}, which is not a foldable linear op")


def _prod(dims: List[Optional[int]]) -> Optional[int]:
    known = [d for d in dims if d is not None]
    if len(known) != len(dims):
        return None
    return int(np.prod(known, dtype=np.int64)) if known else 1


def _int_list(scope: Scope, node: NodeProto, attr_name: str, input_index: int) -> Optional[List[int]]:
    """An int-list operand given as attribute (older opsets) or constant input (newer)."""
    value = attr(node, attr_name)
    if value is not None:
        return [int(v) for v in value]
    if len(node.input) > input_index and node.input[input_index]:
        c = scope.index.resolve(scope, node.input[input_index])
        if isinstance(c, Constant):
            return [int(v) for v in np.asarray(c.value).reshape(-1)]
    return None


@dataclass
class _Features:
    """Where the host's features are in a tensor on the way to the BN."""

    dims: List[Optional[int]]  # the tensor's dims, None where unknown
    axis: int  # the axis holding all n features, alone


def _track_step(scope: Scope, node: NodeProto, f: _Features, n: int) -> Union[_Features, str]:
    """The features after ``node``, or why they cannot be proven to stay on one axis."""
    dims, axis, rank = f.dims, f.axis, len(f.dims)
    op = node.op_type
    if op == "Transpose":
        perm = [int(p) for p in attr(node, "perm", list(range(rank))[::-1])]
        if sorted(perm) != list(range(rank)):
            return f"its perm {perm} does not fit a {rank}-D input"
        return _Features([dims[p] for p in perm], perm.index(axis))
    if op == "Flatten":
        k = int(attr(node, "axis", 1))
        k = k + rank if k < 0 else k
        left, right = dims[:k], dims[k:]
        group, new_axis, at = (left, 0, axis) if axis < k else (right, 1, axis - k)
        if any(d != 1 for i, d in enumerate(group) if i != at):
            return f"with axis={attr(node, 'axis', 1)} it merges the features with other axes"
        return _Features([_prod(left), _prod(right)], new_axis)
    if op == "Unsqueeze":
        axes = _int_list(scope, node, "axes", 1)
        if axes is None:
            return "its axes are computed at run time"
        out_rank = rank + len(axes)
        axes = sorted(a + out_rank if a < 0 else a for a in axes)
        new_dims = list(dims)
        for a in axes:
            new_dims.insert(a, 1)
        kept = [i for i in range(out_rank) if i not in axes]
        return _Features(new_dims, kept[axis])
    if op == "Squeeze":
        axes = _int_list(scope, node, "axes", 1)
        if axes is None:
            if any(d is None for d in dims):
                return "it squeezes axes whose sizes are unknown"
            axes = [i for i, d in enumerate(dims) if d == 1]
        axes = [a + rank if a < 0 else a for a in axes]
        if axis in axes:
            return "it removes the feature axis"
        return _Features([d for i, d in enumerate(dims) if i not in axes], axis - sum(a < axis for a in axes))
    if op == "Reshape":
        shape = scope.index.resolve(scope, node.input[1]) if len(node.input) > 1 else None
        if not isinstance(shape, Constant):
            return "it has a shape computed at run time"
        target = [int(v) for v in np.asarray(shape.value).reshape(-1)]
        allowzero = attr(node, "allowzero", 0)
        out: List[Optional[int]] = []
        for i, v in enumerate(target):
            if v == 0 and not allowzero:
                out.append(dims[i] if i < rank else None)
            else:
                out.append(None if v < 0 else v)
        # The element count is kept, so the features stay alone on axis b exactly when
        # out[b] == n and the dims after b hold as many elements as those after the axis.
        tail = _prod(dims[axis + 1:])
        hits = [b for b, d in enumerate(out) if d == n and tail is not None and _prod(out[b + 1:]) == tail]
        if len(hits) != 1:
            return f"to {target} it does not keep the {n} features on one axis"
        return _Features(out, hits[0])
    return f


def _track_features(scope: Scope, path: _Path, n_out: int,
                    w: np.ndarray) -> Union[Tuple[int, int, List[_Features]], Refusal]:
    """Follow the host's feature axis through the chain to the BN (or Concat) input.

    Returns ``(rank, axis)`` there and the features at each chain node's output.
    """
    host, rule = path.host, path.rule
    host_label = f"{host.op_type} '{scope.label_of(host)}'"
    rank = rule.output_rank(scope.index, host, w)
    if rank is None:
        return Refusal(Reason.CHANNEL_AXIS_MISMATCH,
                       f"the rank of {host_label}'s output is unknown, so BN's axis 1 cannot be "
                       "proven to be its feature axis")
    axis = rule.feature_axis(host, w) % rank
    # shape inference only when a layout op needs the dims (a plain Conv -> BN never does)
    needs_dims = any(n.op_type in WALK_LAYOUT for n in path.chain[1:])
    known = scope.index.shape(host.output[0]) if needs_dims else None
    dims: List[Optional[int]] = list(known) if known is not None and len(known) == rank else [None] * rank
    dims[axis] = n_out
    f = _Features(dims, axis)
    steps = [f]
    for node in path.chain[1:]:
        if node.op_type in WALK_LAYOUT:
            nxt = _track_step(scope, node, f, n_out)
            if isinstance(nxt, str):
                return Refusal(Reason.CHANNEL_AXIS_MISMATCH,
                               f"{node.op_type} '{scope.label_of(node)}' after {host_label}: {nxt}")
            f = nxt
        steps.append(f)
    return len(f.dims), f.axis, steps


def _check_add_bias(scope: Scope, path: _Path, n_out: int,
                    steps: List[_Features]) -> Union[Tuple[np.ndarray, Tuple[int, ...]], None, Refusal]:
    """The constant of an Add between host and BN as a per-feature vector (float64) and the
    shape to store it in, if it broadcasts along the features only."""
    if path.add is None:
        return None
    c = _weight(scope, path.add, path.add_const, "constant operand")
    if isinstance(c, Refusal):
        return c
    b = np.asarray(c.value)
    f = steps[path.chain.index(path.add) - 1]  # the features at the Add's other input
    rank = len(f.dims)
    lead = rank - b.ndim  # the constant lines up with the trailing axes
    ok = lead >= 0 and all(d == 1 or (lead + i == f.axis and d == n_out) for i, d in enumerate(b.shape))
    if not ok:
        return Refusal(Reason.CHANNEL_AXIS_MISMATCH,
                       f"Add '{scope.label_of(path.add)}' adds a constant of shape {list(b.shape)}, "
                       "not a per-feature bias")
    vec = np.broadcast_to(b.astype(np.float64).reshape(-1) if b.size == n_out else b.astype(np.float64).reshape(-1)[:1],
                          (n_out,))
    store = tuple([n_out] + [1] * (rank - 1 - f.axis))  # features on f.axis, broadcasting over the rest
    return vec, store


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


def _host_weight(scope: Scope, path: _Path) -> Union[np.ndarray, Refusal]:
    host, rule = path.host, path.rule
    refusal = _attribute_refs(scope, path.chain) or rule.check(scope, host)
    if refusal:
        return refusal
    w = _weight(scope, host, rule.weight_slot, "weight")
    if isinstance(w, Refusal):
        return w
    if w.value.ndim < 2:
        return Refusal(Reason.UNSUPPORTED_HOST,
                       f"the weight of {host.op_type} '{scope.label_of(host)}' is not a matrix")
    return w.value


def _scaled_weight(scope: Scope, w: np.ndarray, factor: np.ndarray, dtype: np.dtype) -> PendingValue:
    """``w * factor`` rounded once, or raise FoldOverflow. A weight mapped from external data
    is only checked here (without computing the product), or not even that when the index
    defers range checks to the write; its values come later, computed block by block as the
    output is written, unless something needs them as an array."""
    if isinstance(w, np.memmap):
        checked = not scope.index.defer_range_checks
        if checked:
            numerics.check_scale_fits(w, factor, dtype, "the folded weight")
        return lambda: scale_checked(w, factor, dtype, checked)
    return numerics.scale_round(w, factor, dtype, "the folded weight")


def _plan_into_host(scope: Scope, path: _Path, s: np.ndarray, t: np.ndarray, want_axis: int = 1,
                    min_rank: int = 2) -> Union[Callable[[], None], Refusal]:
    """Check and compute folding ``s * x + t`` into the host of ``path``; return the edit.

    ``want_axis`` is the axis the features must reach at the end of the chain (BN's 1;
    negative counts from the end); the tensor there must have at least ``min_rank`` axes.
    Nothing changes until the returned function is called.
    """
    w_val = _host_weight(scope, path)
    if isinstance(w_val, Refusal):
        return w_val
    host, rule = path.host, path.rule
    n_out = rule.out_channels(host, w_val)
    tracked = _track_features(scope, path, n_out, w_val)
    if isinstance(tracked, Refusal):
        return tracked
    rank, axis, steps = tracked
    if rank < min_rank or axis != want_axis % rank:
        return Refusal(Reason.CHANNEL_AXIS_MISMATCH,
                       f"{host.op_type} '{scope.label_of(host)}' puts its features on axis {axis} of a {rank}-D "
                       f"tensor, but the {'BN normalises' if want_axis == 1 else 'constants scale'} axis {want_axis}")
    if n_out != s.shape[0]:
        return Refusal(Reason.CHANNEL_COUNT_MISMATCH,
                       f"{host.op_type} '{scope.label_of(host)}' has {n_out} output channels, the BN {s.shape[0]}")
    add_bias = _check_add_bias(scope, path, n_out, steps)
    if isinstance(add_bias, Refusal):
        return add_bias
    host_bias = None
    bias_slot = rule.bias_slot
    has_bias_slot = bias_slot is not None
    if bias_slot is not None and len(host.input) > bias_slot and host.input[bias_slot]:
        c = _weight(scope, host, bias_slot, "bias")
        if isinstance(c, Refusal):
            return c
        host_bias = rule.effective_bias(host, c.value)
    dtype = w_val.dtype
    new_host_bias = new_add = None
    try:
        factor = rule.weight_factor(host, w_val, s)
        new_w = _scaled_weight(scope, w_val, factor, dtype)
        if add_bias is not None:  # the Add carries the shift; the host's own bias is only scaled
            vec, store = add_bias
            new_add = numerics.round_to(numerics.fold_bias(vec, s, t), dtype, "the folded bias").reshape(store)
            if host_bias is not None:
                new_host_bias = numerics.round_to(host_bias * s, dtype, "the folded bias")
        elif has_bias_slot:
            new_host_bias = numerics.round_to(numerics.fold_bias(host_bias, s, t), dtype, "the folded bias")
        else:
            new_add = numerics.round_to(t, dtype, "the folded bias")
    except numerics.FoldOverflow as e:
        return Refusal(Reason.OVERFLOW, f"folding into {host.op_type} '{scope.label_of(host)}': {e}")

    def apply() -> None:
        scope.write_constant(host, rule.weight_slot, new_w, f"{name_base(host)}_weight_bnfold", factor=factor)
        if new_host_bias is not None:
            rule.write_bias(scope, host, new_host_bias, path.chain)
        if new_add is None:  # the host's bias slot carries the shift
            return
        if path.add is not None:
            scope.write_constant(path.add, path.add_const, new_add, f"{name_base(host)}_bias_bnfold")
        elif not has_bias_slot and np.any(new_add):  # a zero shift (a bare Mul) needs no bias node
            rule.write_bias(scope, host, new_add, path.chain)

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
    paths: List[_Path] = []
    sizes: List[int] = []
    rank = None
    for k, x in enumerate(concat.input):
        path = _find_host(scope, x, concat)
        if isinstance(path, Refusal):
            return Refusal(path.reason, f"input {k} of {label}: {path.detail}")
        found = _host_weight(scope, path)
        if isinstance(found, Refusal):
            return Refusal(found.reason, f"input {k} of {label}: {found.detail}")
        paths.append(path)
        sizes.append(path.rule.out_channels(path.host, found))
        rank = path.rule.output_rank(scope.index, path.host, found) if rank is None else rank
    axis = int(attr(concat, "axis", 1))
    if rank is None or axis not in (1, 1 - rank):
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


# -- BNs already decomposed into Mul + Add of constants ---------------------------------------

def _per_channel(value: np.ndarray) -> Optional[Tuple[np.ndarray, int]]:
    """A constant varying along at most one axis: its values (float64) and that axis, counted
    from the end (-1 last); axis 0 when it is a scalar in effect."""
    v = np.asarray(value)
    varying = [j for j, d in enumerate(v.shape) if d != 1]
    if len(varying) > 1:
        return None
    vec = v.astype(np.float64).reshape(-1)
    return vec, (varying[0] - v.ndim if varying else 0)


def _fold_decomposed(scope: Scope, mul: NodeProto) -> Optional[BNRecord]:
    """Fold ``host -> Mul(x, per-channel constant) [-> Add(per-channel constant)]`` like a BN.

    None when the Mul is no candidate (no per-channel float constant, or no host behind it):
    only candidates with a host get a record, so ordinary Muls are not reported.
    """
    k = _constant_operand(scope, mul)
    if k is None or has_attribute_refs(mul):
        return None
    cm = scope.index.resolve(scope, mul.input[k])
    if not isinstance(cm, Constant) or cm.data_type not in FLOAT_TENSOR_TYPES:
        return None
    pm = _per_channel(cm.value)
    if pm is None or pm[1] == 0:
        return None
    s, axis = pm
    ndim = cm.value.ndim
    nodes = [mul]
    t = np.zeros_like(s)
    add = scope.only_consumer(mul.output[0])
    if add is not None and add.op_type == "Add" and is_default_domain(add) and not has_attribute_refs(add):
        ka = _constant_operand(scope, add)
        ca = scope.index.resolve(scope, add.input[ka]) if ka is not None else None
        if isinstance(ca, Constant) and ca.data_type in FLOAT_TENSOR_TYPES:
            pa = _per_channel(ca.value)
            if pa is not None and (pa[1] in (0, axis)) and (pa[0].size in (1, s.size)):
                t = np.broadcast_to(pa[0], s.shape).copy()
                ndim = max(ndim, ca.value.ndim)
                nodes.append(add)
    label = scope.label_of(mul)
    what = f"Mul '{label}'" + (f" and Add '{scope.label_of(nodes[1])}'" if len(nodes) > 1 else "")

    def kept(refusal: Refusal) -> BNRecord:
        return BNRecord(label, scope.label, False, reason=refusal.reason,
                        detail=f"the per-channel {what} (a decomposed BN) kept: {refusal.detail}")

    path = _find_host(scope, mul.input[1 - k], mul)
    if isinstance(path, Refusal):
        return None if path.reason in (Reason.NO_HOST, Reason.ACTIVATION_BETWEEN) else kept(path)
    if s.size == 1:  # one value for every channel: as many as the host has
        return None
    plan = _plan_into_host(scope, path, s, t, want_axis=axis, min_rank=ndim)
    if isinstance(plan, Refusal):
        return kept(plan)
    plan()
    last = path.chain[-1]
    out = nodes[-1].output[0]
    scope.redirect_shape_readers(last.output[0], out)
    for n in nodes:
        scope.remove_node(n)
    scope.rename_output(last, 0, out)
    host = path.host
    return BNRecord(label, scope.label, True, INTO_PRECEDING, scope.label_of(host), host.op_type,
                    detail=f"the per-channel {what} (a decomposed BN) folded into the preceding "
                           f"{host.op_type} '{scope.label_of(host)}'")


# -- folding into the op after the BN ------------------------------------------------------

def _flattened(scope: Scope, bn: NodeProto, layout: NodeProto, k: int, c: int) -> Optional[str]:
    """Why ``layout`` (a Flatten or Reshape after the BN) is not ``[N, C, ...] -> [N, C*rest]``
    with ``k == C*rest`` input features, or None when it is."""
    if layout.op_type == "Flatten":
        if int(attr(layout, "axis", 1)) != 1:
            return f"Flatten '{scope.label_of(layout)}' does not flatten from axis 1"
        return None if k % c == 0 else f"{k} features are not a multiple of the BN's {c} channels"
    shape = scope.index.resolve(scope, layout.input[1]) if len(layout.input) > 1 else None
    if not isinstance(shape, Constant):
        return f"Reshape '{scope.label_of(layout)}' has a shape computed at run time"
    target = [int(v) for v in np.asarray(shape.value).reshape(-1)]
    dims = scope.index.shape(bn.input[0])
    rest = None if dims is None or len(dims) < 2 else dims[1:]
    if len(target) == 2 and target[0] == 0 and target[1] == -1 and not attr(layout, "allowzero", 0):
        return None if k % c == 0 else f"{k} features are not a multiple of the BN's {c} channels"
    if len(target) == 2 and target[1] == k and rest is not None and _prod(rest) == k:
        return None
    return f"Reshape '{scope.label_of(layout)}' to {target} is not proven to flatten the BN's output from axis 1"


def _fold_forward(scope: Scope, bn: NodeProto, s: np.ndarray, t: np.ndarray) -> Union[NodeProto, Refusal, str]:
    """Fold into the single following host that takes a BN before it (directly, or behind a
    Flatten/Reshape from axis 1 for hosts reading flat features); a string says why there is
    no candidate."""
    y = bn.output[0]
    nxt = scope.only_consumer(y)
    if nxt is None:
        n = scope.uses(y)
        return "its output is a graph output" if y in scope.outputs else f"its output feeds {n} nodes"
    first = nxt  # the node that will read the BN's input instead
    while is_default_domain(nxt) and nxt.input and nxt.input[0] == y and _passes_values(scope, nxt):
        y = nxt.output[0]  # through Identity / inference Dropout / same-type Cast
        after_pass = scope.only_consumer(y)
        if after_pass is None:
            return f"its output reaches {nxt.op_type} '{scope.label_of(nxt)}', whose output feeds several nodes"
        nxt = after_pass
    layout = None
    if nxt.op_type in ("Flatten", "Reshape") and is_default_domain(nxt) and nxt.input[0] == y:
        after = scope.only_consumer(nxt.output[0])
        after_rule = forward_rule(after)
        if after is not None and after_rule is not None and after_rule.flat_input:
            layout, nxt = nxt, after
    rule = forward_rule(nxt)
    x = layout.output[0] if layout is not None else y
    if rule is None or nxt.input[0] != x or x in nxt.input[1:]:
        return (f"its output feeds {nxt.op_type} '{scope.label_of(nxt)}', not the data input of a "
                f"{' or '.join(host_names(forward=True))}")
    w = _attribute_refs(scope, [nxt] + ([layout] if layout is not None else [])) or \
        _weight(scope, nxt, rule.weight_slot, "weight")
    if isinstance(w, Refusal):
        return w
    w_val = w.value
    refusal = rule.forward_check(scope, nxt, w_val)
    if refusal:
        return refusal
    k = rule.in_channels(nxt, w_val)
    if layout is not None:  # [N, C, d...] flattened: input feature c*D + j reads channel c
        why = _flattened(scope, bn, layout, k, s.shape[0])
        if why:
            return Refusal(Reason.CHANNEL_AXIS_MISMATCH, f"between it and {nxt.op_type} '{scope.label_of(nxt)}', {why}")
        s, t = np.repeat(s, k // s.shape[0]), np.repeat(t, k // s.shape[0])
    if k != s.shape[0]:
        return Refusal(Reason.CHANNEL_COUNT_MISMATCH,
                       f"{nxt.op_type} '{scope.label_of(nxt)}' reads {k} channels, the BN has {s.shape[0]}")
    bias = None
    if rule.bias_slot is not None and len(nxt.input) > rule.bias_slot and nxt.input[rule.bias_slot]:
        c = _weight(scope, nxt, rule.bias_slot, "bias")
        if isinstance(c, Refusal):
            return c
        bias = c.value
    dtype = w_val.dtype
    try:
        factor, b64 = rule.forward_fold(nxt, w_val, bias, s, t)
        new_w = _scaled_weight(scope, w_val, factor, dtype)
        new_b = numerics.round_to(b64, dtype, "the folded bias")
    except numerics.FoldOverflow as e:
        return Refusal(Reason.OVERFLOW, f"folding into {nxt.op_type} '{scope.label_of(nxt)}': {e}")
    label = name_base(nxt)
    scope.write_constant(nxt, rule.weight_slot, new_w, f"{label}_weight_bnfold", factor=factor)
    rule.write_bias(scope, nxt, new_b, [nxt])
    scope.redirect_shape_readers(bn.output[0], bn.input[0])
    scope.set_input(first, 0, bn.input[0])
    scope.remove_node(bn)
    return nxt
