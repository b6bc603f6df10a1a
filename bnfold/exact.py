"""Models evaluated in float64 ("exact enough" arithmetic) with onnx.reference.

Used by verification to measure how far a model's own-dtype run is from exact
arithmetic, and how far a candidate's *weights* move the result, free of any
runtime's rounding. Never imports the fold code.

- :func:`upcast` turns every floating-point tensor of a model into float64:
  initializers, graph inputs/outputs/value_info types, Cast targets, ``dtype``
  attributes, Constant nodes and tensor attributes (e.g. ConstantOfShape's
  value), in subgraphs and functions too.
- :func:`evaluator` runs an upcast model through ``onnx.reference`` with
  *inference* BatchNormalization at every opset (the stock implementation below
  opset 15 uses batch statistics, i.e. training semantics).
- :func:`perturbed` draws a copy of a weight moved at random within half an ulp of
  its own dtype: the rounding a correct rewrite of that weight is allowed;
  :func:`float_initializers` says which weights (those a rewrite rounds: read only by
  compute nodes or element-wise affine ops, named by no op list); :func:`moved_ulps` moves a
  weight whole ulps in its own dtype, for the runtime-calibrated verdict.
- :func:`estimate_seconds` predicts the cost of one evaluation from the model's
  multiply-accumulates, so callers can skip the pass on models too big for it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})
# Measured here (onnx 1.23.2, 2 shared cores, the Conv below): 2.8 GMAC/s on a resnet18-like net, 0.5 on a
# mobilenet-like one (depthwise); 1 GMAC/s plus 1 ms per node keeps the estimate on the safe side.
MACS_PER_SECOND = 1e9
SECONDS_PER_NODE = 1e-3


def _to_double(elem_type: int) -> int:
    return TensorProto.DOUBLE if elem_type in FLOAT_TYPES else elem_type


def _upcast_type(tp: onnx.TypeProto) -> None:
    kind = tp.WhichOneof("value")
    if kind == "tensor_type":
        tp.tensor_type.elem_type = _to_double(tp.tensor_type.elem_type)
    elif kind == "sparse_tensor_type":
        tp.sparse_tensor_type.elem_type = _to_double(tp.sparse_tensor_type.elem_type)
    elif kind == "sequence_type":
        _upcast_type(tp.sequence_type.elem_type)
    elif kind == "optional_type":
        _upcast_type(tp.optional_type.elem_type)
    elif kind == "map_type":
        _upcast_type(tp.map_type.value_type)


def _upcast_tensor(t: TensorProto) -> None:
    if t.data_type in FLOAT_TYPES and t.data_type != TensorProto.DOUBLE:
        arr = numpy_helper.to_array(t).astype(np.float64)
        t.CopyFrom(numpy_helper.from_array(arr, t.name))


def _upcast_node(node: onnx.NodeProto) -> None:
    if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        for a in list(node.attribute):
            # value_float(s) would make a float32 Constant: turn them into a float64 tensor.
            if a.name in ("value_float", "value_floats"):
                arr = np.float64(a.f) if a.name == "value_float" else np.asarray(a.floats, np.float64)
                node.attribute.remove(a)
                node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.asarray(arr))))
    for a in node.attribute:
        if a.type == AttributeProto.TENSOR:
            _upcast_tensor(a.t)
        elif a.type == AttributeProto.TENSORS:
            for t in a.tensors:
                _upcast_tensor(t)
        elif a.type == AttributeProto.GRAPH:
            _upcast_graph(a.g)
        elif a.type == AttributeProto.GRAPHS:
            for g in a.graphs:
                _upcast_graph(g)
        elif a.type == AttributeProto.INT and a.name in ("to", "dtype", "output_dtype"):
            a.i = _to_double(a.i)


def _upcast_graph(graph: onnx.GraphProto, initializers: bool = True) -> None:
    if initializers:
        for t in graph.initializer:
            _upcast_tensor(t)
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        _upcast_type(v.type)
    for node in graph.node:
        _upcast_node(node)


def upcast(model: onnx.ModelProto, *, initializers: bool = True) -> onnx.ModelProto:
    """A float64 copy of ``model`` (external data must already be loaded).

    ``initializers=False`` leaves the main graph's initializers in their own dtype, for
    :class:`Float64Evaluator`, which converts its own arrays (no float64 protobuf copy).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _upcast_graph(out.graph, initializers)
    for f in out.functions:
        for node in f.node:
            _upcast_node(node)
    return out


# The ops whose float constant inputs a BN rewrite (fold, insert, re-parameterisation) computes and rounds,
# and whose value moves smoothly with them, without naming an op the host rules own (the verifier stays
# independent of them): *compute nodes*, those reading a float weight of rank >= 2 (a kernel or a matrix;
# their biases too), and the element-wise ops a BN is, or is decomposed into. Constants read by any other
# op are never perturbed: a Resize scale of 2.0 moved by an ulp changes the output shape, a Pow exponent
# of 2.0 turns negative bases into NaN.
ELEMENTWISE_AFFINE = frozenset({"BatchNormalization", "Add", "Sub", "Mul", "Div"})


def float_initializers(model: onnx.ModelProto, *, rewritable_only: bool = True) -> List[Tuple[str, np.ndarray]]:
    """(name, array in its own dtype) for the floating-point initializers of the main graph.

    ``rewritable_only``: only those every reader of which is a compute node or an element-wise
    affine op (see :data:`ELEMENTWISE_AFFINE`): the weights a rewrite rounds, the ones
    :func:`perturbed` may move."""
    names = set(float_initializer_names(model, rewritable_only=rewritable_only))
    return [(t.name, numpy_helper.to_array(t)) for t in model.graph.initializer if t.name in names]


def float_initializer_names(model: onnx.ModelProto, *, rewritable_only: bool = True) -> List[str]:
    """The names :func:`float_initializers` gives, in initializer order, without reading a value."""
    floats = {t.name for t in model.graph.initializer if t.data_type in FLOAT_TYPES}
    weights = {t.name for t in model.graph.initializer if t.data_type in FLOAT_TYPES and len(t.dims) >= 2}
    smooth: Dict[str, bool] = {}
    if rewritable_only:
        for n in model.graph.node:
            ok = n.domain in ("", "ai.onnx") and (n.op_type in ELEMENTWISE_AFFINE or any(i in weights for i in n.input))
            for i in n.input:
                if i in floats:
                    smooth[i] = smooth.get(i, True) and ok
    return [t.name for t in model.graph.initializer
            if t.data_type in FLOAT_TYPES and (not rewritable_only or smooth.get(t.name, False))]


_CHUNK = 1 << 20  # values per piece in moved_ulps: its temporaries stay small and in cache


def moved_ulps(arr: np.ndarray, rng: np.random.Generator, ulps: float = 1.0, fraction: float = 1.0) -> np.ndarray:
    """``arr`` in its own dtype with each value, with probability ``fraction``, moved by ``ulps`` of its
    dtype's spacing at that value, up or down at random (a value whose move would overflow stays).

    One ulp is one representable step (``np.nextafter``; going down from a power of two the step below
    is half as large); other amounts move by ``ulps x`` the spacing above, through float64. Large
    arrays go a piece at a time (the same random draws, in the same order)."""
    arr = np.asarray(arr)
    if arr.size <= _CHUNK:
        return _moved(arr, rng, ulps, fraction)
    flat = arr.reshape(-1)
    out = np.empty_like(flat)
    for i in range(0, flat.size, _CHUNK):
        out[i:i + _CHUNK] = _moved(flat[i:i + _CHUNK], rng, ulps, fraction)
    return out.reshape(arr.shape)


def _moved(arr: np.ndarray, rng: np.random.Generator, ulps: float, fraction: float) -> np.ndarray:
    u = rng.random(arr.shape, dtype=np.float32)
    if ulps == 1.0 and fraction >= 1.0 and arr.dtype in _BITS:
        return _next_representable(arr, u < 0.5)
    down, up = u < fraction / 2, (u >= fraction / 2) & (u < fraction)
    if ulps == 1.0 and arr.dtype in (np.float16, np.float32, np.float64):
        inf = np.asarray(np.inf, arr.dtype)
        target = np.where(down, -inf, inf) if fraction >= 1.0 else np.where(down, -inf, np.where(up, inf, arr))
        out = np.nextafter(arr, target)
    else:
        sign = np.where(down, -1.0, np.where(up, 1.0, 0.0))
        with np.errstate(over="ignore", invalid="ignore"):
            out = (arr.astype(np.float64) + sign * (2.0 * ulps) * half_ulp(arr)).astype(arr.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        keep = (~np.isfinite(out) & np.isfinite(arr) if arr.dtype.kind == "f"
                else ~np.isfinite(out.astype(np.float32)) & np.isfinite(arr.astype(np.float32)))
    if keep.any():
        out[keep] = arr[keep]
    return out


_BITS = {np.dtype(np.float16): np.int16, np.dtype(np.float32): np.int32, np.dtype(np.float64): np.int64}


def _next_representable(arr: np.ndarray, down: np.ndarray) -> np.ndarray:
    """``np.nextafter(arr, -inf where down else +inf)``, finite values that would overflow kept,
    on the integer view of the bits: a step is +-1 on the magnitude (about twice as fast as
    nextafter here: 50M float32 values in 0.5-1.0 s against 1.1-2.0 s; a 3 GB model's runtime
    calibration spent 46 s in moved_ulps)."""
    shape = arr.shape
    arr, down = arr.reshape(-1), np.asarray(down).reshape(-1)  # a 0-d array too: bits assignable
    ints: Any = _BITS[arr.dtype]
    bits = arr.view(ints)
    negative = bits < 0
    # up in value: the magnitude grows for a positive value and shrinks for a negative one
    delta = np.where(down == negative, ints(1), ints(-1))
    with np.errstate(over="ignore"):
        out_bits = bits + delta
    smallest = ints(1)
    lowest = np.iinfo(ints).min  # the bits of -0.0
    zero_down = (bits == 0) & down  # +0 down: the negative smallest subnormal (not the bits -1)
    zero_up = (bits == lowest) & ~down  # -0 up: the positive smallest subnormal (not a wrap-around)
    out_bits[zero_down] = lowest + smallest
    out_bits[zero_up] = smallest
    out = out_bits.view(arr.dtype)
    finite = np.isfinite(arr)
    if not finite.all():  # inf and NaN as nextafter moves them
        odd = ~finite
        out[odd] = np.nextafter(arr[odd], np.where(down[odd], -np.inf, np.inf).astype(arr.dtype))
    overflow = ~np.isfinite(out) & finite
    if overflow.any():
        out[overflow] = arr[overflow]
    return out.reshape(shape)


# Weights and activations may hold NaN and inf (corrupt data, a model that computes them): they
# propagate as in ONNX Runtime and the verdicts handle them; numpy's warnings about them would
# only be noise on the user's terminal.
def _quiet() -> np.errstate:
    return np.errstate(invalid="ignore", over="ignore", divide="ignore")


def half_ulp(arr: np.ndarray) -> np.ndarray:
    """Half the spacing of ``arr``'s own dtype at each value, in float64."""
    with _quiet():
        if arr.dtype.name == "bfloat16":  # 8 significant bits
            a = np.abs(arr.astype(np.float64))
            exp = np.floor(np.log2(np.where(a > 0, a, 2.0 ** -126)))
            return 0.5 * 2.0 ** (np.maximum(exp, -126) - 7)
        return 0.5 * np.abs(np.spacing(arr)).astype(np.float64)


def perturbed(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``arr`` in float64, each value moved uniformly within half an ulp of its own dtype."""
    with _quiet():
        return arr.astype(np.float64) + rng.uniform(-1.0, 1.0, arr.shape) * half_ulp(arr)


def _bn_class():
    from onnx.reference.op_run import OpRun

    class BatchNormalization(OpRun):
        """Inference BatchNormalization at every opset (training_mode=1 keeps batch statistics)."""

        op_domain = ""

        def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, spatial=None,  # noqa: D401
                 training_mode=None, is_test=None, consumed_inputs=None):
            eps = 1e-5 if epsilon is None else float(epsilon)
            if training_mode:
                axes = tuple(i for i in range(x.ndim) if i != 1)
                mean = x.mean(axis=axes)
                var = x.var(axis=axes)
            shape = (1, -1) + (1,) * (x.ndim - 2)
            if spatial == 0 and np.ndim(scale) > 1:  # opset < 9: per-(C, H, W) parameters
                shape = (1,) + tuple(np.shape(scale))

            def p(a):
                return np.asarray(a).reshape(shape)

            y = (x - p(mean)) / np.sqrt(p(var) + eps) * p(scale) + p(bias)
            extra = (mean, var, mean, var)[:len(self.output) - 1]
            return (y.astype(x.dtype, copy=False),) + tuple(np.asarray(e) for e in extra)

    return BatchNormalization


def _conv_class():
    from onnx.reference.ops.op_conv import Conv as StockConv

    class Conv(StockConv):
        """2-D Conv through numpy windows + tensordot (the stock im2col loop is ~10x slower); others: stock."""

        op_domain = ""

        def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None,
                 strides=None):
            if X.ndim != 4 or (auto_pad not in (None, "NOTSET", b"NOTSET", "VALID", b"VALID")):
                return super()._run(X, W, B, auto_pad=auto_pad, dilations=dilations, group=group,
                                    kernel_shape=kernel_shape, pads=pads, strides=strides)
            from numpy.lib.stride_tricks import sliding_window_view

            g = int(group or 1)
            kh, kw = W.shape[2], W.shape[3]
            dh, dw = dilations or (1, 1)
            sh, sw = strides or (1, 1)
            top, left, bottom, right = (0, 0, 0, 0) if auto_pad in ("VALID", b"VALID") or not pads else pads
            xp = np.pad(X, ((0, 0), (0, 0), (top, bottom), (left, right)))
            win = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
            win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # (N, C, OH, OW, kh, kw)
            n, c, oh, ow = win.shape[:4]
            m = W.shape[0]
            if g == 1:
                y = np.tensordot(win, W, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)
            elif g == c and m == c and W.shape[1] == 1:  # depthwise
                y = np.einsum("nchwij,cij->nchw", win, W[:, 0], optimize=True)
            else:
                cg, mg = c // g, m // g
                y = np.concatenate([np.tensordot(win[:, k * cg:(k + 1) * cg], W[k * mg:(k + 1) * mg],
                                                 axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)
                                    for k in range(g)], axis=1)
            if B is not None:
                y = y + B.reshape(1, -1, 1, 1)
            return (np.ascontiguousarray(y).astype(X.dtype, copy=False),)

    return Conv


def _pool_out(size: int, k: int, stride: int, head: int, tail: int, ceil_mode: Optional[int]) -> Tuple[int, int]:
    """Output length of a pooling axis and the -inf padding its last window needs beyond ``tail``.

    With ``ceil_mode`` a partial last window counts, but only if it starts inside the input or the
    head padding (ONNX Runtime's and PyTorch's rule; the ONNX spec's formula alone can add a window
    lying wholly in the tail padding)."""
    span = size + head + tail - k
    out = span // stride + 1
    if ceil_mode:
        out = -(-span // stride) + 1
        if (out - 1) * stride >= size + head:
            out -= 1
    return out, max(0, (out - 1) * stride + k - (size + head + tail))


def _max_pool_class():
    from onnx.reference.ops.op_max_pool import MaxPool as StockMaxPool

    class MaxPool(StockMaxPool):
        """2-D MaxPool through numpy windows (the stock one loops in Python, and with ``ceil_mode``
        and pads sizes its output unlike ONNX Runtime and PyTorch); others: stock."""

        op_domain = ""

        # the signature of onnx's own MaxPool._run, which already narrows CommonPool._run's
        def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None,  # type: ignore[override]
                 kernel_shape=None, pads=None, storage_order=None, strides=None):
            simple = (x.ndim == 4 and len(self.output) == 1 and not storage_order
                      and auto_pad in (None, "NOTSET", b"NOTSET", "VALID", b"VALID")
                      and (dilations is None or all(d == 1 for d in dilations))
                      and kernel_shape is not None and len(kernel_shape) == 2)
            if not simple:
                return super()._run(x, auto_pad=auto_pad, ceil_mode=ceil_mode, dilations=dilations,
                                    kernel_shape=kernel_shape, pads=pads, storage_order=storage_order,
                                    strides=strides)
            from numpy.lib.stride_tricks import sliding_window_view

            kh, kw = kernel_shape
            sh, sw = strides or (1, 1)
            top, left, bottom, right = (0, 0, 0, 0) if auto_pad in ("VALID", b"VALID") or not pads else pads
            (oh, extra_h), (ow, extra_w) = (_pool_out(x.shape[2], kh, sh, top, bottom, ceil_mode),
                                            _pool_out(x.shape[3], kw, sw, left, right, ceil_mode))
            xp = np.pad(x, ((0, 0), (0, 0), (top, bottom + extra_h), (left, right + extra_w)), constant_values=-np.inf)
            win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw][:, :, :oh, :ow]
            return (np.ascontiguousarray(win.max(axis=(4, 5))).astype(x.dtype, copy=False),)

    return MaxPool


def _conv_transpose_class():
    from onnx.reference.ops.op_conv_transpose import ConvTranspose as StockConvTranspose

    class ConvTranspose(StockConvTranspose):
        """2-D ConvTranspose through numpy (the stock one mis-reshapes grouped weights); others: stock."""

        op_domain = ""

        def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
                 output_padding=None, output_shape=None, pads=None, strides=None):
            if X.ndim != 4 or output_shape is not None or auto_pad not in (None, "NOTSET", b"NOTSET"):
                return super()._run(X, W, B, auto_pad=auto_pad, dilations=dilations, group=group,
                                    kernel_shape=kernel_shape, output_padding=output_padding,
                                    output_shape=output_shape, pads=pads, strides=strides)
            g = int(group or 1)
            n, c, h, w = X.shape
            kh, kw = W.shape[2], W.shape[3]
            mg = W.shape[1]
            cg = c // g
            dh, dw = dilations or (1, 1)
            sh, sw = strides or (1, 1)
            top, left, bottom, right = pads or (0, 0, 0, 0)
            oph, opw = output_padding or (0, 0)
            full_h = (h - 1) * sh + (kh - 1) * dh + 1 + oph
            full_w = (w - 1) * sw + (kw - 1) * dw + 1 + opw
            y = np.zeros((n, g * mg, full_h, full_w), dtype=np.result_type(X, W))
            for k in range(g):
                xg = X[:, k * cg:(k + 1) * cg]
                wg = W[k * cg:(k + 1) * cg]  # (cg, mg, kh, kw)
                for i in range(kh):
                    for j in range(kw):
                        contrib = np.tensordot(xg, wg[:, :, i, j], axes=([1], [0])).transpose(0, 3, 1, 2)
                        y[:, k * mg:(k + 1) * mg, i * dh:i * dh + (h - 1) * sh + 1:sh,
                          j * dw:j * dw + (w - 1) * sw + 1:sw] += contrib
            y = y[:, :, top:full_h - bottom, left:full_w - right]
            if B is not None:
                y = y + B.reshape(1, -1, 1, 1)
            return (np.ascontiguousarray(y).astype(X.dtype, copy=False),)

    return ConvTranspose


class Float64Evaluator:
    """An upcast model under onnx.reference; ``run(names, feeds)`` like an ORT session."""

    def __init__(self, model64: onnx.ModelProto) -> None:
        from onnx.reference import ReferenceEvaluator

        self.model = model64
        self.evaluator = ReferenceEvaluator(model64, new_ops=[_bn_class(), _conv_class(), _conv_transpose_class(),
                                                              _max_pool_class()])
        self.output_names = [o.name for o in model64.graph.output]

    def upcast_initializers(self) -> None:
        """Turn the evaluator's floating-point initializer arrays into float64 (exact: every
        float dtype converts to float64 without rounding)."""
        inits = self.evaluator.rt_inits_
        with _quiet():
            for name, v in inits.items():
                if isinstance(v, np.ndarray) and (v.dtype.kind == "f" or v.dtype.name == "bfloat16"):
                    inits[name] = v.astype(np.float64)

    def run_perturbed(self, originals: Sequence[Tuple[str, np.ndarray]], rng: np.random.Generator,
                      names: Optional[Sequence[str]], feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        """``run`` with every weight in ``originals`` (name, array in its own dtype) moved at random
        within half an ulp of its dtype (:func:`perturbed`); the weights are restored afterwards."""
        inits = self.evaluator.rt_inits_
        saved = {}
        try:
            for name, arr in originals:
                if name in inits:
                    saved[name] = inits[name]
                    inits[name] = perturbed(arr, rng)
            return self.run(names, feeds)
        finally:
            inits.update(saved)

    def run(self, names: Optional[Sequence[str]], feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        with _quiet():
            feeds64 = {k: (v.astype(np.float64) if v.dtype.kind == "f" or v.dtype.name == "bfloat16" else v)
                       for k, v in feeds.items()}
            return [np.asarray(v) for v in self.evaluator.run(list(names) if names else None, feeds64)]


class OwnDtypeEvaluator(Float64Evaluator):
    """The model as it is (no upcast) under onnx.reference with inference BN: for ORT's missing kernels."""

    def run(self, names: Optional[Sequence[str]], feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        with _quiet():
            return [np.asarray(v) for v in self.evaluator.run(list(names) if names else None, dict(feeds))]


def evaluator(model: onnx.ModelProto, already_float64: bool = False) -> Float64Evaluator:
    """A float64 evaluator of ``model`` (upcast here unless ``already_float64``)."""
    if already_float64:
        return Float64Evaluator(model)
    ev = Float64Evaluator(upcast(model, initializers=False))
    ev.upcast_initializers()
    return ev


@dataclass
class CostEstimate:
    macs: float
    nodes: int
    seconds: float  # one evaluation


def estimate_seconds(model: onnx.ModelProto, shapes: Mapping[str, Tuple[int, ...]]) -> CostEstimate:
    """Predicted seconds for one float64 evaluation at these input shapes (MACs + per-node cost).

    Shapes come from ONNX shape inference with the inputs fixed; a node whose shapes
    cannot be inferred counts only its per-node cost.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    g = probe.graph
    for v in g.input:
        if v.name in shapes and v.type.HasField("tensor_type"):
            dims = v.type.tensor_type.shape.dim
            del dims[:]
            for d in shapes[v.name]:
                dims.add().dim_value = int(d)
    # shape inference needs initializer shapes, not their data (small ones may be shapes: kept)
    for t in g.initializer:
        if t.data_location == TensorProto.EXTERNAL or t.ByteSize() > 4096:
            keep = (t.name, list(t.dims), t.data_type)
            t.Clear()
            t.name, t.data_type = keep[0], keep[2]
            t.dims.extend(keep[1])
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=False)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        inferred = probe
    known: Dict[str, Tuple[int, ...]] = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tt = v.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            known[v.name] = tuple(d.dim_value for d in tt.shape.dim)
    for t in model.graph.initializer:
        known[t.name] = tuple(t.dims)
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer if len(t.dims) >= 2}
    constant = {t.name for t in model.graph.initializer}
    macs = 0.0
    for n in model.graph.node:
        inputs = [i for i in n.input if i]
        if n.op_type == "Constant" or (inputs and all(i in constant for i in inputs)):
            # computed from constants alone (dynamo's Transpose of a weight): a weight for the
            # nodes that read it, and only a copy's cost itself, not one MAC per weight per row
            constant.update(n.output)
            for o in n.output:
                if len(known.get(o, ())) >= 2:
                    weights[o] = known[o]
                macs += float(np.prod(known.get(o, ())))
            continue
        macs += _node_macs(n, weights, known)
    nodes = len(model.graph.node)
    return CostEstimate(macs, nodes, macs / MACS_PER_SECOND + nodes * SECONDS_PER_NODE)


def _node_macs(node: onnx.NodeProto, weights: Mapping[str, Tuple[int, ...]],
               known: Mapping[str, Tuple[int, ...]]) -> float:
    """Multiply-adds of a node that reads a weight (an initializer of rank >= 2), whatever its op.

    A weight is applied once at each position of its input (a Conv's or ConvTranspose's
    pixels, a Gemm's or MatMul's rows), and each position costs one MAC per weight element
    (a grouped Conv's weight already holds only its groups' products). Positions are the
    tensor's elements over its feature count; the feature axis is axis 1 or the last one,
    whichever matches a weight dimension. The fewer positions of input and output count:
    a strided Conv writes fewer than it reads, a strided ConvTranspose reads fewer than it writes.
    """
    ws = [weights[i] for i in node.input if i in weights]
    if not ws:
        return 0.0
    w = max(ws, key=lambda d: float(np.prod(d)))
    data = [known[i] for i in node.input if i and i not in weights and i in known]
    tensors = [t for t in data[:1] + [known.get(o) for o in node.output[:1]] if t]

    def positions(t: Tuple[int, ...]) -> float:
        features = next((t[a] for a in (1, -1) if len(t) > 1 and t[a] in w), t[-1] if t else 1)
        return float(np.prod(t)) / max(1, features)

    if not tensors:
        return 0.0
    return float(np.prod(w)) * min(positions(t) for t in tensors)


def timed_run(ev: Float64Evaluator, names: Sequence[str], feeds: Mapping[str, np.ndarray]
              ) -> Tuple[Dict[str, np.ndarray], float]:
    """Outputs by name and the seconds the evaluation took."""
    t = time.perf_counter()
    values = ev.run(names, feeds)
    return dict(zip(names, values)), time.perf_counter() - t
