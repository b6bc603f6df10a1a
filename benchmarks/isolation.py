"""What running ONNX Runtime in a worker process costs (bnfold.runner's isolation).

    python benchmarks/isolation.py [--model resnet50.onnx] [--runs 15]

1. Start: from asking for a worker until it has imported onnxruntime and answered,
   for fork, spawn (bnfold's two start methods) and multiprocessing's forkserver
   (first and second process). Each measured in a fresh Python process that has not
   imported onnxruntime (as bnfold's CLI).
2. Per run on the model (batch 1 and 8 at 224x224): median ms in the worker against
   ONNX Runtime in this process, and the bare round trip of the feeds.
3. Calibration-style run exposing every BatchNormalization input as an output
   (batch 8): all outputs sent back vs a reduction in the worker (per-channel
   statistics only), vs in this process.

Timings are medians; the machine is shared, so read differences below a few ms as noise.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = Path("/work/corpus/models/resnet50.torchscript.float32.onnx")

START_CODE = """
import json, os, sys, time
sys.path.insert(0, {root!r})
from bnfold import runner
os.environ[runner.START_ENV] = {method!r}
t = time.perf_counter()
runner._worker().request({{"op": "ping", "import_ort": True}})
print(json.dumps({{"first": time.perf_counter() - t, "second": None}}))
"""

# multiprocessing's forkserver needs the target importable from a main module
FORKSERVER_SCRIPT = """
import json, time
import multiprocessing as mp

import numpy  # preloaded in the server with __main__, as bnfold's parent has it


def probe(conn):
    import onnxruntime
    conn.send(onnxruntime.__version__)


if __name__ == "__main__":
    ctx = mp.get_context("forkserver")
    times = []
    for _ in range(2):
        a, b = ctx.Pipe()
        t = time.perf_counter()
        p = ctx.Process(target=probe, args=(b,))
        p.start()
        b.close()
        a.recv()
        times.append(time.perf_counter() - t)
        p.join()
    print(json.dumps({"first": times[0], "second": times[1]}))
"""


def start_costs(trials: int) -> dict:
    out = {}
    for method in ("fork", "spawn", "forkserver"):
        firsts, seconds = [], []
        for _ in range(trials):
            if method == "forkserver":
                with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
                    f.write(FORKSERVER_SCRIPT)
                cmd = [sys.executable, f.name]
            else:
                cmd = [sys.executable, "-c", START_CODE.format(root=str(ROOT), method=method)]
            res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout)
            if method == "forkserver":
                os.unlink(cmd[1])
            firsts.append(res["first"])
            if res["second"] is not None:
                seconds.append(res["second"])
        out[method] = {"first_s": statistics.median(firsts)}
        if seconds:
            out[method]["second_s"] = statistics.median(seconds)
    return out


def _median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def _interleaved_ms(fns: dict, runs: int) -> dict:
    """Median ms of each function, run in turn (load on a shared machine drifts: this spreads it evenly)."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def any_size_copy(model: Path) -> Path:
    """A copy of ``model`` whose input takes any batch and spatial size (the corpus is exported at 64x64)."""
    import onnx

    m = onnx.load(str(model))
    for d, name in zip(m.graph.input[0].type.tensor_type.shape.dim, ("batch", None, "height", "width")):
        if name:
            d.dim_param = name
    del m.graph.value_info[:]
    path = Path(tempfile.mkdtemp(prefix="bnfold-bench-")) / model.name
    onnx.save(m, str(path))
    return path


def _pair(model: Path):
    """The same model in the worker and (ISOLATE off) in this process; the worker first, so it forks
    before this process imports onnxruntime."""
    from bnfold import runner

    remote = runner.open_runner(model, runner.CPU)
    runner.ISOLATE = False
    try:
        local = runner.open_runner(model, runner.CPU)
    finally:
        runner.ISOLATE = True
    return remote, local


def per_run(model: Path, runs: int) -> dict:
    import numpy as np

    from bnfold import runner

    remote, local = _pair(model)
    w = runner._worker()
    res = {"start_method": w.method}
    for batch in (1, 8):
        name = remote.inputs[0].name
        feeds = {name: np.random.default_rng(0).normal(size=(batch, 3, 224, 224)).astype(np.float32)}
        ms = _interleaved_ms({"worker_ms": lambda: remote.run(feeds), "in_process_ms": lambda: local.run(feeds),
                              "round_trip_ms": lambda: w.request({"op": "ping", "echo": feeds})}, runs)
        res[f"batch{batch}"] = {"input_mb": feeds[name].nbytes / 2**20, **ms}
    remote.close()
    return res


def calibration(model: Path, runs: int) -> dict:
    import numpy as np
    import onnx

    from bnfold import runner
    from bnfold.calibration import ChannelStats

    m = onnx.load(str(model))
    names = list(dict.fromkeys(n.input[0] for n in m.graph.node if n.op_type == "BatchNormalization"))
    del m.graph.output[:]
    for n in names:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    tmp = Path(tempfile.mkdtemp()) / "probe.onnx"
    onnx.save(m, str(tmp))
    remote, local = _pair(tmp)
    name = remote.inputs[0].name
    feeds = {name: np.random.default_rng(0).normal(size=(8, 3, 224, 224)).astype(np.float32)}
    outs = remote.run(feeds)
    mb = sum(v.nbytes for v in outs.values()) / 2**20
    w = runner._worker()
    echo_ms = _median_ms(lambda outs=outs: w.request({"op": "ping", "echo": outs}), 3)
    del outs
    stats = {n: ChannelStats() for n in names}
    ms = _interleaved_ms({
        "worker_all_outputs_ms": lambda: remote.run(feeds),
        "in_process_all_outputs_ms": lambda: local.run(feeds),
        "worker_reduce_ms": lambda: remote.run_reduce(feeds, names, runner.UpdateEach(stats)),
        "in_process_reduce_ms": lambda: runner.UpdateEach(stats)(local.run(feeds)),
    }, runs)
    remote.close()
    os.unlink(tmp)
    return {"bn_inputs": len(names), "outputs_mb": mb, "outputs_one_way_ms": echo_ms / 2, **ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--skip-start", action="store_true")
    args = ap.parse_args()
    result = {}
    if not args.skip_start:
        result["start"] = start_costs(args.trials)
    model = any_size_copy(args.model)
    result["per_run"] = per_run(model, args.runs)
    result["calibration"] = calibration(model, max(3, args.runs // 3))
    os.unlink(model)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
