"""Build the small sample models shipped in models/ (numpy + onnx; ONNX Runtime to calibrate).

Each model looks like what users ship: He-initialised weights whose per-channel
scale spreads over two orders of magnitude, and BatchNormalization statistics that
were *measured*: every BN's running mean/var is set from the activations that reach
it on random data (then perturbed a little, as running estimates are), with
gamma != 1 and beta != 0. No identity BNs.

    python models/make_models.py            # rewrites models/*.onnx deterministically
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = Path(__file__).resolve().parent
IR_VERSION = 8  # loadable by every ONNX Runtime from 1.10 on


class Builder:
    """A tiny graph builder: named nodes, He-initialised weights, BN placeholders."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: List[onnx.NodeProto] = []
        self.inits: Dict[str, np.ndarray] = {}
        self.bns: List[onnx.NodeProto] = []
        self.count: Dict[str, int] = {}

    def name(self, prefix: str) -> str:
        self.count[prefix] = self.count.get(prefix, 0) + 1
        return f"{prefix}{self.count[prefix]}"

    def weight(self, name: str, shape, fan_in: int, channel_axis: int = 0) -> str:
        w = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)
        spread = 10.0 ** self.rng.uniform(-1, 1, size=shape[channel_axis])
        shape_c = [1] * len(shape)
        shape_c[channel_axis] = shape[channel_axis]
        self.inits[name] = (w * spread.reshape(shape_c)).astype(np.float32)
        return name

    def node(self, op: str, inputs, prefix: Optional[str] = None, **attrs) -> str:
        n = self.name(prefix or op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [n], name=n, **attrs))
        return n

    def conv(self, x, cin, cout, k, stride=1, group=1, bias=False, pad=None, transpose=False, output_padding=None):
        prefix = "deconv" if transpose else "conv"
        n = self.name(prefix)
        pad = k // 2 if pad is None else pad
        if transpose:
            shape = (cin, cout // group, k, k)
            w = self.weight(f"{n}.weight", shape, cin // group * k * k, channel_axis=1)
        else:
            shape = (cout, cin // group, k, k)
            w = self.weight(f"{n}.weight", shape, cin // group * k * k)
        inputs = [x, w]
        if bias:
            self.inits[f"{n}.bias"] = self.rng.normal(0, 0.1, size=cout).astype(np.float32)
            inputs.append(f"{n}.bias")
        attrs = dict(kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group)
        if output_padding:
            attrs["output_padding"] = output_padding
        self.nodes.append(helper.make_node("ConvTranspose" if transpose else "Conv", inputs, [n], name=n, **attrs))
        return n

    def bn(self, x, c) -> str:
        n = self.name("bn")
        for p, v in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.inits[f"{n}.{p}"] = np.full(c, v, dtype=np.float32)
        node = helper.make_node("BatchNormalization", [x] + [f"{n}.{p}" for p in
                                ("weight", "bias", "running_mean", "running_var")], [n], name=n, epsilon=1e-5)
        self.nodes.append(node)
        self.bns.append(node)
        return n

    def relu(self, x):
        return self.node("Relu", [x])

    def relu6(self, x):
        if "zero" not in self.inits:
            self.inits["zero"] = np.array(0.0, dtype=np.float32)
            self.inits["six"] = np.array(6.0, dtype=np.float32)
        return self.node("Clip", [x, "zero", "six"], prefix="relu6_")

    def const(self, name, value):
        self.inits[name] = value
        return name

    def model(self, inputs, outputs, opset=15) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "main", inputs, outputs,
                                  [numpy_helper.from_array(v, k) for k, v in self.inits.items()])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="bnfold-models")
        m.ir_version = IR_VERSION
        return m


def calibrate(model: onnx.ModelProto, builder: Builder, feed_shape, seed: int) -> onnx.ModelProto:
    """Set every BN's statistics from the activations that reach it (in graph order)."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    x = rng.normal(size=feed_shape).astype(np.float32)
    input_name = model.graph.input[0].name
    inits = {t.name: t for t in model.graph.initializer}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for bn in builder.bns:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.append(helper.make_empty_tensor_value_info(bn.input[0]))
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
        act = sess.run([bn.input[0]], {input_name: x})[0].astype(np.float64)
        axes = tuple(i for i in range(act.ndim) if i != 1)
        mean, var = act.mean(axis=axes), act.var(axis=axes)
        c = mean.shape[0]
        stats = {
            "weight": rng.uniform(0.5, 1.5, c) * np.where(rng.random(c) < 0.05, -1, 1),
            "bias": rng.normal(0, 0.3, c),
            "running_mean": mean * (1 + rng.normal(0, 0.05, c)),
            "running_var": var * np.exp(rng.normal(0, 0.2, c)),
        }
        for p, v in stats.items():
            inits[f"{bn.name}.{p}"].CopyFrom(numpy_helper.from_array(v.astype(np.float32), f"{bn.name}.{p}"))
    return model


def image_io(b: Builder, c, hw, out_name, out_shape):
    return ([helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, hw, hw])],
            [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)])


def resnet_mini() -> onnx.ModelProto:
    """ResNet-style: stem, basic blocks with projection shortcuts, global pool, Gemm head."""
    b = Builder(1)
    x = b.relu(b.bn(b.conv("input", 3, 16, 3), 16))
    c = 16
    for cout, stride in ((16, 1), (32, 2), (32, 1), (64, 2), (64, 1)):
        y = b.relu(b.bn(b.conv(x, c, cout, 3, stride), cout))
        y = b.bn(b.conv(y, cout, cout, 3), cout)
        short = x if (stride == 1 and cout == c) else b.bn(b.conv(x, c, cout, 1, stride, pad=0), cout)
        x = b.relu(b.node("Add", [y, short]))
        c = cout
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])])
    b.weight("fc.weight", (10, c), c)
    b.inits["fc.bias"] = b.rng.normal(0, 0.1, 10).astype(np.float32)
    b.nodes.append(helper.make_node("Gemm", [x, "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    m = b.model(*image_io(b, 3, 32, "logits", ["N", 10]))
    return calibrate(m, b, (8, 3, 32, 32), 11)


def mobilenet_mini() -> onnx.ModelProto:
    """MobileNet-style: inverted residuals with depthwise Conv (multiplier 1 and 2), ReLU6."""
    b = Builder(2)
    x = b.relu6(b.bn(b.conv("input", 3, 16, 3, 2), 16))
    c = 16
    for expand, cout, stride, mult in ((2, 24, 2, 1), (3, 24, 1, 1), (2, 32, 2, 2), (3, 32, 1, 1)):
        hidden = c * expand
        y = b.relu6(b.bn(b.conv(x, c, hidden, 1, pad=0), hidden))
        y = b.relu6(b.bn(b.conv(y, hidden, hidden * mult, 3, stride, group=hidden), hidden * mult))
        y = b.bn(b.conv(y, hidden * mult, cout, 1, pad=0), cout)
        x = b.node("Add", [x, y]) if (stride == 1 and cout == c) else y
        c = cout
    x = b.relu6(b.bn(b.conv(x, c, 128, 1, pad=0), 128))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])])
    b.weight("classifier.weight", (128, 10), 128, channel_axis=1)
    b.inits["classifier.bias"] = b.rng.normal(0, 0.1, 10).astype(np.float32)
    b.nodes.append(helper.make_node("Gemm", [x, "classifier.weight", "classifier.bias"], ["logits"],
                                    name="classifier"))
    m = b.model(*image_io(b, 3, 32, "logits", ["N", 10]))
    return calibrate(m, b, (8, 3, 32, 32), 12)


def mlp_bn1d() -> onnx.ModelProto:
    """MLP with BatchNorm1d after Gemm (transB=1, as PyTorch exports Linear), MatMul+Add and bare MatMul."""
    b = Builder(3)
    b.weight("fc1.weight", (128, 64), 64)
    b.inits["fc1.bias"] = b.rng.normal(0, 0.1, 128).astype(np.float32)
    b.nodes.append(helper.make_node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["fc1"], name="fc1", transB=1))
    x = b.relu(b.bn("fc1", 128))
    b.weight("fc2.weight", (128, 96), 128, channel_axis=1)
    mm = b.node("MatMul", [x, "fc2.weight"], prefix="fc2_matmul")
    b.inits["fc2.bias"] = b.rng.normal(0, 0.1, 96).astype(np.float32)
    x = b.relu(b.bn(b.node("Add", [mm, "fc2.bias"], prefix="fc2_add"), 96))
    b.weight("fc3.weight", (96, 48), 96, channel_axis=1)
    x = b.node("Tanh", [b.bn(b.node("MatMul", [x, "fc3.weight"], prefix="fc3_matmul"), 48)])
    b.weight("head.weight", (48, 5), 48, channel_axis=1)
    b.nodes.append(helper.make_node("Gemm", [x, "head.weight"], ["scores"], name="head", alpha=0.5))
    m = b.model([helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
                [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 5])])
    return calibrate(m, b, (32, 64), 13)


def decoder_deconv() -> onnx.ModelProto:
    """Decoder: ConvTranspose upsampling (plain, grouped with output_padding), Conv head."""
    b = Builder(4)
    x = b.relu(b.bn(b.conv("input", 32, 32, 4, 2, pad=1, transpose=True), 32))
    x = b.relu(b.bn(b.conv(x, 32, 16, 3, 2, group=4, pad=1, transpose=True, output_padding=[1, 1], bias=True), 16))
    x = b.relu(b.bn(b.conv(x, 16, 16, 3, 1, group=2, pad=1, transpose=True), 16))
    x = b.node("Sigmoid", [b.bn(b.conv(x, 16, 3, 3), 3)])
    m = b.model([helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 32, 8, 8])],
                [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 3, 32, 32])])
    return calibrate(m, b, (4, 32, 8, 8), 14)


def vit_bn1d() -> onnx.ModelProto:
    """Token MLP as vision transformers with BatchNorm1d export: MatMul on [B, T, C],
    Reshape to [B*T, C], BN, Reshape back."""
    b = Builder(5)
    b.const("flat", np.array([-1, 64], dtype=np.int64))
    b.const("tokens", np.array([-1, 16, 64], dtype=np.int64))
    b.weight("proj.weight", (32, 64), 32, channel_axis=1)
    b.inits["proj.bias"] = b.rng.normal(0, 0.1, 64).astype(np.float32)
    x = b.node("Add", [b.node("MatMul", ["input", "proj.weight"], prefix="proj"), "proj.bias"], prefix="proj_add")
    x = b.node("Reshape", [b.bn(b.node("Reshape", [x, "flat"]), 64), "tokens"])
    x = b.relu(x)
    b.weight("mlp.weight", (64, 64), 64, channel_axis=1)
    x = b.node("MatMul", [x, "mlp.weight"], prefix="mlp")
    x = b.node("Reshape", [b.bn(b.node("Reshape", [x, "flat"]), 64), "tokens"])
    m = b.model([helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16, 32])],
                [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 16, 64])])
    return calibrate(m, b, (4, 16, 32), 15)


MODELS = {
    "resnet_mini.onnx": resnet_mini,
    "mobilenet_mini.onnx": mobilenet_mini,
    "mlp_bn1d.onnx": mlp_bn1d,
    "decoder_deconv.onnx": decoder_deconv,
    "vit_bn1d.onnx": vit_bn1d,
}


def main(argv: List[str]) -> None:
    for name, make in MODELS.items():
        model = make()
        onnx.checker.check_model(model, full_check=True)
        (OUT / name).write_bytes(model.SerializeToString())
        print(f"{name}: {sum(n.op_type == 'BatchNormalization' for n in model.graph.node)} BN, "
              f"{len(model.graph.node)} nodes, {model.ByteSize() / 1024:.0f} KB")


if __name__ == "__main__":
    main(sys.argv[1:])
