"""Write a large Conv/BN model with external data, never holding it in memory.

    python benchmarks/make_large_model.py OUT.onnx [--layers 22] [--channels 2048]

Each layer is Conv(C->C, 3x3, pad 1) + BatchNormalization + Relu; the Conv weights
([C, C, 3, 3] float32, 151 MB each at C=2048) are generated and appended to
``OUT.onnx.data`` a block of output channels at a time, so memory stays at one
block whatever the total (22 layers at C=2048: 3.3 GB). BN statistics are
trained-like (non-zero means, variances spread over a decade, gamma != 1).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def make(out: Path, layers: int, channels: int, hw: int = 4, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    data_name = out.name + ".data"
    inits, nodes = [], []
    offset = 0
    x = "input"
    with open(out.parent / data_name, "wb") as data:
        for i in range(layers):
            t = TensorProto(name=f"conv{i}.weight", data_type=TensorProto.FLOAT, dims=[channels, channels, 3, 3])
            start = offset
            std = np.sqrt(2.0 / (channels * 9))
            for c in range(0, channels, 64):  # one block of output channels at a time
                block = (rng.standard_normal((min(64, channels - c), channels, 3, 3)) * std).astype(np.float32)
                data.write(block.tobytes())
                offset += block.nbytes
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(start)), ("length", str(offset - start))):
                t.external_data.add(key=k, value=v)
            inits.append(t)
            stats = {"weight": rng.uniform(0.5, 1.5, channels), "bias": rng.normal(0, 0.2, channels),
                     "mean": rng.normal(0, 0.3, channels), "var": 10 ** rng.uniform(-0.5, 0.5, channels)}
            for k, v in stats.items():
                inits.append(numpy_helper.from_array(v.astype(np.float32), f"bn{i}.{k}"))
            nodes += [helper.make_node("Conv", [x, f"conv{i}.weight"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                      helper.make_node("BatchNormalization", [f"c{i}"] + [f"bn{i}.{k}" for k in stats],
                                       [f"b{i}"], name=f"bn{i}"),
                      helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}")]
            x = f"r{i}"
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                           ["N", channels, hw, hw])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", channels, hw, hw])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], producer_name="bnfold-bench")
    model.ir_version = 8
    out.write_bytes(model.SerializeToString())


def main() -> None:
    ap = argparse.ArgumentParser(description="Write a large Conv/BN model with external data.")
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--channels", type=int, default=2048)
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    make(args.out, args.layers, args.channels)
    size = os.path.getsize(args.out.parent / (args.out.name + ".data"))
    print(f"{args.out}: {args.layers} Conv/BN layers, {size / 2**30:.2f} GiB of external data")


if __name__ == "__main__":
    main()
