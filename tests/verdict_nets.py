"""Real-size test networks built with numpy + onnx.helper, and an independent numpy BN fold.

``resnet18_like`` and ``mobilenet_like`` have the real channel widths of their namesakes (small
spatial size keeps the tests fast). BN statistics are trained-like: each BN's running mean and
variance are measured (ONNX Runtime, optimisations off) on the activations reaching it, layer by
layer, then jittered, so activations stay O(1) through the depth as in a trained network.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Net:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: List[onnx.NodeProto] = []
        self.inits: Dict[str, np.ndarray] = {}
        self.n = 0

    def name(self, p: str) -> str:
        self.n += 1
        return f"{p}{self.n}"

    def conv_bn(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1,
                act: Optional[str] = "Relu") -> str:
        w = self.name("w")
        self.inits[w] = (self.rng.normal(0, np.sqrt(2.0 / (cin // group * k * k)), (cout, cin // group, k, k)))
        c = self.name("conv")
        self.nodes.append(helper.make_node("Conv", [x, w], [c], name=c, kernel_shape=[k, k], strides=[stride, stride],
                                           pads=[k // 2] * 4, group=group))
        names = [self.name(p) for p in ("gamma", "beta", "mean", "var")]
        self.inits[names[0]] = self.rng.uniform(0.5, 1.5, cout) * np.where(self.rng.random(cout) < 0.1, -1, 1)
        self.inits[names[1]] = self.rng.normal(0, 0.2, cout)
        self.inits[names[2]] = np.zeros(cout)
        self.inits[names[3]] = np.ones(cout)
        b = self.name("bn")
        self.nodes.append(helper.make_node("BatchNormalization", [c] + names, [b], name=b, epsilon=1e-5))
        if act is None:
            return b
        a = self.name(act.lower())
        if act == "Clip":
            self.inits.setdefault("zero", np.array(0.0))
            self.inits.setdefault("six", np.array(6.0))
            self.nodes.append(helper.make_node("Clip", [b, "zero", "six"], [a], name=a))
        else:
            self.nodes.append(helper.make_node(act, [b], [a], name=a))
        return a

    def add(self, a: str, b: str, relu: bool = True) -> str:
        s = self.name("add")
        self.nodes.append(helper.make_node("Add", [a, b], [s], name=s))
        if not relu:
            return s
        r = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [s], [r], name=r))
        return r

    def head(self, x: str, cin: int, classes: int) -> None:
        p, f = self.name("pool"), self.name("flat")
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], [p], name=p))
        self.nodes.append(helper.make_node("Flatten", [p], [f], name=f))
        self.inits["fc_w"] = self.rng.normal(0, np.sqrt(1.0 / cin), (classes, cin))
        self.inits["fc_b"] = self.rng.normal(0, 0.01, classes)
        self.nodes.append(helper.make_node("Gemm", [f, "fc_w", "fc_b"], ["logits"], name="fc", transB=1))

    def model(self, dtype, size: int, classes: int) -> onnx.ModelProto:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        graph = helper.make_graph(
            self.nodes, "net", [helper.make_tensor_value_info("x", elem, ["N", 3, size, size])],
            [helper.make_tensor_value_info("logits", elem, ["N", classes])],
            [numpy_helper.from_array(np.asarray(v).astype(dtype), k) for k, v in self.inits.items()])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return m


def _calibrate(net: _Net, size: int, classes: int) -> None:
    """Trained-like BN statistics: measured on the activations reaching each BN, in order."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    x = net.rng.standard_normal((4, 3, size, size)).astype(np.float32)
    bns = [n for n in net.nodes if n.op_type == "BatchNormalization"]
    # one session: every BN's mean and variance are graph inputs, set layer by layer
    m = net.model(np.float32, size, classes)
    stats = {n for bn in bns for n in bn.input[3:5]}
    kept = [t for t in m.graph.initializer if t.name not in stats]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    for name in sorted(stats):
        m.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [None]))
    for bn in bns:
        m.graph.output.append(helper.make_empty_tensor_value_info(bn.input[0]))
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for bn in bns:
        feeds = {n: np.asarray(net.inits[n], np.float32) for n in stats}
        feeds["x"] = x
        act = sess.run([bn.input[0]], feeds)[0].astype(np.float64)
        mean = act.mean(axis=(0, 2, 3))
        var = act.var(axis=(0, 2, 3))
        net.inits[bn.input[3]] = mean + net.rng.normal(0, 0.05, mean.shape) * np.sqrt(var)
        net.inits[bn.input[4]] = var * net.rng.uniform(0.8, 1.25, var.shape) + 1e-4


def resnet18_like(dtype=np.float32, size: int = 32, seed: int = 0, classes: int = 100,
                  widths=(64, 128, 256, 512)) -> onnx.ModelProto:
    """ResNet-18 topology (basic blocks, 20 Conv+BN pairs) with trained-like BN statistics."""
    net = _Net(seed)
    x = net.conv_bn("x", 3, widths[0], 3, 1)
    cin = widths[0]
    for i, w in enumerate(widths):
        for j in range(2):
            stride = 2 if (j == 0 and i > 0) else 1
            y = net.conv_bn(x, cin, w, 3, stride)
            y = net.conv_bn(y, w, w, 3, 1, act=None)
            short = net.conv_bn(x, cin, w, 1, stride, act=None) if (stride != 1 or cin != w) else x
            x = net.add(y, short)
            cin = w
    net.head(x, cin, classes)
    _calibrate(net, size, classes)
    return net.model(dtype, size, classes)


def mobilenet_like(dtype=np.float32, size: int = 32, seed: int = 0, classes: int = 100,
                   widths=(32, 64, 128, 128, 256, 256, 512, 512)) -> onnx.ModelProto:
    """MobileNet-v1 topology (depthwise + pointwise Conv+BN+Relu6) with trained-like BN statistics."""
    net = _Net(seed)
    x = net.conv_bn("x", 3, widths[0], 3, 1, act="Clip")
    cin = widths[0]
    for i, w in enumerate(widths[1:]):
        x = net.conv_bn(x, cin, cin, 3, 2 if i % 2 == 1 else 1, group=cin, act="Clip")
        x = net.conv_bn(x, cin, w, 1, 1, act="Clip")
        cin = w
    net.head(x, cin, classes)
    _calibrate(net, size, classes)
    return net.model(dtype, size, classes)


# -- an independent numpy fold -------------------------------------------------------------------

def _arr(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def fold_numpy(model: onnx.ModelProto, bug: Optional[str] = None, bug_layer: Optional[int] = None) -> onnx.ModelProto:
    """Fold every Conv+BN pair in numpy (float64, rounded once to the model's dtype).

    ``bug`` plants a wrong fold in pair number ``bug_layer`` (default: the middle one):
    ``mean_dropped``, ``no_sqrt`` (variance used without sqrt), ``swap_channels`` (output
    channels 0 and 1 swapped), ``shift_twice`` (BN shift added twice), ``channel_1pct``
    (output channel 0 of the folded weight scaled by 1.01).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    producers = {o: n for n in g.node for o in n.output}
    pairs = [(producers[n.input[0]], n) for n in g.node
             if n.op_type == "BatchNormalization" and producers.get(n.input[0]) is not None
             and producers[n.input[0]].op_type == "Conv"]
    if bug_layer is None:
        bug_layer = len(pairs) // 2
    drop = set()
    new_inits: Dict[str, np.ndarray] = {}
    for k, (conv, bn) in enumerate(pairs):
        w = _arr(model, conv.input[1])
        dtype = w.dtype
        w64 = w.astype(np.float64)
        b64 = _arr(model, conv.input[2]).astype(np.float64) if len(conv.input) > 2 else np.zeros(w.shape[0])
        gamma, beta, mean, var = (_arr(model, n).astype(np.float64) for n in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        this = bug if k == bug_layer else None
        if this == "mean_dropped":
            mean = np.zeros_like(mean)
        denom = (var + eps) if this == "no_sqrt" else np.sqrt(var + eps)
        scale = gamma / denom
        w_new = w64 * scale.reshape(-1, 1, 1, 1)
        b_new = (b64 - mean) * scale + beta
        if this == "shift_twice":
            b_new = b_new + beta
        if this == "swap_channels":
            w_new[[0, 1]] = w_new[[1, 0]]
            b_new[[0, 1]] = b_new[[1, 0]]
        if this == "channel_1pct":
            w_new[0] *= 1.01
        wn, bn_name = conv.input[1] + "_folded", conv.name + "_bias_folded"
        new_inits[wn] = w_new.astype(dtype)
        new_inits[bn_name] = b_new.astype(dtype)
        conv.input[1] = wn
        if len(conv.input) > 2:
            conv.input[2] = bn_name
        else:
            conv.input.append(bn_name)
        conv.output[0] = bn.output[0]
        drop.add(id(bn))
    keep = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in new_inits.items())
    return out


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same network in float16 (weights rounded once, types changed)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    return out


BUGS = ("mean_dropped", "no_sqrt", "swap_channels", "shift_twice", "channel_1pct")
