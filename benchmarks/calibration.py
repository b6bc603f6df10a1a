"""Calibration throughput and accuracy: recalibrate (default one-pass method and --exact) and
insert --calibration, in samples/s against plain ONNX Runtime inference (default optimisation
level, same batches), plus how far the default statistics are from the exact ones. Each timing
is the fastest of --repeats runs (the machine is shared); the steady-state cost leaves out
loading, writing the probe model, creating the session and the first batch.

    python benchmarks/calibration.py [--corpus /work/corpus] [--samples 256] [--batch-size 32]

Models: the real networks of the corpus (``benchmarks/export_models.py``: timm/torchvision
exports with BN kept, random weights, trained-like statistics), torchscript float32 with a
dynamic batch dimension, found as ``CORPUS/<arch>.torchscript.float32.onnx``,
``CORPUS/torchscript/float32/<arch>.onnx`` or ``CORPUS/<arch>.onnx``. Data: seeded
standard-normal inputs. Timings include loading and writing nothing.

Differences between the default and the exact statistics, over every channel of every BN:
the largest |mean_default - mean_exact| / sigma_exact, the largest relative variance
difference |var_default - var_exact| / var_exact and its 99th percentile, and the largest
|var_default - var_exact| / (var_exact + epsilon), the change of the BN's denominator
sqrt(var + epsilon) that the outputs see (x2).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bnfold import fuse
from bnfold.insert import insert, recalibrate
from bnfold.modelio import load_model

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("resnet18", "resnet50", "mobilenetv2_100", "efficientnet_b0")


def rate(samples: int, seconds: float) -> float:
    return samples / seconds


def best(repeats: int, fn) -> tuple:
    """(shortest time, last result, shortest steady-state time) of ``repeats`` runs of
    ``fn(progress)``: on a shared machine the fastest run is the one least disturbed. The
    steady state runs from the first batch's end to the last's (setup and first batch out)."""
    times, steady, result = [], [], None
    for _ in range(repeats):
        marks: list = []
        t = time.perf_counter()
        result = fn(lambda samples, k, passes: marks.append(time.perf_counter()))
        times.append(time.perf_counter() - t)
        steady.append(marks[-1] - marks[0] if len(marks) > 1 else float("nan"))
    return min(times), result, min(steady)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=Path("/work/corpus"))
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--no-exact", action="store_true", help="Skip the (slow) exact method.")
    ap.add_argument("--repeats", type=int, default=3, help="Runs per timing; the fastest counts.")
    args = ap.parse_args()
    print(f"onnxruntime {ort.__version__}, {args.samples} samples, batch {args.batch_size}, CPU")
    print(f"load average: {os.getloadavg()[0]:.1f}; cost = time / plain time (end to end; steady state, "
          "first batch and setup excluded)")
    print("model | BNs | plain ORT samples/s | default samples/s (cost) | exact samples/s (cost, passes) | "
          "insert --calibration samples/s (cost) | default vs exact: max |dmean|/sigma | max rel dvar (p99) | "
          "max dvar/(var+eps)")
    for arch in args.models:
        path = find(args.corpus, arch)
        model = load_model(path)
        inp = model.graph.input[0]
        if inp.type.tensor_type.shape.dim[0].dim_value not in (0, args.batch_size):
            print(f"{arch} | {path}: fixed batch dimension {inp.type.tensor_type.shape.dim[0].dim_value}, skipped")
            continue
        shape = tuple(d.dim_value for d in inp.type.tensor_type.shape.dim[1:])
        rng = np.random.default_rng(0)
        data = [{inp.name: rng.normal(size=(args.batch_size,) + shape).astype(np.float32)}
                for _ in range(args.samples // args.batch_size)]
        n = len(data) * args.batch_size
        so = ort.SessionOptions()  # ORT's default optimisation level: what inference costs
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        sess.run(None, data[0])  # warm-up

        def plain_pass(progress) -> None:
            for d in data:
                sess.run(None, d)
                progress(0, 1, 1)

        t_plain, _, s_plain = best(args.repeats, plain_pass)
        plain = rate(n, t_plain)
        t_fast, fast, s_fast = best(args.repeats, lambda pr: recalibrate(model, data, batch_size=args.batch_size,
                                                                         progress=pr))
        fast_rate = rate(n, t_fast)
        exact_text, diffs = "-", (float("nan"),) * 4
        if not args.no_exact:
            t_exact, exact, _ = best(1, lambda pr: recalibrate(model, data, batch_size=args.batch_size, exact=True,
                                                               progress=pr))
            exact_rate = rate(n, t_exact)
            exact_text = f"{exact_rate:.0f} ({plain / exact_rate:.1f}x, {exact.calibration.passes} passes)"
            diffs = difference(fast.model, exact.model)
        folded = fuse(model).model
        t_ins, _, s_ins = best(args.repeats, lambda pr: insert(folded, calibration=data, batch_size=args.batch_size,
                                                               progress=pr))
        ins_rate = rate(n, t_ins)
        print(f"{arch} | {len(fast.recalibrated)} | {plain:.0f} | {fast_rate:.0f} ({plain / fast_rate:.2f}x; "
              f"{s_fast / s_plain:.2f}x) | {exact_text} | {ins_rate:.0f} ({plain / ins_rate:.2f}x; "
              f"{s_ins / s_plain:.2f}x) | {diffs[0]:.2e} | {diffs[1]:.2e} ({diffs[2]:.1e}) | {diffs[3]:.2e}",
              flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


def find(corpus: Path, arch: str) -> Path:
    for p in (corpus / f"{arch}.torchscript.float32.onnx", corpus / "torchscript" / "float32" / f"{arch}.onnx",
              corpus / f"{arch}.onnx"):
        if p.is_file():
            return p
    raise SystemExit(f"{arch}: no model in {corpus}")


def difference(a, b):
    """Over all BN channels of ``a`` against ``b``: the largest |mean_a - mean_b| / sqrt(var_b),
    the largest |var_a - var_b| / var_b and its 99th percentile, and the largest
    |var_a - var_b| / (var_b + epsilon)."""
    from onnx import numpy_helper

    def stats(m):
        w = {t.name: t for t in m.graph.initializer}
        return {n.name: (numpy_helper.to_array(w[n.input[3]]).astype(np.float64),
                         numpy_helper.to_array(w[n.input[4]]).astype(np.float64),
                         next((at.f for at in n.attribute if at.name == "epsilon"), 1e-5))
                for n in m.graph.node if n.op_type == "BatchNormalization"}

    sa, sb = stats(a), stats(b)
    dmean = max(float(np.max(np.abs(sa[k][0] - sb[k][0]) / np.sqrt(sb[k][1]))) for k in sb)
    rel = np.concatenate([np.abs(sa[k][1] - sb[k][1]) / sb[k][1] for k in sb])
    eps = max(float(np.max(np.abs(sa[k][1] - sb[k][1]) / (sb[k][1] + sb[k][2]))) for k in sb)
    return dmean, float(rel.max()), float(np.percentile(rel, 99)), eps


if __name__ == "__main__":
    main()
