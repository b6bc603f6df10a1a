"""ONNX Runtime in a worker process: real crashes, the CLI batch surviving them, Ctrl-C,
data through the wire, reductions in the worker, and ORT's messages trimmed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnfold import BnfoldError, runner
from bnfold.calibration import ChannelStats
from bnfold.runner import RuntimeCrash
from conftest import MODELS, ROOT, build, default_sigint, ort_run

# ONNX Runtime 1.31 segfaults running this checker-valid model with graph optimisations off:
# opset 7, Conv without bias, BatchNormalization with its optional outputs listed as empty names.
CRASH_TEXT = """<ir_version: 4, opset_import: ["" : 7]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
    c = Conv <pads=[1,1,1,1], kernel_shape=[3,3]> (x, w)
    y, m1, v1, sm, sv = BatchNormalization <epsilon=1e-5> (c, s, b, m, v)
}"""


def crash_model() -> onnx.ModelProto:
    model = build(CRASH_TEXT, w=np.full((4, 3, 3, 3), 0.1, np.float32), s=np.ones(4, np.float32),
                  b=np.zeros(4, np.float32), m=np.zeros(4, np.float32), v=np.ones(4, np.float32))
    bn = model.graph.node[1]
    for i in range(1, 5):
        bn.output[i] = ""  # the text syntax cannot write an empty output name
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def crash_path(tmp_path) -> Path:
    path = tmp_path / "crash.onnx"
    onnx.save(crash_model(), str(path))
    return path


def feeds_of(r: runner.Runner, batch: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {s.name: rng.normal(size=[d if isinstance(d, int) else batch for d in s.dims]).astype(s.dtype)
            for s in r.inputs}


def worker_stats() -> dict:
    return runner._worker().request({"op": "stats"})[1]


def test_a_real_crash_becomes_runtime_crash_and_the_next_model_runs(crash_path):
    r = runner.open_runner(crash_path, runner.CPU)  # loading works; running crashes
    with pytest.raises(RuntimeCrash) as info:
        r.run({"x": np.ones((1, 3, 8, 8), np.float32)})
    e = info.value
    assert (e.signal_name, e.stage, e.provider, e.exit_code) == ("SIGSEGV", "running", "CPUExecutionProvider", 2)
    assert str(e) == f"{crash_path}: ONNX Runtime crashed (SIGSEGV) while running it on CPUExecutionProvider"
    import pickle

    assert str(pickle.loads(pickle.dumps(e))) == str(e)  # crosses process pools intact
    # this process goes on, with a fresh worker
    good = MODELS / "mlp_bn1d.onnx"
    g = runner.open_runner(good, runner.CPU)
    feeds = feeds_of(g)
    np.testing.assert_array_equal(g.run(feeds)[g.output_names[0]], ort_run(good, feeds)[0])
    # the same model with ONNX Runtime's optimisations on is fine: the crash is ORT's, at level 0 only
    opt = runner.open_runner(crash_path, runner.CPU, optimized=True)
    assert opt.run({"x": np.ones((1, 3, 8, 8), np.float32)})["y"].shape == (1, 4, 8, 8)


@pytest.mark.parametrize("hook, stage, sig", [("load:SIGABRT", "loading", "SIGABRT"),
                                              ("run", "running", "SIGSEGV"),
                                              ("run:SIGKILL", "running", "SIGKILL")])
def test_test_hook_crashes_are_reported_with_stage_and_signal(monkeypatch, hook, stage, sig):
    path = MODELS / "mlp_bn1d.onnx"
    r = runner.open_runner(path, runner.CPU) if stage == "running" else None
    before = worker_stats()["pid"]
    monkeypatch.setenv(runner.CRASH_ENV, hook)
    with pytest.raises(RuntimeCrash) as info:
        (r or runner.open_runner(path, runner.CPU, name="the user's model.onnx")).run(feeds_of(r) if r else {})
    assert info.value.stage == stage and info.value.signal_name.startswith(sig)
    assert f"crashed ({sig}" in str(info.value)
    if sig == "SIGKILL":
        assert "out-of-memory" in str(info.value)
    if stage == "loading":
        assert str(info.value).startswith("the user's model.onnx: ")
    monkeypatch.delenv(runner.CRASH_ENV)
    # a runner whose worker died reopens its session in a new worker
    again = r or runner.open_runner(path, runner.CPU)
    feeds = feeds_of(again)
    np.testing.assert_array_equal(again.run(feeds)[again.output_names[0]], ort_run(path, feeds)[0])
    assert worker_stats()["pid"] != before


def test_a_crashing_cuda_probe_means_no_cuda(monkeypatch):
    runner.cuda_status.cache_clear()
    monkeypatch.setenv(runner.CRASH_ENV, "cuda:SIGABRT")
    try:
        assert runner.cuda_status() == (False, "probing the CUDA provider crashed ONNX Runtime (SIGABRT)")
    finally:
        runner.cuda_status.cache_clear()


def test_one_worker_serves_every_session_and_drops_closed_ones():
    a = runner.open_runner(MODELS / "mlp_bn1d.onnx", runner.CPU)
    b = runner.open_runner(MODELS / "resnet_mini.onnx", runner.CPU)
    held = worker_stats()["sessions"]
    assert a._remote.worker is b._remote.worker and {a._remote.sid, b._remote.sid} <= set(held)
    gone = b._remote.sid
    del b  # garbage-collected: dropped with the next request
    a.run(feeds_of(a))
    assert gone not in worker_stats()["sessions"]
    kept = a._remote.sid
    with a:
        pass  # closed on exit
    assert a._remote is None and kept not in worker_stats()["sessions"]


def test_the_wire_keeps_every_array_exactly(tmp_path):
    import socket

    arrays = {
        "f32": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "f16": np.linspace(-2, 2, 7).astype(np.float16),
        "i64": np.array([[1, -2], [3, 4]], np.int64),
        "bool": np.array([True, False, True]),
        "scalar": np.array(3.5, np.float64),
        "empty": np.zeros((0, 5), np.float32),
        "strided": np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2],  # not contiguous: pickled in band
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
    }
    a, b = socket.socketpair()
    try:
        runner._write(a, runner._pack({"arrays": arrays, "text": "é"}))
        got = runner._recv(b)
    finally:
        a.close()
        b.close()
    assert got["text"] == "é"
    for k, v in arrays.items():
        assert got["arrays"][k].dtype == v.dtype and got["arrays"][k].shape == v.shape
        np.testing.assert_array_equal(got["arrays"][k], v)
    assert got["arrays"]["f32"].flags.writeable


class _Sums:
    """A reducer: per-output sums in float64."""

    def __call__(self, outputs):
        return {k: float(np.asarray(v, np.float64).sum()) for k, v in outputs.items()}


class _Fails:
    def __call__(self, outputs):
        raise BnfoldError("the reducer refused")


def test_run_reduce_returns_only_the_reduction():
    path = MODELS / "resnet_mini.onnx"
    r = runner.open_runner(path, runner.CPU)
    feeds = feeds_of(r)
    want = ort_run(path, feeds)
    got = r.run_reduce(feeds, None, _Sums())
    assert got == pytest.approx({n: float(np.asarray(v, np.float64).sum()) for n, v in zip(r.output_names, want)},
                                rel=1e-12)
    with pytest.raises(BnfoldError, match="the reducer refused"):
        r.run_reduce(feeds, None, _Fails())
    assert r.run_reduce(feeds, None, _Sums()) == got  # the worker is still in step


def test_update_each_in_the_worker_matches_updates_here():
    path = MODELS / "resnet_mini.onnx"
    model = onnx.load(str(path))
    names = [n.input[0] for n in model.graph.node if n.op_type == "BatchNormalization"][:3]
    del model.graph.output[:]
    for n in names:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"bnfold-test-probe-{os.getpid()}.onnx"
    onnx.save(model, str(probe))
    try:
        r = runner.open_runner(probe, runner.CPU)
        remote = {n: ChannelStats() for n in names}
        local = {n: ChannelStats() for n in names}
        for seed in range(3):
            feeds = feeds_of(r, seed=seed)
            remote = r.run_reduce(feeds, names, runner.UpdateEach(remote))
            for n, value in zip(names, ort_run(probe, feeds)):
                local[n].update(value)
        for n in names:
            for got, want in zip(remote[n].result(), local[n].result()):
                np.testing.assert_allclose(got, want, rtol=1e-12)
    finally:
        probe.unlink()


# -- ORT's messages ---------------------------------------------------------------------------

def test_shape_error_keeps_index_expected_and_got():
    path = MODELS / "mlp_bn1d.onnx"
    r = runner.open_runner(path, runner.CPU)
    name = r.inputs[0].name
    with pytest.raises(BnfoldError) as info:
        r.run({name: np.ones((2, 7), np.float32)})
    text = str(info.value)
    assert "index: 1 Got: 7 Expected: 64" in text and f"input: {name}" in text
    assert "Please fix" not in text and "\n" not in text and "[ONNXRuntimeError]" not in text


def test_node_failure_names_the_node_without_source_locations(tmp_path):
    model = build("""<ir_version: 8, opset_import: ["" : 15]>
        g (float[N,6] x) => (float[N,4] y) { y = Reshape (x, sh) }""", sh=np.array([-1, 4], np.int64))
    model.graph.node[0].name = "reshape_1"
    onnx.save(model, str(tmp_path / "r.onnx"))
    with pytest.raises(BnfoldError) as info:
        runner.open_runner(tmp_path / "r.onnx", runner.CPU).run({"x": np.ones((1, 6), np.float32)})
    text = str(info.value)
    assert "Reshape node 'reshape_1': " in text
    assert "Input shape:{1,6}, requested shape:{-1,4}" in text
    assert "onnxruntime_src" not in text and "was false" not in text and "\n" not in text


@pytest.mark.parametrize("raw, want", [
    ("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: input for the following "
     "indices\n index: 1 Got: 7 Expected: 64\n Please fix either the inputs/outputs or the model.",
     "Got invalid dimensions for input: input for the following indices; index: 1 Got: 7 Expected: 64"),
    ("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Invalid rank for input: input Got: 1 Expected: 2 Please fix "
     "either the inputs/outputs or the model.", "Invalid rank for input: input Got: 1 Expected: 2"),
    ("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv node. Name:'' Status "
     "Message: Input channels C is not equal to kernel channels * group. C: 5 kernel channels: 3 group: 1",
     "Conv node: Input channels C is not equal to kernel channels * group. C: 5 kernel channels: 3 group: 1"),
    ("[ONNXRuntimeError] : 1 : FAIL : Load model from m.onnx failed:/onnxruntime_src/onnxruntime/core/graph/"
     "model.cc:180 onnxruntime::Model::Model(ModelProto&&, const PathString&, const IOnnxRuntimeOpSchemaRegistryList*"
     ", const logging::Logger&, const ModelOptions&) Unsupported model IR version: 99, max supported IR version: 11\n",
     "Load model from m.onnx failed:Unsupported model IR version: 99, max supported IR version: 11"),
    ("Required inputs (['input']) are missing from input feed (['zz']).",
     "Required inputs (['input']) are missing from input feed (['zz'])."),
])
def test_message_trimming(raw, want):
    assert runner.ort_message(raw) == want


# -- whole processes: the CLI batch, no onnxruntime in bnfold's process, Ctrl-C, orphans ---------------

def _bnfold(*args, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnfold", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=120, **kw)


@pytest.mark.parametrize("jobs", [1, 2])
def test_cli_batch_survives_a_crashing_model(tmp_path, crash_path, jobs):
    good = tmp_path / "good.onnx"
    shutil.copy(MODELS / "mlp_bn1d.onnx", good)
    out = tmp_path / "o"
    out.mkdir()
    res = _bnfold("fuse", crash_path, good, "--out-dir", out, "--jobs", jobs)
    assert res.returncode == 2, res.stderr
    assert (out / "good.onnx").exists() and not (out / "crash.onnx").exists()
    crash_lines = [ln for ln in res.stdout.splitlines() + res.stderr.splitlines()
                   if "ONNX Runtime crashed (SIGSEGV) while running it on CPUExecutionProvider" in ln]
    assert crash_lines and all("crash.onnx" in ln for ln in crash_lines)
    assert "Traceback" not in res.stderr


def test_cli_single_model_crash_is_one_line(tmp_path, crash_path):
    res = _bnfold("fuse", crash_path, "-o", tmp_path / "o.onnx")
    assert res.returncode == 2 and not (tmp_path / "o.onnx").exists()
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(f"bnfold: error: {crash_path}: ONNX Runtime crashed")


def test_bnfold_process_never_imports_onnxruntime(tmp_path):
    code = ("import sys; from bnfold import verify, runner; m = sys.argv[1]; "
            "r = verify(m, m, providers='auto'); "
            "print(r.equivalent, 'onnxruntime' in sys.modules, runner._worker().method)")
    res = subprocess.run([sys.executable, "-c", code, str(MODELS / "resnet_mini.onnx")], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert res.stdout.split() == ["True", "False", "fork"], res.stderr


class _Sleep:
    """A reducer that says so on stdout, then takes long: a stand-in for a long ORT run."""

    def __call__(self, outputs):
        print("sleeping", flush=True)
        time.sleep(60)


SCRIPT = """
import json, os, sys, time
sys.path[:0] = [{root!r}, {tests!r}]
import numpy as np
from bnfold import runner
from test_isolation import _Sleep
r = runner.open_runner({model!r}, runner.CPU)
pid = runner._worker().pid
print(json.dumps({{"worker": pid}}), flush=True)
feeds = {{s.name: np.ones([2 if not isinstance(d, int) else d for d in s.dims], s.dtype) for s in r.inputs}}
try:
    r.run_reduce(feeds, None, _Sleep())
except KeyboardInterrupt:
    t = time.monotonic()
    try:
        os.kill(pid, 0)
        gone = False
    except ProcessLookupError:
        gone = True
    print(json.dumps({{"interrupted": True, "worker_gone": gone}}), flush=True)
    sys.exit(130)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _start_script(tmp_path, start: str) -> subprocess.Popen:
    code = SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), model=str(MODELS / "mlp_bn1d.onnx"))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, runner.START_ENV: start}, preexec_fn=default_sigint)


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_ctrl_c_stops_the_worker_and_leaves_no_orphan(tmp_path, start):
    proc = _start_script(tmp_path, start)
    try:
        worker = json.loads(proc.stdout.readline())["worker"]
        assert proc.stdout.readline().strip() == "sleeping"  # the worker is busy in the reducer
        proc.send_signal(signal.SIGINT)
        report = json.loads(proc.stdout.readline())
        assert proc.wait(timeout=30) == 130  # a hang guard: the busy worker would take 60 s
        assert report == {"interrupted": True, "worker_gone": True}
        assert not _alive(worker)
    finally:
        proc.kill()


def test_a_worker_whose_parent_is_killed_exits(tmp_path):
    proc = _start_script(tmp_path, "fork")
    try:
        worker = json.loads(proc.stdout.readline())["worker"]
        assert proc.stdout.readline().strip() == "sleeping"
        proc.kill()  # SIGKILL: the parent cleans nothing up
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker)
    finally:
        proc.kill()


def test_isolation_off_runs_in_this_process(monkeypatch):
    monkeypatch.setattr(runner, "ISOLATE", False)
    path = MODELS / "mlp_bn1d.onnx"
    r = runner.open_runner(path, runner.CPU)
    assert r.session is not None and r._remote is None
    feeds = feeds_of(r)
    np.testing.assert_array_equal(r.run(feeds)[r.output_names[0]], ort_run(path, feeds)[0])
    assert r.run_reduce(feeds, None, _Sums()) == pytest.approx(
        {r.output_names[0]: float(ort_run(path, feeds)[0].astype(np.float64).sum())}, rel=1e-12)


def test_the_worker_ends_quietly_on_sigterm_under_the_commands_handler(tmp_path):
    """The bnfold command turns SIGTERM into Ctrl-C; a forked worker inherits that handler, and
    `timeout` signals the whole group: the worker must die of SIGTERM, not print a traceback of a
    KeyboardInterrupt (a careless try found it did)."""
    code = "\n".join([
        "import os, signal, sys, time",
        f"sys.path[:0] = [{str(ROOT)!r}]",
        "def terminated(signum, frame):",
        "    raise KeyboardInterrupt",
        "signal.signal(signal.SIGTERM, terminated)",
        "from bnfold import runner",
        f"runner.open_runner({str(MODELS / 'mlp_bn1d.onnx')!r}, runner.CPU)",
        "w = runner._worker()",
        "time.sleep(0.3)",
        "os.kill(w.pid, signal.SIGTERM)",
        "print(w._reap(10))",
    ])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(-signal.SIGTERM), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("hook", ["run:SIGTERM"])  # (the worker ignores SIGINT: Ctrl-C is the parent's)
def test_a_worker_stopped_by_sigterm_interrupts_the_run_not_a_crash(monkeypatch, hook):
    """A signal to the whole process group (`timeout`, a cancelled job) stops the worker too: that is the
    run being stopped, not ONNX Runtime crashing ("crashed (SIGTERM)", exit 2, in about 1 of 100 runs
    of a trial, where the signal's own KeyboardInterrupt in this process was lost)."""
    path = MODELS / "mlp_bn1d.onnx"
    r = runner.open_runner(path, runner.CPU)
    monkeypatch.setenv(runner.CRASH_ENV, hook)
    with pytest.raises(KeyboardInterrupt):
        r.run(feeds_of(r))
    monkeypatch.delenv(runner.CRASH_ENV)
    feeds = feeds_of(r)  # and the next run has a new worker
    np.testing.assert_array_equal(r.run(feeds)[r.output_names[0]], ort_run(path, feeds)[0])
