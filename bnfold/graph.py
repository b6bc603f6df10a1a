"""An index over one ONNX model: producers, consumers, constants and fresh names.

The fold driver asks questions here (``scope.producer``, ``scope.consumers``,
``index.resolve``) and makes every edit through the methods below, so that the
bookkeeping (use counts, orphaned tensors, node order) lives in one place.

Scopes are the main graph, every control-flow body (If/Loop/Scan ...), whose
names may refer to outer scopes, and every model-local function, which sees only
its own names.
"""
from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, Union, cast

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, FunctionProto, ModelProto, NodeProto, TensorProto, numpy_helper

from .errors import MalformedModelError
from .modelio.pending import PendingValue, ScaledTensor, as_array
from .modelio.tensors import in_data_file, read_tensor, set_tensor_data
from .reasons import Reason, Refusal

DEFAULT_DOMAINS = ("", "ai.onnx")
# Ops that read only a tensor's shape: folding changes values, never shapes, so they
# may keep reading a tensor a fold rewrites.
SHAPE_READERS = frozenset({"Shape", "Size"})
# Pure, deterministic ops that resolve() evaluates when every input is constant (exporters
# compute weights with them: ConstantOfShape, Cast in float16 exports, weight_norm's
# Mul/Div/Pow/ReduceL2, Reshape/Unsqueeze/Concat/Slice of constants ...).
EVALUABLE_OPS = frozenset({
    "Cast", "CastLike", "Reshape", "Unsqueeze", "Squeeze", "Expand", "Concat", "Slice", "Gather", "Flatten",
    "Tile", "Mul", "Div", "Add", "Sub", "Neg", "Sqrt", "Pow", "Reciprocal", "Abs", "ReduceL2", "ReduceSum",
    "ReduceMean", "ReduceMax", "ReduceMin", "ConstantOfShape", "Range", "Shape", "Identity", "Transpose",
})
# Ops finish() removes once nothing reads their output.
CONSTANT_OPS = frozenset({"Constant"}) | EVALUABLE_OPS
MAX_EVAL_ELEMENTS = 1 << 25
"""The largest constant (in elements) resolve() computes from a constant subgraph."""
FLOAT_TENSOR_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def is_default_domain(node: NodeProto) -> bool:
    return node.domain in DEFAULT_DOMAINS


def attr(node: NodeProto, name: str, default=None):
    """The value of attribute ``name`` of ``node`` or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def has_attribute_refs(node: NodeProto) -> bool:
    """True when an attribute is a reference to a function attribute (its value is the caller's)."""
    return any(a.ref_attr_name for a in node.attribute)


def set_attr(node: NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def subgraphs(node: NodeProto) -> Iterator[tuple]:
    """``(attribute name, GraphProto)`` for every body graph of ``node``."""
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == AttributeProto.GRAPHS:
            for i, g in enumerate(a.graphs):
                yield f"{a.name}[{i}]", g


def names_read(graph: GraphProto) -> Set[str]:
    """Every name read anywhere inside ``graph`` (over-approximates its free names)."""
    names: Set[str] = {o.name for o in graph.output}
    for node in graph.node:
        names.update(i for i in node.input if i)
        for _, g in subgraphs(node):
            names |= names_read(g)
    return names


def node_label(node: NodeProto, position: int) -> str:
    """A stable, human name for a node: its name, or ``Op#position`` when unnamed."""
    return node.name if node.name else f"{node.op_type}#{position}"


@dataclass
class Constant:
    """A constant tensor a node reads: an initializer or the output of a Constant node."""

    name: str
    scope: "Scope"
    tensor: Optional[TensorProto]
    node: Optional[NodeProto] = None  # the Constant node, when it is one
    derived: Optional[np.ndarray] = None  # value computed from ``tensor`` (e.g. transposed)

    @property
    def value(self) -> np.ndarray:
        if self.derived is not None:
            return self.derived
        if self.tensor is not None:
            pending = self.scope.index.pending.get(id(self.tensor))
            if pending is not None:
                return as_array(pending[1])
            return read_tensor(self.tensor, self.scope.index.base_dir)
        # Constant node with value_float / value_floats / value_int(s)
        if self.node is None:
            raise MalformedModelError(f"constant '{self.name}' has neither a tensor nor a Constant node")
        for key in ("value_float", "value_floats", "value_int", "value_ints"):
            v = attr(self.node, key)
            if v is not None:
                dtype = np.float32 if "float" in key else np.int64
                return np.asarray(v, dtype=dtype)
        raise MalformedModelError(f"unsupported Constant node '{self.node.name}'")

    @property
    def data_type(self) -> int:
        if self.derived is not None:
            return onnx.helper.np_dtype_to_tensor_dtype(self.derived.dtype)
        if self.tensor is not None:
            return self.tensor.data_type
        if self.node is None:
            raise MalformedModelError(f"constant '{self.name}' has neither a tensor nor a Constant node")
        return TensorProto.FLOAT if attr(self.node, "value_float") is not None or attr(
            self.node, "value_floats") is not None else TensorProto.INT64


_COMPUTED = "computed"
_QUANTIZED = "quantized"


def _output_size_bound(node: NodeProto, inputs: List[np.ndarray]) -> int:
    """An upper bound on the elements ``node`` produces from ``inputs`` (before computing them)."""
    op = node.op_type
    try:
        if op == "ConstantOfShape":
            return int(np.prod(inputs[0].astype(np.int64)))
        if op == "Expand":
            return int(np.prod(np.broadcast_shapes(inputs[0].shape, tuple(int(d) for d in inputs[1]))))
        if op == "Tile":
            return int(np.prod(np.asarray(inputs[0].shape, np.int64) * inputs[1].astype(np.int64)))
        if op == "Range":
            start, limit, delta = (float(np.asarray(v).reshape(-1)[0]) for v in inputs[:3])
            return int(max(np.ceil((limit - start) / delta), 0)) if delta else MAX_EVAL_ELEMENTS + 1
        total = sum(v.size for v in inputs)
        return max(total, int(np.prod(np.broadcast_shapes(*(v.shape for v in inputs)))))
    except (ValueError, TypeError, OverflowError, IndexError):
        return sum(v.size for v in inputs)


class Scope:
    """One graph or function body and the name lookups inside it."""

    def __init__(self, index: "ModelIndex", container: Union[GraphProto, FunctionProto],
                 label: str, parent: Optional["Scope"]) -> None:
        self.index = index
        self.container = container
        self.label = label
        self.parent = parent
        self.is_function = isinstance(container, FunctionProto)
        self.nodes: List[NodeProto] = list(container.node)
        self.position = {id(n): i for i, n in enumerate(self.nodes)}
        self.producer: Dict[str, NodeProto] = {}
        self.consumers: Dict[str, List[NodeProto]] = defaultdict(list)
        if self.is_function:
            self.initializers: Dict[str, TensorProto] = {}
            self.inputs = set(container.input)
            self.outputs = set(container.output)
        else:
            self.initializers = {t.name: t for t in container.initializer}
            self.inputs = {v.name for v in container.input}
            self.outputs = {v.name for v in container.output}
        for node in self.nodes:
            for o in node.output:
                if o:
                    self.producer[o] = node
            read = {i for i in node.input if i}
            for _, g in subgraphs(node):
                read |= names_read(g)
            for name in read:
                self.consumers[name].append(node)
        self.removed: Set[int] = set()
        self.insert_before: Dict[int, List[NodeProto]] = defaultdict(list)
        self.insert_after: Dict[int, List[NodeProto]] = defaultdict(list)

    # -- queries ---------------------------------------------------------------------
    def label_of(self, node: NodeProto) -> str:
        return node_label(node, self.position.get(id(node), -1))

    def live_nodes(self) -> List[NodeProto]:
        return [n for n in self.nodes if id(n) not in self.removed]

    def uses(self, name: str) -> int:
        """How many nodes of this scope read ``name``, plus one if it is an output here."""
        return len(self.consumers.get(name, ())) + (name in self.outputs)

    def only_consumer(self, name: str) -> Optional[NodeProto]:
        """The single node reading ``name``'s values when nothing else (nor a graph output) does.

        Nodes that read only its shape (:data:`SHAPE_READERS`) do not count.
        """
        shape_readers = self.shape_readers(name)
        users = [u for u in self.consumers.get(name, ()) if u not in shape_readers]
        if len(users) == 1 and name not in self.outputs:
            return users[0]
        return None

    def shape_readers(self, name: str) -> List[NodeProto]:
        return [u for u in self.consumers.get(name, ())
                if u.op_type in SHAPE_READERS and is_default_domain(u) and list(u.input) == [name]]

    def redirect_shape_readers(self, old: str, new: str) -> None:
        """Point nodes reading only the shape of ``old`` at ``new`` (same shape)."""
        for reader in self.shape_readers(old):
            self.set_input(reader, 0, new)

    @property
    def opset(self) -> int:
        imports = self.container.opset_import if self.is_function else self.index.model.opset_import
        for op in imports:
            if op.domain in DEFAULT_DOMAINS:
                return op.version
        return self.index.default_opset

    # -- edits -----------------------------------------------------------------------
    def set_input(self, node: NodeProto, i: int, name: str) -> None:
        """Point input ``i`` of ``node`` at ``name`` (appending empty slots as needed)."""
        while len(node.input) <= i:
            node.input.append("")
        old = node.input[i]
        if old == name:
            return
        if old:
            self._drop_use(old, node)
        node.input[i] = name
        if name:
            self.consumers[name].append(node)
            self.index.refs[name] += 1

    def _drop_use(self, name: str, node: NodeProto) -> None:
        users = self.consumers.get(name)
        if users:
            for k, u in enumerate(users):
                if u is node:
                    del users[k]
                    break
        self.index.refs[name] -= 1
        self.index.maybe_orphaned.add(name)

    def rename_output(self, node: NodeProto, i: int, name: str) -> None:
        """Make ``node`` produce ``name`` as output ``i`` (the old name disappears)."""
        old = node.output[i]
        self.producer.pop(old, None)
        self.index.vanished.add(old)
        node.output[i] = name
        self.producer[name] = node
        self.index.vanished.discard(name)

    def remove_node(self, node: NodeProto) -> None:
        for name in node.input:
            if name:
                self._drop_use(name, node)
        for name in node.output:
            if name and self.producer.get(name) is node:
                del self.producer[name]
                self.index.vanished.add(name)
        self.removed.add(id(node))

    def add_node_after(self, anchor: NodeProto, node: NodeProto) -> None:
        self.insert_after[id(anchor)].append(node)
        self._register(node)

    def add_node_before(self, anchor: NodeProto, node: NodeProto) -> None:
        self.insert_before[id(anchor)].append(node)
        self._register(node)

    def _register(self, node: NodeProto) -> None:
        self.position[id(node)] = -1
        for o in node.output:
            self.producer[o] = node
            self.index.vanished.discard(o)
        for name in node.input:
            if name:
                self.consumers[name].append(node)
                self.index.refs[name] += 1

    def write_constant(self, node: NodeProto, i: int, value: PendingValue, base: str,
                       factor: Optional[np.ndarray] = None) -> str:
        """Make input ``i`` of ``node`` read the constant ``value``.

        Rewrites the old tensor in place when nothing else reads it and its shape
        does not change; otherwise stores ``value`` under a fresh name (a shared
        tensor is never modified). ``factor`` says that ``value`` is the old tensor
        times ``factor``: for a tensor in external data only that recipe is kept, and
        the values are computed, block by block, when the model is written. ``value``
        may be a function returning the array, called only when the array is needed.
        """
        old = node.input[i] if i < len(node.input) else ""
        if old:
            current = self.index.resolve(self, old)
            if (isinstance(current, Constant) and current.name == old and current.derived is None
                    and self.index.refs[old] == 1
                    and old not in current.scope.outputs
                    and current.tensor is not None
                    and (factor is not None or tuple(current.tensor.dims) == as_array(value).shape)):
                # Recorded, not written: replacing a field's bytes inside a loaded protobuf keeps the
                # old bytes alive in its arena. Main-graph initializers are written straight to disk.
                if factor is not None and in_data_file(current.tensor):
                    prev = self.index.pending.get(id(current.tensor))
                    if prev is not None and isinstance(prev[1], ScaledTensor):
                        factor = prev[1].factor * factor
                    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(current.tensor.data_type))
                    value = ScaledTensor(current.tensor, self.index.base_dir, factor, dtype,
                                         checked=not self.index.defer_range_checks)
                elif not isinstance(value, ScaledTensor):
                    value = as_array(value)
                self.index.pending[id(current.tensor)] = (current.tensor, value)
                return old
        array = as_array(value)
        name = self.index.fresh_name(base)
        tensor = numpy_helper.from_array(array, name)
        if self.is_function or (self.parent is not None and self.index.model.ir_version < 4):
            # Functions have no initializers; IR<4 subgraphs may not list inputs freely.
            const = onnx.helper.make_node("Constant", [], [name], name=self.index.fresh_name(name + "_const"))
            const.attribute.append(onnx.helper.make_attribute("value", tensor))
            self.add_node_before(node, const)
        else:
            self.container.initializer.append(tensor)
            self.initializers[name] = self.container.initializer[-1]
            if self.index.model.ir_version < 4:
                # IR < 4: every initializer must also be a graph input.
                self.container.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, array.shape))
                self.inputs.add(name)
        self.set_input(node, i, name)
        return name

    def rebuild(self) -> None:
        """Write the node list back in order, with removals and insertions applied."""
        if not (self.removed or self.insert_after or self.insert_before):
            return
        ordered: List[NodeProto] = []
        for n in self.nodes:
            ordered.extend(self.insert_before.get(id(n), ()))
            if id(n) not in self.removed:
                ordered.append(n)
            ordered.extend(self.insert_after.get(id(n), ()))
        del self.container.node[:]
        self.container.node.extend(ordered)


class ModelIndex:
    """All scopes of a model plus the model-wide use counts and name table."""

    def __init__(self, model: ModelProto, allow_overridable: bool = False, base_dir: Optional[str] = None,
                 defer_range_checks: bool = False) -> None:
        self.model = model
        self.base_dir = base_dir  # where external data lives
        # folds of weights in external data files are not checked to fit their dtype until written
        # (fold.fuse_to_write): one read of those weights instead of two
        self.defer_range_checks = defer_range_checks
        self.allow_overridable = allow_overridable
        self.default_opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 1)
        self.refs: Counter = Counter()
        self.names: Set[str] = set()
        self.maybe_orphaned: Set[str] = set()
        self.vanished: Set[str] = set()
        self._fresh_counter = itertools.count()
        self.pending: Dict[int, Tuple[TensorProto, PendingValue]] = {}  # id(tensor) -> (tensor, new value)
        self.scopes: List[Scope] = []
        self.main = self._add_graph(model.graph, "main graph", None)
        for f in model.functions:
            self._add_function(f)
        self._kinds: Dict[int, Dict[str, str]] = {}
        self._evaluated: Dict[tuple, Union[Constant, Refusal]] = {}
        self._shapes: Optional[Dict[str, List[Optional[int]]]] = None
        self._elem_types: Dict[str, int] = {}

    def _add_graph(self, graph: GraphProto, label: str, parent: Optional[Scope]) -> Scope:
        scope = Scope(self, graph, label, parent)
        self.scopes.append(scope)
        for v in itertools.chain(graph.input, graph.output, graph.value_info):
            self.names.add(v.name)
        for t in graph.initializer:
            self.names.add(t.name)
        for v in graph.output:
            self.refs[v.name] += 1
        for node in graph.node:
            self._add_node_names(node)
            for aname, g in subgraphs(node):
                self._add_graph(g, f"{scope.label_of(node)}.{aname}", scope)
        return scope

    def _add_function(self, f: FunctionProto) -> None:
        scope = Scope(self, f, f"function {f.domain}.{f.name}", None)
        self.scopes.append(scope)
        self.names.update(f.input)
        self.names.update(f.output)
        for o in f.output:
            self.refs[o] += 1
        for node in f.node:
            self._add_node_names(node)
            for aname, g in subgraphs(node):
                self._add_graph(g, f"{scope.label_of(node)}.{aname}", scope)

    def _add_node_names(self, node: NodeProto) -> None:
        self.names.add(node.name)
        self.names.update(node.output)
        for i in node.input:
            if i:
                self.names.add(i)
                self.refs[i] += 1

    # -- names -----------------------------------------------------------------------
    def fresh_name(self, base: str) -> str:
        """A name used nowhere in the model (tensors, nodes, all scopes)."""
        name = base
        while name in self.names:
            name = f"{base}_{next(self._fresh_counter)}"
        self.names.add(name)
        return name

    # -- constants -------------------------------------------------------------------
    def resolve(self, scope: Scope, name: str) -> Union[Constant, Refusal]:
        """Find what ``name`` refers to as seen from ``scope``."""
        s: Optional[Scope] = scope
        while s is not None:
            node = s.producer.get(name)
            if node is not None:
                if node.op_type == "Constant" and is_default_domain(node):
                    if has_attribute_refs(node):
                        return Refusal(Reason.NOT_CONSTANT, f"'{name}' is set by the calling function")
                    if attr(node, "sparse_value") is not None or attr(node, "value_string") is not None:
                        return Refusal(Reason.NOT_CONSTANT, f"'{name}' is a sparse or string Constant")
                    return Constant(name, s, attr(node, "value"), node)
                if node.op_type == "Identity" and is_default_domain(node) and node.input:
                    return self.resolve(s, node.input[0])  # exporters route shared weights through Identity
                if node.op_type == "Transpose" and is_default_domain(node) and node.input:
                    src = self.resolve(s, node.input[0])  # exporters without constant folding keep W^T
                    if isinstance(src, Constant):
                        perm = attr(node, "perm")
                        value = np.transpose(src.value, perm if perm else None)
                        return Constant(name, src.scope, src.tensor, src.node, derived=value)
                    return src
                if node.op_type == "DequantizeLinear":
                    return Refusal(Reason.QUANTIZED_WEIGHT,
                                   f"'{name}' is de-quantized at run time by DequantizeLinear '{s.label_of(node)}'")
                kind = self._constant_kind(s).get(name)
                if kind == _COMPUTED:
                    return self._evaluate(s, node, name)
                if kind == _QUANTIZED:
                    return Refusal(Reason.QUANTIZED_WEIGHT,
                                   f"'{name}' is computed by {node.op_type} '{s.label_of(node)}' from a "
                                   "DequantizeLinear output")
                return Refusal(Reason.NOT_CONSTANT,
                                   f"'{name}' is computed at run time by {node.op_type} '{s.label_of(node)}'")
            if name in s.initializers:
                if (name in s.inputs and self.model.ir_version >= 4 and not self.allow_overridable):
                    return Refusal(Reason.OVERRIDABLE_PARAMETER,
                                       f"'{name}' is an initializer that is also a graph input, so callers may "
                                       "override it (allow_overridable / --allow-overridable treats it as constant)")
                return Constant(name, s, s.initializers[name])
            if name in s.inputs:
                return Refusal(Reason.NOT_CONSTANT, f"'{name}' is an input of the {s.label}")
            s = s.parent
        return Refusal(Reason.NOT_CONSTANT, f"'{name}' is not defined in the {scope.label}")

    def _constant_kind(self, scope: Scope) -> Dict[str, str]:
        """Names of ``scope`` computed by :data:`EVALUABLE_OPS` from constants only (``_COMPUTED``)
        or from constants and de-quantized tensors (``_QUANTIZED``), in one pass over its nodes."""
        kinds = self._kinds.get(id(scope))
        if kinds is not None:
            return kinds
        kinds = {}
        outer = self._constant_kind(scope.parent) if scope.parent is not None else {}

        def kind_of(name: str) -> Optional[str]:
            if name in kinds:
                return kinds[name]
            if name in scope.producer:
                return None
            if name in scope.initializers:
                overridable = name in scope.inputs and self.model.ir_version >= 4 and not self.allow_overridable
                return None if overridable else _COMPUTED
            if name in scope.inputs or scope.parent is None:
                return None
            p: Optional[Scope] = scope.parent
            while p is not None:  # an outer initializer or constant
                if name in p.producer or name in p.inputs or name in p.initializers:
                    break
                p = p.parent
            if p is not None and name in p.initializers and not (
                    name in p.inputs and self.model.ir_version >= 4 and not self.allow_overridable):
                return _COMPUTED
            return outer.get(name)

        for node in scope.nodes:
            if not is_default_domain(node) or has_attribute_refs(node) or len(node.output) != 1:
                continue
            if node.op_type == "Constant":
                kinds[node.output[0]] = _COMPUTED
                continue
            if node.op_type == "DequantizeLinear":
                kinds[node.output[0]] = _QUANTIZED
                continue
            if node.op_type not in EVALUABLE_OPS or any(True for _ in subgraphs(node)):
                continue
            # CastLike reads only the type of its second input (dynamo exports: CastLike(c, input))
            reads = node.input[:1] if node.op_type == "CastLike" else node.input
            ins = [kind_of(i) for i in reads if i]
            if ins and None not in ins:
                kinds[node.output[0]] = _QUANTIZED if _QUANTIZED in ins else _COMPUTED
        self._kinds[id(scope)] = kinds
        return kinds

    def _evaluate(self, scope: Scope, node: NodeProto, name: str) -> Union[Constant, Refusal]:
        """Compute ``name`` (made by ``node`` from constants) as the runtime would, once."""
        key = (id(scope), name)
        if key in self._evaluated:
            return self._evaluated[key]
        label = f"{node.op_type} '{scope.label_of(node)}'"
        result: Union[Constant, Refusal]
        feeds: Dict[str, np.ndarray] = {}
        if node.op_type == "CastLike" and len(node.input) > 1 and node.input[1] != node.input[0]:
            like = node.input[1]  # only its element type matters: feed an empty tensor of that type
            c = self.resolve(scope, like)
            elem = c.data_type if isinstance(c, Constant) else (self.elem_type(like) if scope is self.main else None)
            if elem is None:
                result = Refusal(
                    Reason.NOT_CONSTANT, f"'{name}' is cast by {label} to the unknown type of '{like}'")
                self._evaluated[key] = result
                return result
            feeds[like] = np.zeros((0,), onnx.helper.tensor_dtype_to_np_dtype(elem))
        for inp in node.input:
            if inp and inp not in feeds:
                c = self.resolve(scope, inp)
                if isinstance(c, Refusal):
                    self._evaluated[key] = c
                    return c
                feeds[inp] = np.asarray(c.value)
        size = _output_size_bound(node, [feeds[i] for i in node.input if i])
        if size > MAX_EVAL_ELEMENTS:
            result = Refusal(
                Reason.CONSTANT_TOO_LARGE, f"'{name}' is computed from constants by {label}, but would hold "
                                           f"about {size} elements (cap {MAX_EVAL_ELEMENTS})")
        else:
            from onnx.reference import ReferenceEvaluator

            g = onnx.helper.make_graph(
                [node], "constant", [onnx.helper.make_tensor_value_info(
                    k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()],
                [onnx.helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None)])
            m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", scope.opset)],
                                       ir_version=max(self.model.ir_version, 3))
            try:
                # run() is typed list-or-dict: it returns a dict only with intermediate=True
                value = np.asarray(cast(List[Any], ReferenceEvaluator(m).run(None, feeds))[0])
            except (ValueError, TypeError, IndexError, KeyError, RuntimeError, NotImplementedError) as e:
                # a malformed constant subgraph is reported, like any other non-constant weight
                result = Refusal(Reason.NOT_CONSTANT, f"'{name}' is computed from constants by {label}, which "
                                                      f"cannot be evaluated ({type(e).__name__}: {e})")
            else:
                result = Constant(name, scope, None, node, derived=value)
        self._evaluated[key] = result
        return result

    # -- shapes ----------------------------------------------------------------------
    def rank(self, name: str) -> Optional[int]:
        """The rank of tensor ``name`` if declared or inferable, else None.

        Inferred once, on first use, from the graph as it is then: callers that edit the
        graph (``insert``) ask before their first edit.
        """
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def shape(self, name: str) -> Optional[List[Optional[int]]]:
        """The dims of tensor ``name`` (None for a symbolic or unknown dim), if its rank is known."""
        if self._shapes is None:
            self._shapes, self._elem_types = self._infer_shapes()
        return self._shapes.get(name)

    def elem_type(self, name: str) -> Optional[int]:
        """The element type (``TensorProto`` enum) of tensor ``name``, if declared or inferable."""
        if self._shapes is None:
            self._shapes, self._elem_types = self._infer_shapes()
        return self._elem_types.get(name)

    def _infer_shapes(self):
        # Shape inference on a skeleton: big initializers keep dims but not data, so
        # this stays cheap on large models.
        skeleton = ModelProto()
        skeleton.ir_version = self.model.ir_version
        skeleton.opset_import.extend(self.model.opset_import)
        skeleton.functions.extend(self.model.functions)
        g = skeleton.graph
        src = self.model.graph
        for field in ("node", "input", "output", "value_info"):
            getattr(g, field).extend(getattr(src, field))
        for t in src.initializer:
            if len(t.raw_data) <= 1024 and t.data_location != TensorProto.EXTERNAL:
                g.initializer.append(t)
            else:
                g.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
        shapes: Dict[str, List[Optional[int]]] = {}
        types: Dict[str, int] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
            values = itertools.chain(inferred.graph.input, inferred.graph.output, inferred.graph.value_info)
        except Exception:  # inference is a bonus: fall back to what is declared
            values = itertools.chain(src.input, src.output, src.value_info)
        for v in values:
            if v.type.HasField("tensor_type"):
                tt = v.type.tensor_type
                if tt.elem_type:
                    types[v.name] = tt.elem_type
                if tt.HasField("shape"):
                    shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        for t in src.initializer:
            shapes[t.name] = list(t.dims)
            types[t.name] = t.data_type
        return shapes, types

    # -- finishing -------------------------------------------------------------------
    def take_replacements(self) -> Dict[str, PendingValue]:
        """New values of main-graph initializers by name, left for the writer to stream; every
        other pending edit is applied to its tensor."""
        main = self.main.initializers
        out: Dict[str, PendingValue] = {}
        for key, (tensor, value) in list(self.pending.items()):
            if main.get(tensor.name) is tensor:
                out[tensor.name] = value
                del self.pending[key]
        self.apply_pending()
        return out

    def apply_pending(self) -> None:
        """Write every pending edit into its tensor."""
        for tensor, value in self.pending.values():
            set_tensor_data(tensor, as_array(value))
        self.pending.clear()

    def finish(self) -> None:
        """Drop tensors that folding orphaned, stale value_info, and write node lists back."""
        while True:  # constant ops feeding only what folding removed go too, transitively
            orphans = {n for n in self.maybe_orphaned if self.refs[n] <= 0}
            dead = [(scope, node) for scope in self.scopes for node in scope.live_nodes()
                    if node.op_type in CONSTANT_OPS and is_default_domain(node)
                    and len(node.output) == 1 and node.output[0] in orphans]
            if not dead:
                break
            for scope, node in dead:
                scope.remove_node(node)
        gone = orphans | self.vanished
        for scope in reversed(self.scopes):  # children before parents: rebuild copies nodes
            if not scope.is_function:
                g = scope.container
                dead_inits = [i for i, t in enumerate(g.initializer) if t.name in orphans]
                for i in reversed(dead_inits):
                    del g.initializer[i]
                inputs_to_drop = [i for i, v in enumerate(g.input)
                                  if v.name in orphans and v.name in scope.initializers]
                for i in reversed(inputs_to_drop):
                    del g.input[i]
                stale = [i for i, v in enumerate(g.value_info) if v.name in gone]
                for i in reversed(stale):
                    del g.value_info[i]
            scope.rebuild()
