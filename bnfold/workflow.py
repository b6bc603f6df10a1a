"""The verified-write workflow, and the exit-code policy.

:func:`fuse_file` folds one model file, writes the result into a private folder beside
its destination, verifies it there against the input through ONNX Runtime, and then
commits it (a rename) or discards it. :func:`check_file` does the same in a scratch
folder and never writes. Each returns a :class:`FuseOutcome` (what happened, as data);
:func:`run_batch` runs many, in worker processes if asked, and keeps going when one
fails. A :class:`Report` aggregates outcomes and owns the exit code, in one place:

====  ========================================================================
0     success
1     verification failed or a policy failed (``--force`` writes and still exits 1)
2     bad usage or unusable input (one line naming the file and the problem)
3     internal error: a bug in bnfold (nothing was written for that model)
130   interrupted (Ctrl-C); the report says what was written and what was not
143   terminated (SIGTERM, which the ``bnfold`` command takes as Ctrl-C): as 130
====  ========================================================================

Nothing here prints: the CLI renders outcomes.
"""
from __future__ import annotations

import contextlib
import enum
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from . import __version__
from .errors import BnfoldError, MissingDependencyError, PathLike, SourceChangedError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNUSABLE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + 15  # the status a shell shows for a process that SIGTERM ended


class Status(str, enum.Enum):
    """What happened to one model. The value is part of the JSON report: never rename one."""

    WRITTEN = "written"
    """Folded (and verified, unless verification was off or unavailable) and written."""
    PASSED = "passed"
    """Checked or inspected without writing; the fold verifies and the policy holds."""
    FORCED = "forced"
    """Written with ``force`` although verification failed (exit 1)."""
    NOT_EQUIVALENT = "not_equivalent"
    """The fold does not verify; nothing written (exit 1)."""
    POLICY_FAILED = "policy_failed"
    """A ``check`` policy failed, e.g. BNs that still fold under ``require_folded`` (exit 1)."""
    UNUSABLE = "unusable"
    """The input or an output path cannot be used (exit 2)."""
    INTERNAL_ERROR = "internal_error"
    """A bug in bnfold (exit 3); nothing written for this model."""
    INTERRUPTED = "interrupted"
    """Stopped by Ctrl-C while it ran, or never started; nothing written for this model."""

    def __str__(self) -> str:
        return self.value


_EXIT = {Status.WRITTEN: EXIT_OK, Status.PASSED: EXIT_OK, Status.FORCED: EXIT_FAILED,
         Status.NOT_EQUIVALENT: EXIT_FAILED, Status.POLICY_FAILED: EXIT_FAILED, Status.UNUSABLE: EXIT_UNUSABLE,
         Status.INTERNAL_ERROR: EXIT_INTERNAL, Status.INTERRUPTED: EXIT_INTERRUPTED}


@dataclass
class FuseOutcome:
    """The outcome of the workflow on one model file (picklable: batches run it in workers)."""

    model: str
    status: Status
    output: Optional[str] = None
    """The file written, or None when nothing was written."""
    exit_code: int = 0
    error: Optional[str] = None
    """One line for people (file first), or None."""
    warnings: List[str] = field(default_factory=list)
    report: Optional[dict] = None
    """The fuse report (``FuseResult.to_dict``) with ``output`` and ``verification`` (the verify
    report as a dict, or None); None when the model could not be folded."""
    hint: Optional[str] = None
    """What to do about a failure (e.g. the option that would fold the remaining BNs)."""
    traceback: Optional[str] = None
    """The traceback of an internal error."""
    time_s: float = 0.0
    """Seconds the workflow took on this model."""

    @property
    def written(self) -> bool:
        return self.output is not None

    @property
    def verified(self) -> bool:
        return bool(self.report and self.report.get("verification"))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["status"] = self.status.value
        del d["traceback"]
        return d


def _outcome(model: PathLike, status: Status, **kw: Any) -> FuseOutcome:
    kw.setdefault("exit_code", _EXIT[status])
    return FuseOutcome(os.fspath(model), status, **kw)


def internal_error_message(exc: BaseException) -> str:
    """The one line shown for a bug in bnfold."""
    return (f"internal error ({type(exc).__name__}: {exc}); this is a bug in bnfold {__version__}: "
            "please report it on bnfold's issue tracker with this line and the traceback (-v shows it)")


@dataclass
class FuseOptions:
    """How :func:`fuse_file` and :func:`check_file` fold and verify (picklable)."""

    verify: Optional[bool] = None
    """True: verify (ONNX Runtime required); False: skip; None: verify when ONNX Runtime is installed."""
    force: bool = False
    in_place: bool = False
    allow_overridable: bool = False
    reparameterize: bool = False
    require_folded: bool = False
    verify_kwargs: Dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for :func:`bnfold.verify` (providers, samples, tolerances, ...)."""


def fuse_file(model: PathLike, output: Optional[PathLike] = None, *, verify: Optional[bool] = None,
              force: bool = False, in_place: bool = False, allow_overridable: bool = False,
              reparameterize: bool = False, verify_kwargs: Optional[Mapping[str, Any]] = None) -> FuseOutcome:
    """Fold ``model``, verify the result against it, and write it to ``output`` only if it is
    equivalent (or ``force``): the verified write.

    ``output`` defaults to ``<stem>.fused.onnx`` beside the model (``in_place``: the model
    itself). The result is staged beside ``output``, verified there, then renamed into
    place; nothing is written when verification fails (status ``not_equivalent``), the
    input is unusable (``unusable``), or bnfold has a bug (``internal_error``, with the
    traceback). Never raises for those: the outcome says what happened. An output that
    would replace a file the input reads is refused.
    """
    from .paths import default_output

    target = Path(model) if in_place else Path(output) if output is not None else default_output(model)
    opts = FuseOptions(verify=verify, force=force, in_place=in_place, allow_overridable=allow_overridable,
                       reparameterize=reparameterize, verify_kwargs=dict(verify_kwargs or {}))
    return run_one(Path(model), target, opts)


def check_file(model: PathLike, *, require_folded: bool = False, verify: Optional[bool] = None,
               allow_overridable: bool = False, reparameterize: bool = False,
               verify_kwargs: Optional[Mapping[str, Any]] = None) -> FuseOutcome:
    """The CI gate on one model: fold in memory, verify the fold in a scratch folder, apply the
    policy; never writes a model. ``require_folded`` fails a model that still holds BNs
    ``fuse`` would fold, or BNs kept only because of how it was exported (:data:`EXPORT_REASONS`:
    overridable parameters, weights or parameters computed at run time)."""
    opts = FuseOptions(verify=verify, allow_overridable=allow_overridable, reparameterize=reparameterize,
                       require_folded=require_folded, verify_kwargs=dict(verify_kwargs or {}))
    return run_one(Path(model), None, opts)


def run_one(model: PathLike, target: Optional[PathLike], opts: FuseOptions) -> FuseOutcome:
    """:func:`fuse_file` (``target`` given) or :func:`check_file` (``target`` None) with options.

    ``KeyboardInterrupt`` propagates (after the staged files are removed); :func:`run_batch`
    turns it into an ``interrupted`` outcome.
    """
    model, target = Path(model), (None if target is None else Path(target))
    warnings: List[str] = []
    t0 = time.perf_counter()
    try:
        outcome = _run_one(model, target, opts, warnings)
    except BnfoldError as e:
        if isinstance(e, SourceChangedError) and target is not None:  # fuse: say no output replaced anything
            e = SourceChangedError(e.path or model, nothing_written=True)
        outcome = _outcome(model, Status.UNUSABLE, exit_code=e.exit_code, error=str(e), warnings=warnings)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # anything else is a bug in bnfold: reported, never written
        outcome = _outcome(model, Status.INTERNAL_ERROR, error=f"{model}: {internal_error_message(e)}",
                           warnings=warnings, traceback=traceback.format_exc())
    outcome.time_s = time.perf_counter() - t0
    return outcome


def _run_one(model: Path, target: Optional[Path], opts: FuseOptions, warnings: List[str]) -> FuseOutcome:
    from .fold import fuse as fuse_model
    from .fold import fuse_to_write
    from .modelio import external_files
    from .modelio.write import deliver, signals_held
    from .numerics import DeferredOverflow
    from .paths import check_model_output, special_kind

    if target is not None and not opts.in_place:
        # before any work: the obvious case
        check_model_output(target, [model], external_data=False, hint="; use --in-place to overwrite it")
    if opts.verify is not False and special_kind(model) is not None:  # a pipe (/dev/stdin, <(cmd)): read once
        raise BnfoldError("is a pipe or device, not a file: verification reads the model a second time, which a "
                          "pipe cannot give; save it to a file first (or fold it with fuse --no-verify)", model)
    reads: List[Path] = [model]

    def fold(defer_range_checks: bool):
        nonlocal reads
        result = (fuse_to_write if defer_range_checks else fuse_model)(
            model, allow_overridable=opts.allow_overridable, reparameterize=opts.reparameterize)
        if target is not None:  # now that its external data files are known (the model as loaded)
            reads = [model] + sorted(external_files(result.skeleton, result.base_dir))
            check_model_output(target, reads, in_place=opts.in_place)
        if opts.verify is not False and not result.folded:  # before anything is staged
            _check_verify_options(result.skeleton, opts, writes=target is not None)
        return result

    def stage(result):
        try:
            return result.stage(staging, external_data=result.source_external_data or None)
        except BnfoldError:
            _check_unchanged(model, result)  # an input removed or cut short mid-write explains it better
            raise

    scratch = None
    try:
        if target is None:  # check: the candidate lives in a private folder and goes away
            scratch = Path(tempfile.mkdtemp(prefix="bnfold-check-"))
            staging = scratch / model.name
        else:
            staging = target
        try:  # the fold is written at once, so a fold into external data is checked to fit as it is written
            result = fold(defer_range_checks=special_kind(model) is None)  # (a pipe cannot be read twice)
            staging_cm = stage(result)
        except DeferredOverflow:  # one does not fit: fold again checking first, which refuses it with its reason
            result = fold(defer_range_checks=False)
            staging_cm = stage(result)
        data = result.to_dict()
        data["output"] = data["verification"] = None
        with staging_cm as staged:
            result.release_model()  # written: free it before ONNX Runtime loads both models
            report = None
            try:
                if opts.verify is not False and result.folded:
                    report = _verify_staged(model, Path(staged.path), opts, warnings, writes=target is not None)
                    if report is not None:
                        report.candidate = str(target) if target is not None else f"{model} (folded in memory)"
                        data["verification"] = report.to_dict()
            except BnfoldError:
                _check_unchanged(model, result)  # a model replaced mid-run explains a failure better
                raise
            # the fold, and its verdict, are of the file as it was read: if it was replaced or rewritten
            # since (a new export), writing or passing the fold would put the old model in its place
            _check_unchanged(model, result)
            failed = report is not None and not report.equivalent
            if failed and not opts.force:
                error = (f"{target}: not written: the folded model is not equivalent to {model} "
                         "(--force writes it anyway)" if target is not None else
                         f"{model}: folding it gives a model that is not equivalent")
                return _outcome(model, Status.NOT_EQUIVALENT, error=error, warnings=warnings, report=data)
            if target is None:
                return _policy(model, data, opts, warnings)
            with signals_held() as interrupted:
                staged.commit()
                data["output"] = str(target)
                if failed:
                    outcome = _outcome(model, Status.FORCED, output=str(target), report=data, warnings=warnings,
                                       error=f"{target}: written with --force although it is not equivalent to "
                                             f"{model}")
                else:
                    outcome = _outcome(model, Status.WRITTEN, output=str(target), report=data, warnings=warnings)
                _COMMITTED[0] = outcome  # a Ctrl-C from here on cannot lose the fact that it was written
            if opts.in_place:
                for left in _data_left_behind(reads[1:], target):
                    warnings.append(f"{left}: the external data {model} read before --in-place is read by no "
                                    "model in its folder now; delete it if nothing else uses it")
            if interrupted:
                deliver(interrupted, raising=False)  # its handler runs now: SIGTERM is told from Ctrl-C
                raise InterruptedAfterWrite(outcome)
            return outcome
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _check_unchanged(model: Path, result) -> None:
    changed = result.changed_input()
    if changed is not None:  # the model as given, or the external data file that changed
        raise SourceChangedError(model if changed == result.source else changed)


def _data_left_behind(read: Sequence[Path], target: Path) -> List[Path]:
    """External data files an in-place fuse read that neither the replaced model nor any other
    model beside them reads now (an export's ``m.data`` replaced by ``m.onnx.data``): named in
    a warning, never deleted, as something outside that folder might still use them."""
    from .modelio import external_files, load_model
    from .paths import models_reading

    try:
        now = external_files(load_model(target, load_external=False), target.parent)
        return [p for p in read if p.resolve() not in now and p.is_file() and not models_reading(p)]
    except (BnfoldError, OSError):  # the output was written and verified: the hint is not worth failing for
        return []


class InterruptedAfterWrite(KeyboardInterrupt):
    """Ctrl-C arrived while the output was being renamed into place: it was held until the
    output was complete, and is raised now, carrying the outcome (the output *was* written)."""

    def __init__(self, outcome: FuseOutcome) -> None:
        super().__init__()
        self.outcome = outcome


def _verify_staged(model: Path, staged: Path, opts: FuseOptions, warnings: List[str], writes: bool = True):
    from .verification import verify

    try:
        with _verification_errors(writes):
            # the model was just loaded (and so checked), and the candidate written here
            return verify(model, staged, validated=True, **opts.verify_kwargs)
    except MissingDependencyError as e:
        if opts.verify:
            raise
        warnings.append(f"not verified: {e}")
        return None


def _check_verify_options(model, opts: FuseOptions, writes: bool) -> None:
    """Nothing was folded, so nothing is verified: the verification options are still checked
    against the model (a --shape naming no input must not pass unnoticed)."""
    from .verification import check_options

    with _verification_errors(writes):
        check_options(model, **opts.verify_kwargs)


@contextlib.contextmanager
def _verification_errors(writes: bool) -> Iterator[None]:
    """A verification error of a command that writes says that nothing was and how to skip it
    (check writes nothing and has no --no-verify: its errors pass as they are)."""
    try:
        yield
    except MissingDependencyError:
        raise
    except BnfoldError as e:
        if not writes:
            raise
        err = BnfoldError(f"{e.message}; nothing written (--no-verify skips verification)", e.path)
        err.exit_code = e.exit_code
        raise err from None


# ``check --require-folded``: BNs kept for these reasons fail it too. They are not in the
# architecture but in how the model was exported, and the export (or an option) can fix them;
# a model that really feeds those values at run time is left out of the gate with --exclude.
# BNs kept for any other reason (nothing linear to fold into, an activation in between, ...)
# cannot be folded exactly and pass.
EXPORT_REASONS: Dict[str, str] = {
    "OVERRIDABLE_PARAMETER": "fuse --allow-overridable folds BNs whose parameters are initializers listed as "
                             "graph inputs, if nobody feeds those inputs",
    "HOST_WEIGHT_NOT_CONSTANT": "weights computed at run time: export with constant folding (torch.onnx.export "
                                "do_constant_folding=True; dynamo: optimize=True) and fuse again",
    "NOT_CONSTANT": "BN parameters computed at run time: export with constant folding and fuse again",
    "CONSTANT_TOO_LARGE": "weights computed from constants too large to evaluate: export with constant folding "
                          "and fuse again",
}


def reason_counts(codes: Sequence[str]) -> str:
    """``["A", "B", "A"]`` as ``"A x2, B x1"`` (first-seen order)."""
    from collections import Counter

    return ", ".join(f"{c} x{n}" for c, n in Counter(codes).items())


def _policy(model: Path, data: dict, opts: FuseOptions, warnings: List[str]) -> FuseOutcome:
    """``check``'s policy on a fold that verified (or was not verified). ``require_folded``
    fails a model in which ``fuse`` would still fold a BN, or which keeps a BN only for a
    reason of :data:`EXPORT_REASONS`; the error lists the kept BNs' reason codes."""
    if opts.require_folded:
        kept = [r["reason"] for r in data["records"] if not r["folded"]]
        export = [c for c in kept if c in EXPORT_REASONS]
        other = [c for c in kept if c not in EXPORT_REASONS]
        if data["folded"] or export:
            parts = []
            if data["folded"]:
                parts.append(f"{data['folded']} BatchNormalization can still be folded")
            if export:
                parts.append(f"{len(export)} kept only because of how it was exported ({reason_counts(export)})")
            if other:
                parts.append(f"{len(other)} kept that cannot be folded ({reason_counts(other)})")
            hints = ["run bnfold fuse on it"] if data["folded"] else []
            hints += [EXPORT_REASONS[c] for c in dict.fromkeys(export)]
            return _outcome(model, Status.POLICY_FAILED, report=data, warnings=warnings,
                            error=f"{model}: " + "; ".join(parts), hint="; ".join(hints))
    return _outcome(model, Status.PASSED, report=data, warnings=warnings)


# -- many models ---------------------------------------------------------------------------

Job = Tuple[PathLike, Optional[PathLike]]

# The outcome of the job running in this process once its output is committed: kept here so
# that a Ctrl-C landing between the commit and the caller receiving the outcome cannot turn
# a written output into "nothing written" (:func:`_job` reads it back).
_COMMITTED: List[Optional[FuseOutcome]] = [None]


def _committed_or_interrupted(model: PathLike) -> FuseOutcome:
    done = _COMMITTED[0]
    if done is not None and done.model == os.fspath(model):
        return done
    return _outcome(model, Status.INTERRUPTED, error=f"{model}: interrupted while it ran; nothing written for it")


def _job(model: PathLike, target: Optional[PathLike], opts: FuseOptions) -> Tuple[FuseOutcome, bool]:
    """One batch job, and whether Ctrl-C stopped the batch in it: an interrupt while it ran
    gives an ``interrupted`` outcome (its staged files are gone); one held while its output
    was committed, or arriving after, gives its real outcome."""
    _COMMITTED[0] = None
    try:
        return run_one(model, target, opts), False
    except InterruptedAfterWrite as e:
        return e.outcome, True
    except KeyboardInterrupt:
        return _committed_or_interrupted(model), True


def _not_started(model: PathLike) -> FuseOutcome:
    return _outcome(model, Status.INTERRUPTED, error=f"{model}: not started (interrupted)")


def _interruptible_job(model: PathLike, target: Optional[PathLike], opts: FuseOptions,
                       stop: Any) -> Tuple[FuseOutcome, bool]:
    """:func:`_job` in a batch worker process. Ctrl-C raises KeyboardInterrupt here only while
    a job runs, and only once (the cleanup that follows must run to its end); ``stop`` (an
    event the parent sets before it signals the workers) keeps a job from starting after it."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    _COMMITTED[0] = None
    try:
        signal.signal(signal.SIGINT, interrupt)
        try:
            if stop.is_set():  # after the handler is set: a signal sent after stop.set() reaches it
                return _not_started(model), True
            return _job(model, target, opts)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    except KeyboardInterrupt:  # landed outside _job's own handlers
        return _committed_or_interrupted(model), True


def _batch_worker(conn: Any, stop: Any) -> None:
    """A batch worker process: run ``(index, model, target, opts)`` tasks from ``conn`` and send
    ``(index, outcome, interrupted)`` back, until None or end of file. Between jobs it ignores
    Ctrl-C (the terminal sends it to every process; the parent decides), and SIGTERM throughout."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM (``timeout`` signals the whole group) is the parent's to act on: it stops the running jobs
    # with SIGINT, as for Ctrl-C; the handler inherited from the command would raise here, mid-message
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if task is None:
            return
        i, model, target, opts = task
        outcome, stopped = _interruptible_job(model, target, opts, stop)
        conn.send((i, outcome, stopped))


class _SigintFlag:
    """Ctrl-C in the batch's parent as a flag and a wake-up (a pipe to wait on), never as an
    exception: an exception could land mid-message from a worker. SIGTERM too where a Python
    handler takes it (the ``bnfold`` command turns it into Ctrl-C): ``terminated`` then says so.
    Where Ctrl-C cannot be handled (another thread) or is ignored (a background job), nothing changes."""

    def __init__(self) -> None:
        self.count = 0
        self._last = 0.0
        self.terminated = False
        self.fd: Optional[int] = None
        self._w: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "_SigintFlag":
        import signal
        import threading

        from .modelio.write import interrupting_signals

        if threading.current_thread() is not threading.main_thread():
            return self
        # each on its own: a background job of a script has Ctrl-C ignored and SIGTERM still handled
        taken = interrupting_signals()
        if not taken:
            return self
        self.fd, self._w = os.pipe()
        os.set_blocking(self._w, False)
        for sig in taken:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    # Signals closer together than this are one request: `timeout` sends SIGTERM to bnfold and then to its
    # whole group, which reached this handler twice and read as an insisting second Ctrl-C (workers
    # killed, their staging folders left: a trial, 5 of 10 runs).
    SAME_REQUEST_S = 0.2

    def _handle(self, signum: int, frame: Any) -> None:
        import signal
        import time

        now = time.monotonic()
        if self.count == 0 or now - self._last >= self.SAME_REQUEST_S:
            self.count += 1
        self._last = now
        self.terminated = self.terminated or signum == signal.SIGTERM
        try:
            assert self._w is not None
            os.write(self._w, b"!")
        except OSError:  # the pipe is full: it is readable anyway
            pass

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self.fd is not None and self._w is not None:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
            os.close(self.fd)
            os.close(self._w)
            self.fd = None


def _run_parallel(jobs: Sequence[Job], opts: FuseOptions, n_jobs: int, record: Callable[[int, FuseOutcome], None],
                  report: "Report") -> None:
    """Run ``jobs`` in ``n_jobs`` worker processes, handing out the next job only when a
    worker is free, so Ctrl-C can stop the batch at once: no job starts after it, the
    running ones are interrupted (their staged files removed, or their outcome kept when
    the output was already committed), and every outcome reaches ``record``. A second
    Ctrl-C while they wind up kills them. A worker that dies (killed, out of memory)
    fails its model only; a new worker takes the next job."""
    import multiprocessing
    import signal
    from multiprocessing.connection import wait

    from .runner import signal_text

    ctx = multiprocessing.get_context()
    stop = ctx.Event()
    pending = list(range(len(jobs)))[::-1]  # popped from the end
    busy: Dict[Any, Tuple[Any, int]] = {}  # conn -> (process, job index)
    idle: List[Tuple[Any, Any]] = []

    def start_worker() -> Tuple[Any, Any]:
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_batch_worker, args=(theirs, stop), name="bnfold-batch")
        proc.start()
        theirs.close()
        return proc, ours

    def hand_out() -> None:
        while pending and not report.interrupted and (idle or len(busy) < n_jobs):
            proc, conn = idle.pop() if idle else start_worker()
            i = pending.pop()
            m, t = jobs[i]
            conn.send((i, m, t, opts))
            busy[conn] = (proc, i)

    def stop_all() -> None:
        if stop.is_set():
            return
        report.interrupted = True
        stop.set()  # before the signals: a worker starting a job now sees it
        for proc, _ in busy.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)

    try:
        with _SigintFlag() as flag:
            hand_out()
            while busy:
                sentinels = {proc.sentinel: conn for conn, (proc, _) in busy.items()}
                ready = wait(list(busy) + list(sentinels) + ([flag.fd] if flag.fd is not None else []))
                if flag.fd is not None and flag.fd in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(flag.fd, 64)
                    stop_all()
                    if flag.terminated:
                        report.terminated = True  # (the outcomes are marked once all are in: run_batch)
                    if flag.count > 1:  # insisted: stop waiting for the running models to wind up
                        for proc, _ in busy.values():
                            proc.kill()
                for conn in [c for c in list(busy) if c in ready or sentinels.get(c) in ready]:
                    proc, i = busy.pop(conn)
                    try:
                        got = conn.recv() if conn.poll() else None
                    except (EOFError, OSError):
                        got = None
                    if got is None:  # the worker died in the job
                        proc.join()
                        conn.close()
                        m = jobs[i][0]
                        killed = report.interrupted and flag.count > 1
                        record(i, _outcome(m, Status.INTERRUPTED, error=f"{m}: stopped by a second interrupt, "
                                           "which killed its worker; nothing written for it (its staged files may "
                                           "remain beside the output)") if killed else
                               _outcome(m, Status.UNUSABLE,
                                        error=f"{m}: the worker process died ({signal_text(proc.exitcode)}) while "
                                              "it ran; nothing written for it (its staged files may remain beside "
                                              "the output)"))
                        continue
                    _, outcome, stopped = got
                    idle.append((proc, conn))
                    record(i, outcome)
                    if stopped:  # Ctrl-C reached that worker first (a terminal signals them all)
                        stop_all()
                hand_out()
    finally:
        for _proc, conn in idle + [(p, c) for c, (p, _) in busy.items()]:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc, conn in idle + [(p, c) for c, (p, _) in busy.items()]:
            proc.join(10.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()


def run_batch(jobs: Sequence[Job], opts: FuseOptions, n_jobs: int = 1,
              on_outcome: Optional[Callable[[FuseOutcome, int, int], None]] = None) -> "Report":
    """Run the workflow over ``(model, target)`` pairs (target None: check only), in ``n_jobs``
    worker processes when above 1. One failure does not stop the rest. ``on_outcome(outcome,
    done, total)`` is called as each finishes (for progress display), interrupted ones included.

    Raises :class:`BnfoldError` before anything runs when two jobs would write the same file
    or a job would write over another job's model. On Ctrl-C the batch stops at once: no
    model starts after it and the running ones are interrupted (their staged files removed);
    the :class:`Report` lists every model, ``interrupted`` for those that were not done, so it
    says exactly what was written.
    """
    from .paths import check_batch_targets

    if n_jobs < 1:
        raise BnfoldError(f"the number of jobs must be at least 1, not {n_jobs}")
    check_batch_targets(jobs, in_place=opts.in_place)  # raises before anything is written
    report = Report()
    done: Dict[int, FuseOutcome] = {}

    def record(i: int, o: FuseOutcome) -> None:
        done[i] = o
        if on_outcome is not None:
            on_outcome(o, len(done), len(jobs))

    try:
        if n_jobs > 1 and len(jobs) > 1:
            _run_parallel(jobs, opts, n_jobs, record, report)
        else:
            for i, (m, t) in enumerate(jobs):
                o, stop = _job(m, t, opts)
                record(i, o)
                if stop:
                    report.interrupted = True
                    break
    except KeyboardInterrupt:  # between jobs, or in the progress callback
        report.interrupted = True
    for i, (m, _) in enumerate(jobs):
        report.add(done.get(i) or _not_started(m))
    if report.terminated:  # a parallel batch's parent saw SIGTERM itself
        report.mark_terminated()
    return report


@dataclass
class Report:
    """Outcomes of one run, and the exit code they call for (the policy lives here only)."""

    outcomes: List[FuseOutcome] = field(default_factory=list)
    interrupted: bool = False
    terminated: bool = False
    """The interruption was SIGTERM's (set with :meth:`mark_terminated`)."""

    def mark_terminated(self) -> None:
        """The interruption was SIGTERM's (the ``bnfold`` command takes it as Ctrl-C): the run's exit code,
        and each interrupted model's, is 143 (the per-model codes said 130 beside a 143)."""
        self.terminated = True
        for o in self.outcomes:
            if o.status is Status.INTERRUPTED:
                o.exit_code = EXIT_TERMINATED

    def add(self, outcome: FuseOutcome) -> None:
        self.outcomes.append(outcome)
        if outcome.status is Status.INTERRUPTED:
            self.interrupted = True

    @property
    def exit_code(self) -> int:
        """130 when interrupted (143 by SIGTERM); otherwise the worst outcome: 3 internal error >
        2 unusable > 1 failed > 0."""
        if self.interrupted:
            return EXIT_TERMINATED if self.terminated else EXIT_INTERRUPTED
        return max((o.exit_code for o in self.outcomes), default=EXIT_OK)

    @property
    def written(self) -> List[str]:
        return [o.output for o in self.outcomes if o.output is not None]

    def count(self, *statuses: Status) -> int:
        return sum(o.status in statuses for o in self.outcomes)

    def to_dict(self) -> dict:
        """The batch JSON report: ``{"models": [...], "exit_code": N, "interrupted": bool}``."""
        return {"models": [o.to_dict() for o in self.outcomes], "exit_code": self.exit_code,
                "interrupted": self.interrupted}


def exit_code_for(error: BaseException) -> int:
    """The exit code for an exception that ends a command: BnfoldError's own (2 unless a
    subclass says otherwise), 130 for Ctrl-C, 3 for anything else (a bug)."""
    if isinstance(error, BnfoldError):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_INTERNAL


def verify_exit_code(equivalent: bool) -> int:
    """``verify``'s exit code for its verdict."""
    return EXIT_OK if equivalent else EXIT_FAILED
