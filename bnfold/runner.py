"""Running models through ONNX Runtime: the only module that imports it, and only in a worker process.

Sessions always load models by path (external data resolves next to the model)
and, unless asked for ``optimized``, run with graph optimisations disabled, so that
ONNX Runtime's own Conv+BN and MatMul+BN fusions cannot hide or cause differences.
The CUDA provider runs with TF32 disabled so float32 results are comparable.

Isolation
---------
ONNX Runtime can crash its process on checker-valid models (1.31 segfaults running
an opset-7 BatchNormalization whose optional outputs are empty names, optimisations
off). So every session bnfold creates (verify, check, calibration, the CUDA probe in
:func:`cuda_status`) lives in one worker process, and bnfold's own process never
imports onnxruntime. A :class:`Runner` is a proxy for a session in the worker. When
the worker dies, the call raises :class:`RuntimeCrash` (a :class:`BnfoldError`, exit
code 2) naming the model, the stage (loading or running), the provider and the signal
(SIGSEGV, SIGABRT, SIGKILL as the out-of-memory killer sends it). The caller's
process goes on; the next call starts a fresh worker, so a batch goes on with the
next model, and a Runner whose worker died reopens its session in the new one.

One worker per bnfold process serves every session of a job and of the jobs after it
(``--jobs N``: one per pool process). It starts on first use; the sessions of Runners
that were closed or garbage-collected are dropped with the next request;
:func:`shutdown_worker` (also run at exit) stops it.

Start method. Measured here (2 shared cores, Python 3.11, ORT 1.31; benchmarks/isolation.py),
from asking for a worker until it has imported onnxruntime and answered: fork 0.08-0.09 s,
spawn (a fresh interpreter) 0.29-0.44 s, multiprocessing's forkserver 0.46-0.63 s for a
process's first worker (its server is itself spawned; a second worker 0.26-0.33 s, but
bnfold starts one worker per process). So the worker is forked when that is safe: on
Linux, with onnxruntime not imported in this process (no ORT thread pools or CUDA context
to inherit) and no other Python thread alive (no lock held by another thread can be copied
locked). Otherwise it is a fresh interpreter (``subprocess``, not ``multiprocessing``: no
re-import of ``__main__``, and it works inside daemonic pool processes).
``BNFOLD_WORKER_START=fork|spawn`` overrides it.

Signals. The worker ignores SIGINT: Ctrl-C reaches the whole foreground process
group, and the parent, on KeyboardInterrupt, kills its worker (SIGKILL: it holds
nothing to save) and reaps it before re-raising. A worker whose parent died (killed
outright) notices within :data:`PARENT_POLL_S` and exits. Core dumps are off in the
worker (a crash is reported, not dumped into the working folder).

Data volume. Messages are pickled with protocol 5 and arrays travel out of band:
their bytes go through a socket once each way, straight from and into numpy
buffers, with no pickle copy. Verification moves small tensors. Calibration
exposes every BN input as an output (hundreds of MB per batch at real sizes): use
``Runner.run_reduce(feeds, outputs, reducer)``, which applies a picklable
``reducer(outputs) -> result`` in the worker and sends back only its result, e.g.
:class:`UpdateEach` over per-channel statistics objects. Measured overhead against
in-process ONNX Runtime: see README ("ONNX Runtime in a worker process").

Environment: ``BNFOLD_ORT_ISOLATION=0`` (or :data:`ISOLATE` set False) runs ONNX Runtime
in bnfold's own process (debugging only: a crash then takes bnfold down); so does Windows,
which can neither fork nor hand a socket to a new interpreter. ``BNFOLD_TEST_CRASH=load|run[:SIGNAL]``
is for tests: the worker kills itself with SIGNAL (default SIGSEGV) before loading or
running a model (``cuda``: before the CUDA probe).
"""
from __future__ import annotations

import atexit
import functools
import importlib.util
import itertools
import os
import pickle
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import BnfoldError, MissingDependencyError

if TYPE_CHECKING:
    from .inputs import InputSpec

CPU = "cpu"
CUDA = "cuda"
PROVIDER_NAMES = {CPU: "CPUExecutionProvider", CUDA: "CUDAExecutionProvider"}
INSTALL_HINT = "pip install 'bnfold[cpu]' (or 'bnfold[gpu]' for CUDA; never both)"
# Models up to this size may fall back to onnx.reference when ONNX Runtime has no kernel.
REFERENCE_FALLBACK_BYTES = 64 * 2**20
ORT_MODULE = "onnxruntime"
# Read at each call, so a test or an embedding application may switch it.
ISOLATE = os.environ.get("BNFOLD_ORT_ISOLATION", "1") != "0"
START_ENV = "BNFOLD_WORKER_START"
CRASH_ENV = "BNFOLD_TEST_CRASH"
PARENT_POLL_S = 0.5
# ORT_ENFORCE failures and other ORT messages longer than this are cut (one line stays readable).
MESSAGE_MAX_CHARS = 600


class RuntimeCrash(BnfoldError):
    """ONNX Runtime's worker process died while loading or running a model (native crash or killed)."""

    def __init__(self, message: str, path: Optional[str], signal_name: str, stage: str, provider: str) -> None:
        super().__init__(message, path)
        self.signal_name = signal_name
        self.stage = stage  # "loading" or "running"
        self.provider = provider  # e.g. "CPUExecutionProvider"

    def __reduce__(self):  # crosses process boundaries (--jobs) intact
        return (RuntimeCrash, (self.message, self.path, self.signal_name, self.stage, self.provider))


def ort():
    """The onnxruntime module, or a clear error saying how to install it (imports it here)."""
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError(f"ONNX Runtime is not installed: {INSTALL_HINT}") from None
    return onnxruntime


def session_options(optimized: bool = False):
    """Quiet session options; graph optimisations off unless ``optimized`` (ORT's default level,
    faster, but ORT then fuses BN itself)."""
    rt = ort()
    so = rt.SessionOptions()
    so.graph_optimization_level = (rt.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                   else rt.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    return so


def provider_list(provider: str) -> list:
    """ONNX Runtime's providers argument for ``provider`` (plain data: it is sent to the worker)."""
    if provider == CUDA:
        # CPU stays as a fallback for ops with no CUDA kernel, as ONNX Runtime intends.
        return [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _isolated() -> bool:
    # Windows cannot hand a socket to a fresh interpreter (no pass_fds) nor fork: there ORT runs in-process
    return ISOLATE and os.name == "posix"


@functools.lru_cache(maxsize=None)
def cuda_status() -> Tuple[bool, str]:
    """Whether the CUDA provider really works here, and if not, why.

    ``get_available_providers()`` lists CUDA in onnxruntime-gpu even without a GPU
    or CUDA libraries, so this creates a session and checks what it actually uses
    (in the worker process: a provider library that crashes cannot take bnfold down).
    """
    if not _isolated():
        return _probe_cuda()
    _require_installed()
    try:
        return _worker().request({"op": "cuda", "crash": _crash_hook("cuda")})[1]
    except _WorkerDied as e:
        return False, f"probing the CUDA provider crashed ONNX Runtime ({e.signal_name})"


def _probe_cuda() -> Tuple[bool, str]:
    rt = ort()
    if "CUDAExecutionProvider" not in rt.get_available_providers():
        return False, "this ONNX Runtime build has no CUDA provider (install onnxruntime-gpu instead of onnxruntime)"
    try:
        from onnx import TensorProto, helper

        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        probe.ir_version = 7
        sess = rt.InferenceSession(probe.SerializeToString(), session_options(), providers=provider_list(CUDA))
    except Exception as e:  # the provider library failed to load or initialise
        return False, f"the CUDA provider failed to start ({ort_message(str(e))})"
    if sess.get_providers()[0] != "CUDAExecutionProvider":
        return False, ("the CUDA provider is installed but a session fell back to the CPU "
                       "(no GPU or CUDA/cuDNN libraries)")
    return True, ""


# -- ONNX Runtime's messages -------------------------------------------------------------------

_ORT_PREFIX = re.compile(r"^\s*\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_NODE_FAILED = re.compile(r"Non-zero status code returned while running (\S+) node\.\s*Name:\s*'([^']*)'\s*"
                          r"Status Message:\s*")
# "/onnxruntime_src/.../reshape_helper.h:84 onnxruntime::ReshapeHelper::ReshapeHelper(const ...&, bool) "
_SOURCE = re.compile(r"(?:(?<!\w)[A-Za-z]:)?[\\/]?(?:[\w.+-]+[\\/])+[\w.+-]+\.(?:h|hpp|cc|cpp|cu|cuh):\d+\s+"
                     r"(?:[\w:~<>,*& ]+\([^()]*\)(?:\s*const)?\s+)?")
_BOILERPLATE = ("Please fix either the inputs/outputs or the model.",)


def ort_message(text: str) -> str:
    """ONNX Runtime's error text as one informative line.

    Keeps what says which input, node, index, what was expected and what was given;
    drops the status-code prefix, source locations and C++ signatures, the failed
    ORT_ENFORCE condition when a sentence explains it, the "Please fix ..." advice
    and stack traces. Lines are joined with "; ".
    """
    text = text.split("Stacktrace:")[0]
    text = _ORT_PREFIX.sub("", text.strip())
    node = ""
    m = _NODE_FAILED.search(text)
    if m:
        node = f"{m.group(1)} node '{m.group(2)}': " if m.group(2) else f"{m.group(1)} node: "
        text = text[:m.start()] + text[m.end():]
    text = _SOURCE.sub("", text)
    for b in _BOILERPLATE:
        text = text.replace(b, "")
    # ORT_ENFORCE writes "<condition> was false. <explanation>": the explanation is what a user can act on
    enforced = re.match(r"^(.*?) was false\.\s+(\S.*)$", text, re.S)
    if enforced:
        text = enforced.group(2)
    lines = [" ".join(line.split()) for line in text.splitlines()]
    text = "; ".join(line for line in lines if line)
    text = node + text if text else node.rstrip(": ") or "no message"
    if len(text) > MESSAGE_MAX_CHARS:
        text = text[:MESSAGE_MAX_CHARS - 3].rstrip() + "..."
    return text


# -- runners -----------------------------------------------------------------------------------

class UpdateEach:
    """A picklable reducer for :meth:`Runner.run_reduce`: ``objects[name].update(outputs[name])``
    for every name, returning the updated objects (e.g. ``calibration.ChannelStats``)."""

    def __init__(self, objects: Mapping[str, Any]) -> None:
        self.objects = dict(objects)

    def __call__(self, outputs: Mapping[str, np.ndarray]) -> Dict[str, Any]:
        for name, obj in self.objects.items():
            obj.update(outputs[name])
        return self.objects


@dataclass
class Runner:
    """One model on one provider, by path: a session in the worker process, or in this
    process for ``session`` (an ONNX Runtime session or onnx.reference evaluator)."""

    path: str
    provider: str
    session: Any = None  # an onnxruntime.InferenceSession (untyped) or an onnx.reference evaluator
    reference_fallback: bool = False
    output_names: Sequence[str] = ()
    inputs: Sequence[InputSpec] = ()  # what a caller must feed
    name: Optional[str] = None  # how messages name the model (default: path)
    optimized: bool = False
    _remote: Optional["_RemoteSession"] = field(default=None, repr=False, compare=False)

    def run(self, feeds: Dict[str, np.ndarray], outputs: Optional[List[str]] = None) -> Dict[str, np.ndarray]:
        """The named outputs (default: all) for ``feeds``, as arrays by name."""
        names = list(outputs or self.output_names)
        return self._run(feeds, names, None)

    def run_reduce(self, feeds: Dict[str, np.ndarray], outputs: Optional[List[str]],
                   reducer: Callable[[Dict[str, np.ndarray]], Any]) -> Any:
        """``reducer({name: array})`` computed where the session runs, so that only its
        result travels back (the outputs are not copied between processes).

        ``reducer`` must be picklable (a module-level function or an instance of a
        module-level class); it is pickled and unpickled for each call, so state it
        should keep must be in what it returns.
        """
        names = list(outputs or self.output_names)
        return self._run(feeds, names, reducer)

    def close(self) -> None:
        """Drop the worker's session now (otherwise when this Runner is garbage-collected);
        a later ``run`` opens it again."""
        if self._remote is not None:
            self._remote.close()
            self._remote = None

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _label(self) -> str:
        return self.name or self.path

    def _run(self, feeds: Dict[str, np.ndarray], names: List[str], reducer: Optional[Callable]) -> Any:
        if self.session is None:
            return self._run_remote(feeds, names, reducer)
        if self.reference_fallback:  # pure Python: cannot crash the process
            values = dict(zip(names, self.session.run(names, feeds)))
        else:
            try:
                values = dict(zip(names, self.session.run(names, feeds)))
            except Exception as e:  # ONNX Runtime's own exception types
                raise BnfoldError(f"ONNX Runtime failed to run it ({ort_message(str(e))})", self._label()) from None
        return reducer(values) if reducer is not None else values

    def _run_remote(self, feeds: Dict[str, np.ndarray], names: List[str], reducer: Optional[Callable]) -> Any:
        if self._remote is None or not self._remote.worker.usable():
            try:  # first use, or the worker died since: a fresh session in a fresh worker
                self._open_remote()
            except _LoadFailed as e:
                raise BnfoldError(f"ONNX Runtime cannot load it ({ort_message(str(e))})", self._label()) from None
        assert self._remote is not None
        msg = {"op": "run", "sid": self._remote.sid, "outputs": names, "feeds": feeds, "reducer": reducer,
               "crash": _crash_hook("run")}
        try:
            kind, value = self._remote.worker.request(msg)
        except _WorkerDied as e:
            raise self._crash(e, "running") from None
        if kind == "ort_error":
            raise BnfoldError(f"ONNX Runtime failed to run it ({ort_message(value)})", self._label())
        return value if reducer is not None else dict(zip(names, value))

    def _open_remote(self) -> None:
        worker = _worker()
        msg = {"op": "open", "path": os.path.abspath(self.path), "providers": provider_list(self.provider),
               "optimized": self.optimized, "crash": _crash_hook("load")}
        try:
            kind, value = worker.request(msg)
        except _WorkerDied as e:
            raise self._crash(e, "loading") from None
        if kind == "ort_error":
            raise _LoadFailed(value)
        from .inputs import InputSpec, dtype_of_ort_type

        self._remote = _RemoteSession(worker, value["sid"])
        self.output_names = list(value["outputs"])
        self.inputs = [InputSpec(n, dtype_of_ort_type(t), tuple(s)) for n, t, s in value["inputs"]]

    def _crash(self, e: "_WorkerDied", stage: str) -> RuntimeCrash:
        where = PROVIDER_NAMES.get(self.provider, self.provider)
        return RuntimeCrash(f"ONNX Runtime crashed ({e.signal_name}) while {stage} it on {where}",
                            self._label(), e.signal_name, stage, where)


class _PlacementFailed(Exception):
    """ONNX Runtime refused the profiled run (its message is the argument)."""


class _LoadFailed(Exception):
    """ONNX Runtime refused to load a model (its message as text)."""


def open_runner(path: "os.PathLike[str] | str", provider: str, *, optimized: bool = False,
                name: Optional[str] = None) -> Runner:
    """A session for the model at ``path`` on ``provider`` (optimisations disabled unless
    ``optimized``), in the worker process unless isolation is off.

    ``name`` is how error messages name the model (e.g. the user's model for a
    temporary probe copy). On the CPU, a small model ONNX Runtime has no kernel for
    (e.g. float64 Conv) falls back to ``onnx.reference.ReferenceEvaluator``, run in
    this process. Raises :class:`BnfoldError` when ONNX Runtime cannot load the
    model, :class:`RuntimeCrash` when loading it crashed ONNX Runtime.
    """
    path = os.fspath(path)
    if not _isolated():
        return _open_in_process(path, provider, optimized, name)
    _require_installed()
    r = Runner(path, provider, name=name, optimized=optimized)
    try:
        r._open_remote()
    except _LoadFailed as e:
        return _load_failed(path, provider, str(e), name)
    return r


def _open_in_process(path: str, provider: str, optimized: bool, name: Optional[str]) -> Runner:
    rt = ort()
    try:
        sess = rt.InferenceSession(path, session_options(optimized), providers=provider_list(provider))
    except Exception as e:  # ONNX Runtime's own exception types
        return _load_failed(path, provider, str(e), name)
    from .inputs import InputSpec, dtype_of_ort_type

    specs = [InputSpec(i.name, dtype_of_ort_type(i.type), tuple(i.shape)) for i in sess.get_inputs()]
    return Runner(path, provider, sess, False, [o.name for o in sess.get_outputs()], specs, name, optimized)


def _load_failed(path: str, provider: str, text: str, name: Optional[str]) -> Runner:
    no_kernel = "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text
    if provider == CPU and no_kernel and os.path.getsize(path) <= REFERENCE_FALLBACK_BYTES:
        return _reference_runner(path, name)
    raise BnfoldError(f"ONNX Runtime cannot load it ({ort_message(text)})", name or path)


def _reference_runner(path: str, name: Optional[str] = None) -> Runner:
    from onnx.reference import ReferenceEvaluator

    from .inputs import input_specs
    from .modelio import load_model

    model = load_model(path)
    ev = ReferenceEvaluator(model)
    return Runner(path, CPU, ev, True, [o.name for o in model.graph.output], input_specs(model), name)


def _require_installed() -> None:
    # find_spec looks for the package without importing it into bnfold's process
    if importlib.util.find_spec(ORT_MODULE) is None:
        raise MissingDependencyError(f"ONNX Runtime is not installed: {INSTALL_HINT}")


def _crash_hook(stage: str) -> Optional[int]:
    """The signal the worker must kill itself with before ``stage`` (tests only), from BNFOLD_TEST_CRASH."""
    spec = os.environ.get(CRASH_ENV, "")
    if not spec:
        return None
    want, _, sig = spec.partition(":")
    if want != stage:
        return None
    return int(signal.Signals[sig or "SIGSEGV"])


# -- the worker process: parent side -------------------------------------------------------------

class _WorkerDied(Exception):
    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


@dataclass
class _RemoteSession:
    worker: "_Worker"
    sid: int
    _finalizer: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # garbage-collected sessions are dropped with the worker's next request (never from a finalizer
        # itself: it may run in the middle of another request)
        self._finalizer = weakref.finalize(self, self.worker.dropped.append, self.sid)

    def close(self) -> None:
        self._finalizer()


def signal_text(status: Optional[int]) -> str:
    """How a process ended, for a message: ``SIGSEGV``, ``SIGKILL: killed, e.g. by ...``, ``exit status 1``."""
    if status is None:
        return "no exit status"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"{name}: killed, e.g. by the out-of-memory killer" if -status == signal.SIGKILL else name
    return f"exit status {status}"


def _start_method() -> str:
    forced = os.environ.get(START_ENV, "")
    if forced in ("fork", "spawn"):
        return forced
    if (sys.platform.startswith("linux") and ORT_MODULE not in sys.modules
            and threading.active_count() == 1):
        return "fork"
    return "spawn"


class _Worker:
    """The worker process and our end of its socket; one request at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.dropped: List[int] = []
        self.method = _start_method()
        ours, theirs = socket.socketpair()
        self.popen: Optional[subprocess.Popen] = None
        parent = os.getpid()
        t0 = time.perf_counter()
        if self.method == "fork":
            pid = os.fork()
            if pid == 0:  # the worker; never returns into the caller's code
                code = 1
                try:
                    ours.close()
                    _serve(theirs, parent)
                    code = 0
                except BaseException:  # a bug in the worker loop: say so on stderr, the parent sees it die
                    import traceback

                    traceback.print_exc()
                finally:
                    os._exit(code)
            self.pid = pid
        else:
            here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            path = [here] + [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
            script = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); import sys; "
                      f"sys.path[:0] = {path!r}; from bnfold.runner import _serve_fd; "
                      f"_serve_fd({theirs.fileno()}, {parent})")
            self.popen = subprocess.Popen([sys.executable, "-c", script], pass_fds=[theirs.fileno()],
                                          stdin=subprocess.DEVNULL)
            self.pid = self.popen.pid
        theirs.close()  # so that the worker's death reads as end of file here
        self.sock = ours
        self.alive = True
        self.owner = parent
        self.start_s = time.perf_counter() - t0

    def request(self, msg: dict) -> Any:
        """Send ``msg``, return the worker's ``(kind, value)`` reply (kind "ok" or "ort_error");
        a ``("raise", exc)`` reply is raised here. Raises :class:`_WorkerDied` when the worker dies meanwhile."""
        with self.lock:
            if not self.alive:
                raise _WorkerDied("the worker had already stopped")
            drop = []
            while self.dropped:  # pop, not copy-and-clear: a finalizer in another thread may append meanwhile
                drop.append(self.dropped.pop())
            msg = dict(msg, drop=drop)
            try:
                packed = _pack(msg)  # before sending: an unpicklable value leaves the worker in step
            except BaseException:
                self.dropped.extend(drop)
                raise
            try:
                _write(self.sock, packed)
                reply = _recv(self.sock)
            except (EOFError, ConnectionError):  # the worker died: its exit status says how
                raise _WorkerDied(self._died()) from None
            except BaseException:  # interrupted mid-exchange (Ctrl-C): out of step, so the worker goes
                self.kill()
                raise
        if reply[0] == "raise":
            raise reply[1]
        return reply

    def usable(self) -> bool:
        """Alive, and this process's own (not a forked parent's)."""
        return self.alive and self.owner == os.getpid()

    def _died(self) -> str:
        self.alive = False
        self.sock.close()
        status = self._reap(5.0)
        if status is None:  # closed its socket but lingers: make sure it is gone
            status = self.kill()
        if status in (-signal.SIGTERM, -signal.SIGINT):
            # stopped, not crashed: by a signal to the whole process group (`timeout`, a cancelled job) or
            # by someone who wants it to stop. A trial saw "ONNX Runtime crashed (SIGTERM)", exit 2, in
            # about 1 of 100 such runs: the signal reached this process too, but its KeyboardInterrupt was
            # lost (raised where native code cleared it). The run is interrupted, as asked: a handler still
            # pending runs in this pause (the command's says SIGTERM: exit 143), else Ctrl-C's exception.
            time.sleep(0.1)
            raise KeyboardInterrupt
        return signal_text(status)

    def _reap(self, timeout: float) -> Optional[int]:
        """The exit status (negative: the signal that killed it), or None if still running after ``timeout``."""
        if self.popen is not None:
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere
                return None
            if pid:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.002)

    def kill(self) -> Optional[int]:
        """Stop the worker at once and reap it."""
        self.alive = False
        try:
            self.sock.close()
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self._reap(10.0)

    def stop(self) -> None:
        """Let the worker finish (end of file on its socket), kill it if it does not within a second."""
        if not self.alive:
            return
        self.alive = False
        self.sock.close()
        if self._reap(1.0) is None:
            self.kill()


_WORKER: Optional[_Worker] = None
_WORKER_LOCK = threading.Lock()
_EXIT_HOOK_PID = 0


def _worker() -> _Worker:
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None or not _WORKER.usable():
            _register_exit_hook()
            _WORKER = _Worker()
        return _WORKER


def _register_exit_hook() -> None:
    global _EXIT_HOOK_PID
    if _EXIT_HOOK_PID == os.getpid():
        return
    _EXIT_HOOK_PID = os.getpid()
    atexit.register(shutdown_worker)  # once per process (a forked child may run its parent's too: harmless)
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is not None and mp_util.__dict__.get("_exit_function"):
        # multiprocessing children (--jobs pool processes) end with os._exit after running these
        # finalizers, not atexit handlers: stop and reap the worker there too
        mp_util.Finalize(None, shutdown_worker, exitpriority=100)


def shutdown_worker() -> None:
    """Stop this process's ONNX Runtime worker (its sessions go); the next session starts a new one."""
    global _WORKER
    with _WORKER_LOCK:
        w, _WORKER = _WORKER, None
    if w is not None and w.owner == os.getpid():
        w.stop()


def _forget_worker_after_fork() -> None:
    # a forked child (a --jobs pool process, or the worker itself) must not talk to its parent's worker
    global _WORKER, _WORKER_LOCK
    w, _WORKER = _WORKER, None
    _WORKER_LOCK = threading.Lock()
    if w is not None:
        try:
            w.sock.close()  # this process's copy only
        except OSError:
            pass


os.register_at_fork(after_in_child=_forget_worker_after_fork)


# -- the wire: pickle protocol 5, arrays out of band ------------------------------------------------

_FRAME = struct.Struct("!QI")


def _pack(obj: Any) -> Tuple[bytes, List[memoryview]]:
    buffers: List[pickle.PickleBuffer] = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    sizes = struct.pack(f"!{len(raws)}Q", *(r.nbytes for r in raws))
    return _FRAME.pack(len(head), len(raws)) + sizes + head, raws


def _write(sock: socket.socket, packed: Tuple[bytes, List[memoryview]]) -> None:
    head, raws = packed
    sock.sendall(head)
    for r in raws:
        if r.nbytes:
            sock.sendall(r)


def _read_into(sock: socket.socket, view: memoryview) -> None:
    pos, n = 0, view.nbytes
    while pos < n:
        got = sock.recv_into(view[pos:], n - pos)
        if got == 0:
            raise EOFError("the other end closed the socket")
        pos += got


def _recv(sock: socket.socket) -> Any:
    frame = bytearray(_FRAME.size)
    _read_into(sock, memoryview(frame))
    head_len, n_buffers = _FRAME.unpack(frame)
    sizes_raw = bytearray(8 * n_buffers)
    _read_into(sock, memoryview(sizes_raw))
    sizes = struct.unpack(f"!{n_buffers}Q", sizes_raw)
    head = bytearray(head_len)
    _read_into(sock, memoryview(head))
    buffers = []
    for size in sizes:
        buf = np.empty(size, dtype=np.uint8)  # numpy's allocator: aligned, and arrays unpickle onto it
        _read_into(sock, buf.data)
        buffers.append(buf)
    return pickle.loads(head, buffers=buffers)


# -- the worker process: worker side ---------------------------------------------------------------

def _serve_fd(fd: int, parent: int) -> None:
    """Entry point of a spawned worker: serve on the inherited socket ``fd``."""
    _serve(socket.socket(fileno=fd), parent)


def _serve(sock: socket.socket, parent: int) -> None:
    """Answer requests until the parent closes the socket or dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # a forked worker inherits the bnfold command's SIGTERM handler (SIGTERM as Ctrl-C, for the
    # parent's clean-up); the worker has nothing to clean up: SIGTERM ends it quietly, as by default
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import faulthandler

    faulthandler.disable()  # inherited from a parent (pytest, PYTHONFAULTHANDLER): a crash is reported there
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    except (ImportError, ValueError, OSError):
        pass
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    sessions: Dict[int, Any] = {}
    ids = itertools.count(1)
    while True:
        try:
            msg = _recv(sock)
        except (EOFError, ConnectionError):
            return
        for sid in msg.pop("drop", ()):
            sessions.pop(sid, None)
        try:
            packed = _pack(_handle(msg, sessions, ids))
        except BaseException as e:  # not ours to judge: the parent raises it (a bug, or the reducer's error)
            packed = _pack(("raise", _portable(e)))
        _write(sock, packed)


def _portable(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # an exception that does not survive pickling: keep its text
        return RuntimeError(f"in the ONNX Runtime worker: {type(e).__name__}: {e}")


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(0)  # orphaned: nobody will read our answers


def _handle(msg: dict, sessions: Dict[int, Any], ids: Iterator[int]) -> Tuple[str, Any]:
    op = msg["op"]
    if msg.get("crash"):  # tests only: a deterministic native-style death
        if msg["crash"] == signal.SIGABRT:
            os.abort()
        os.kill(os.getpid(), msg["crash"])
    if op == "open":
        rt = ort()
        try:
            sess = rt.InferenceSession(msg["path"], session_options(msg["optimized"]), providers=msg["providers"])
        except Exception as e:  # ONNX Runtime's own exception types: the parent words them
            return "ort_error", str(e)
        sid = next(ids)
        sessions[sid] = sess
        return "ok", {"sid": sid, "outputs": [o.name for o in sess.get_outputs()],
                      "inputs": [(i.name, i.type, list(i.shape)) for i in sess.get_inputs()]}
    if op == "run":
        sess = sessions[msg["sid"]]
        rt = ort()
        opts = rt.RunOptions()
        opts.log_severity_level = 4  # the error comes back as a message; ORT's log would repeat it on stderr
        try:
            values = sess.run(msg["outputs"], msg["feeds"], opts)
        except Exception as e:  # ONNX Runtime's own exception types
            return "ort_error", str(e)
        if msg["reducer"] is not None:
            return "ok", msg["reducer"](dict(zip(msg["outputs"], values)))
        return "ok", values
    if op == "cuda":
        return "ok", _probe_cuda()
    if op == "placement":
        try:
            return "ok", _placement(msg["path"], msg["provider"], msg["feeds"])
        except _PlacementFailed as e:
            return "ort_error", str(e)
    if op == "ping":  # benchmarks and tests: the round trip, the start with onnxruntime imported
        if msg.get("import_ort"):
            ort()
        return "ok", msg.get("echo")
    if op == "stats":  # tests: what the worker holds
        return "ok", {"pid": os.getpid(), "sessions": sorted(sessions)}
    raise ValueError(f"unknown request {op!r}")



def node_placement(path: str, provider: str, feeds: Dict[str, np.ndarray]) -> Dict[str, Tuple[str, str]]:
    """``{node name: (op type, execution provider)}`` as ONNX Runtime placed the model's nodes.

    Read from one profiled run (the profiler records each node's provider); nodes ORT
    inserted itself (Memcpy) are included under their own names. Runs in the worker
    process like every other session.
    """
    if not _isolated():
        return _placement(os.fspath(path), provider, feeds)
    _require_installed()
    try:
        kind, value = _worker().request({"op": "placement", "path": os.path.abspath(path), "provider": provider,
                                         "feeds": feeds})
    except _WorkerDied as e:
        where = PROVIDER_NAMES.get(provider, provider)
        raise RuntimeCrash(f"ONNX Runtime crashed ({e.signal_name}) while profiling it on {where}",
                           os.fspath(path), e.signal_name, "profiling", where) from None
    if kind == "ort_error":
        raise BnfoldError(f"ONNX Runtime failed to run it ({ort_message(value)})", os.fspath(path))
    return value


def _placement(path: str, provider: str, feeds: Dict[str, np.ndarray]) -> Dict[str, Tuple[str, str]]:
    import json
    import tempfile

    rt = ort()
    so = session_options()
    with tempfile.TemporaryDirectory(prefix="bnfold-profile-") as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "profile")
        try:
            sess = rt.InferenceSession(os.fspath(path), so, providers=provider_list(provider))
            sess.run(None, feeds)
        except Exception as e:
            raise _PlacementFailed(str(e)) from None
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    placed: Dict[str, Tuple[str, str]] = {}
    for ev in events:
        args = ev.get("args", {})
        if ev.get("cat") == "Node" and "provider" in args and "op_name" in args:
            name = ev.get("name", "")
            for suffix in ("_kernel_time", "_fence_before", "_fence_after"):
                if name.endswith(suffix):
                    name = name[: -len(suffix)]
            placed[name] = (args["op_name"], args["provider"])
    return placed
