"""Calibration throughput and accuracy: recalibrate (default one-pass method and --exact) and
insert --calibration, in samples/s against plain ONNX Runtime inference (default optimisation
level, same batches), plus how far the default statistics are from the exact ones. The machine
is shared, so plain, default and insert runs are interleaved in rounds and each cost is the
median of the per-round ratios; the steady-state cost leaves out loading, writing the probe
model, creating the session and the first batch.

    python benchmarks/calibration.py [--corpus DIR] [--samples 256] [--batch-size 32] [--seed 0]

Models: the real networks of the corpus (``benchmarks/export_models.py``: timm/torchvision
exports with BN kept, random weights, trained-like statistics), torchscript float32 with a
dynamic batch dimension, found as ``CORPUS/<arch>.torchscript.float32.onnx``,
``CORPUS/torchscript/float32/<arch>.onnx`` or ``CORPUS/<arch>.onnx``. Data: seeded
standard-normal inputs. Timings include loading and writing nothing.

Differences between the default and the exact statistics, over every channel of every BN:
the largest |mean_default - mean_exact| / sigma_exact, the largest relative variance
difference |var_default - var_exact| / var_exact and its 99th percentile, and the largest
|var_default - var_exact| / (var_exact + epsilon), the change of the BN's denominator
sqrt(var + epsilon) that the outputs see (x2). For scale, the same differences between the exact
method on these samples and on another draw of as many (seed 1): how far the statistics themselves
move with the data.
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


def timed(fn) -> tuple:
    """(end-to-end seconds, steady-state seconds, result) of one ``fn(progress)`` run; the
    steady state runs from the first batch's end to the last's (setup and first batch out)."""
    marks: list = []
    t = time.perf_counter()
    result = fn(lambda samples, k, passes: marks.append(time.perf_counter()))
    total = time.perf_counter() - t
    return total, (marks[-1] - marks[0] if len(marks) > 1 else float("nan")), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=Path("/work/corpus"))
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--no-exact", action="store_true", help="Skip the (slow) exact method.")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the data draw (the exact method's second draw uses seed + 1)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="Rounds of plain / default / insert runs, interleaved; the median per-round ratio counts.")
    args = ap.parse_args()
    print(f"onnxruntime {ort.__version__}, {args.samples} samples (seed {args.seed}), batch {args.batch_size}, CPU, "
          f"{args.rounds} rounds")
    print(f"load average: {os.getloadavg()[0]:.1f}; samples/s from each method's fastest run; cost = median over "
          "rounds of time / the same round's plain time (end to end; steady state: setup and first batch excluded; "
          "plain excludes its session creation); exact: one run, against the plain runs just before and after it")
    print("model | BNs | plain ORT samples/s | default samples/s (cost) | exact samples/s (cost, passes) | "
          "insert --calibration samples/s (cost) | default vs exact: max |dmean|/sigma | max rel dvar (p99) | "
          "max dvar/(var+eps) | exact on other samples vs exact: max |dmean|/sigma | max rel dvar (p99)")
    for arch in args.models:
        path = find(args.corpus, arch)
        model = load_model(path)
        inp = model.graph.input[0]
        if inp.type.tensor_type.shape.dim[0].dim_value not in (0, args.batch_size):
            print(f"{arch} | {path}: fixed batch dimension {inp.type.tensor_type.shape.dim[0].dim_value}, skipped")
            continue
        shape = tuple(d.dim_value for d in inp.type.tensor_type.shape.dim[1:])
        rng = np.random.default_rng(args.seed)
        data = [{inp.name: rng.normal(size=(args.batch_size,) + shape).astype(np.float32)}
                for _ in range(args.samples // args.batch_size)]
        n = len(data) * args.batch_size
        so = ort.SessionOptions()  # ORT's default optimisation level: what inference costs
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        sess.run(None, data[0])  # warm-up
        folded = fuse(model).to_model()

        def plain_pass(progress) -> None:
            for d in data:
                sess.run(None, d)
                progress(0, 1, 1)

        rounds = []  # per round: (plain, default, insert) x (end to end, steady)
        fast = None
        for _ in range(args.rounds):  # interleaved: a busy spell on a shared machine hits all three alike
            p_t, p_s, _ = timed(plain_pass)
            f_t, f_s, fast = timed(lambda pr: recalibrate(model, data, batch_size=args.batch_size, progress=pr))
            i_t, i_s, _ = timed(lambda pr: insert(folded, calibration=data, batch_size=args.batch_size, progress=pr))
            rounds.append((p_t, p_s, f_t, f_s, i_t, i_s))
        r = np.array(rounds)
        plain = rate(n, r[:, 0].min())

        def cost(k: int) -> str:
            return f"{np.median(r[:, k] / r[:, 0]):.2f}x; {np.median(r[:, k + 1] / r[:, 1]):.2f}x"

        exact_text, diffs, spread = "-", (float("nan"),) * 4, (float("nan"),) * 4
        if not args.no_exact:
            before, _, _ = timed(plain_pass)
            t_exact, _, exact = timed(lambda pr: recalibrate(model, data, batch_size=args.batch_size, exact=True,
                                                             progress=pr))
            after, _, _ = timed(plain_pass)
            exact_text = (f"{rate(n, t_exact):.0f} ({t_exact / ((before + after) / 2):.1f}x, "
                          f"{exact.calibration.passes} passes)")
            diffs = difference(fast.model, exact.model)
            # the exact method's own spread: the same method on another draw of as many samples
            rng1 = np.random.default_rng(args.seed + 1)
            other = [{inp.name: rng1.normal(size=(args.batch_size,) + shape).astype(np.float32)}
                     for _ in range(args.samples // args.batch_size)]
            spread = difference(recalibrate(model, other, batch_size=args.batch_size, exact=True).model,
                                exact.model)
        print(f"{arch} | {len(fast.recalibrated)} | {plain:.0f} | {rate(n, r[:, 2].min()):.0f} ({cost(2)}) | "
              f"{exact_text} | {rate(n, r[:, 4].min()):.0f} ({cost(4)}) | {diffs[0]:.2e} | {diffs[1]:.2e} "
              f"({diffs[2]:.1e}) | {diffs[3]:.2e} | {spread[0]:.2e} | {spread[1]:.2e} ({spread[2]:.1e})", flush=True)
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
