"""Calibration throughput: insert/recalibrate samples per second against plain ONNX Runtime
inference over the same data (CPU, batch 32).

    python benchmarks/calibration.py [--samples 512]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bnfold import fuse
from bnfold.insert import insert, recalibrate

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=512)
    args = ap.parse_args()
    for name, shape in (("resnet_mini", (3, 32, 32)), ("mobilenet_mini", (3, 32, 32))):
        path = ROOT / "models" / f"{name}.onnx"
        rng = np.random.default_rng(0)
        data = [{"input": rng.normal(size=(32,) + shape).astype(np.float32)} for _ in range(args.samples // 32)]
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        t = time.perf_counter()
        for d in data:
            sess.run(None, d)
        plain = args.samples / (time.perf_counter() - t)
        folded = fuse(path).model
        t = time.perf_counter()
        ins = insert(folded, calibration=data, batch_size=32)
        ins_rate = args.samples / (time.perf_counter() - t)
        t = time.perf_counter()
        rec = recalibrate(path, data, batch_size=32)
        rec_rate = args.samples / (time.perf_counter() - t)
        print(f"{name}: plain ORT inference {plain:.0f} samples/s; insert --calibration {ins_rate:.0f} samples/s "
              f"({ins.calibration.passes} pass); recalibrate {rec_rate:.0f} samples/s "
              f"({rec.calibration.passes} passes, {rec_rate * rec.calibration.passes:.0f} samples/s per pass)")


if __name__ == "__main__":
    main()
