"""The ``bnfold`` command line: a thin layer that parses options, calls the library
and renders its results. The only module that imports click or prints.

Exit codes (the policy lives in :mod:`bnfold.workflow`): 0 success, 1 verification or
policy failed, 2 bad usage or unusable input (one line on stderr naming the file and
the problem), 3 internal error (a bug: please report it), 130 interrupted, 143 terminated (SIGTERM).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import click

# Before numpy is imported (this module imports none): numpy asks for transparent huge pages
# for its large arrays; allocating those made a ResNet-50 fold's system time swing 0.11-0.73 s
# between runs on the benchmark machine (0.15-0.21 s without, same median wall time). Only the
# bnfold command's own process; an explicit setting of the variable wins.
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")

from . import __version__  # noqa: E402
from .errors import BnfoldError
from .hosts import RULES
from .paths import SKIPPED_FOLDER_NAMES
# no onnx import: --help stays fast
from .workflow import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_UNUSABLE, EXPORT_REASONS

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Path(click.Path):
    """A path that may not be empty: ``bnfold fuse "$MODEL"`` with the variable unset would
    otherwise mean the current folder (``Path("") == Path(".")``)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("an empty path (an unset shell variable?)", param, ctx)
        return super().convert(value, param, ctx)


class _Finite(click.FloatRange):
    """A float that must be finite (a NaN tolerance would pass everything, a NaN momentum would
    write NaN statistics), within the range given. ``inf_ok`` admits +inf (a time budget)."""

    def __init__(self, min=None, max=None, *, inf_ok: bool = False, **kw) -> None:
        super().__init__(min, max, **kw)
        self.inf_ok = inf_ok

    def convert(self, value, param, ctx):
        import math

        rv = click.FLOAT.convert(value, param, ctx)  # the number first, the range after
        if math.isnan(rv) or (math.isinf(rv) and not (self.inf_ok and rv > 0)):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(rv, param, ctx)

    def _describe_range(self) -> str:
        # no bounds: nothing for --help to show (click wrote "x<=None"; the help text says the range)
        return "" if self.min is None and self.max is None else super()._describe_range()



def _fail(message: str, code: int = 2) -> None:
    click.echo(f"bnfold: error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn):
    """Reject -q with -v (usage error); turn BnfoldError into one line on stderr and its exit code
    (2), Ctrl-C into 130, and any other exception (a bug) into exit 3 with a one-line request
    for a bug report (the traceback with -v)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if kwargs.get("quiet") and kwargs.get("verbose"):
            raise click.UsageError("use -q or -v, not both")
        try:
            return fn(*args, **kwargs)
        except BnfoldError as e:
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            # only the commands that write models say none was (verify, inspect and check write none)
            _fail("interrupted; no model was written" if fn.__name__ in ("fuse", "insert", "recalibrate")
                  else "interrupted", EXIT_INTERRUPTED)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # usage errors: click prints them and exits 2
        except BrokenPipeError:
            _reader_gone()
        except Exception as e:  # a bug in bnfold: never a traceback by default, never exit 1
            from .workflow import internal_error_message

            if kwargs.get("verbose"):
                click.echo(traceback.format_exc().rstrip(), err=True)
            _fail(internal_error_message(e), EXIT_INTERNAL)

    return wrapper


EXIT_SIGPIPE = 128 + 13  # the status a shell shows for a process that SIGPIPE ended


def _reader_gone() -> None:
    """Standard output's reader went away (``bnfold fuse m.onnx | head -1``): stop quietly, as a
    command ended by SIGPIPE does, instead of calling it a bug. Outputs already written stay."""
    for stream in (sys.stdout, sys.stderr):  # the interpreter's final flush must not fail again
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass
    sys.exit(EXIT_SIGPIPE)


def _human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _color() -> bool:
    """Colours only on a terminal, and never when NO_COLOR is set."""
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def _paint(text: str, fg: str) -> str:
    return click.style(text, fg=fg) if _color() else text


def render_fuse(data: dict, verbose: int) -> str:
    """The fold summary and the per-BN table of a fuse report (``FuseResult.to_dict``), as text."""
    b, a = data["before"], data["after"]
    lines = []
    if data.get("output"):
        lines.append(f"{data['source']} -> {data['output']}")
    lines.append(f"BatchNormalization {b['bn_count']} -> {a['bn_count']}   nodes {b['node_count']} -> "
                 f"{a['node_count']}   weights {_human_size(b['weight_bytes'])} -> {_human_size(a['weight_bytes'])}")
    if data["reparameterized"]:
        lines.append(f"reparameterized {len(data['reparameterized'])} multi-branch block(s) into single Convs")
    records = data["records"]
    rows = [r for r in records if verbose > 0 or not r["folded"] or len(records) <= 40]
    if rows:
        w_node = max(len("BatchNormalization"), *(len(r["node"]) for r in rows))
        lines.append(f"  {'BatchNormalization':<{w_node}}  {'result':<6}  into / reason")
        for r in rows:
            if r["folded"]:
                where = {"into_preceding": "before", "into_following": "after"}.get(r["direction"], "merged")
                text = f"{r['host_op']} '{r['host']}' ({where})"
                status = _paint(f"{'folded':<6}", "green")
            else:
                text = f"{r['reason']}: {r.get('why') or r['detail']}"
                status = _paint(f"{'kept':<6}", "yellow")
            scope = "" if r["graph"] == "main graph" else f"  [{r['graph']}]"
            lines.append(f"  {r['node']:<{w_node}}  {status}  {text}{scope}")
        hidden = len(records) - len(rows)
        if hidden:
            lines.append(f"  ... and {hidden} folded (use -v to list them)")
    decomposed = data.get("decomposed_bn") or []
    if decomposed:
        n_folded = sum(1 for r in decomposed if r["folded"])
        lines.append(f"decomposed BN (per-channel Mul/Add after a linear op): {n_folded} of {len(decomposed)} folded")
        for r in decomposed:
            if verbose > 0 or not r["folded"]:
                text = (f"into {r['host_op']} '{r['host']}'" if r["folded"]
                        else f"kept: {r['reason']}: {r.get('why') or r['detail']}")
                lines.append(f"  {r['node']}  {text}")
    for u in data.get("not_reparameterized") or []:
        if verbose > 0:
            lines.append(f"  not reparameterized: {u['reason']}: {u['detail']}")
    return "\n".join(lines)


def _default_output(model: Path, tag: str = "fused") -> Path:
    from .paths import default_output

    return default_output(model, tag)


class _Bnfold(click.Group):
    """The command group, with usage errors as one line: ``bnfold: error: <problem> (see
    'bnfold CMD --help')`` on stderr and exit 2, instead of click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        if args is not None:  # called from Python (a test runner): exit as usual
            return self._main(args, prog_name, complete_var, **extra)
        _take_signals()
        try:
            try:
                self._main(args, prog_name, complete_var, **extra)
            except BrokenPipeError:  # an error message written into a closed pipe (`bnfold x 2>&1 | true`)
                _reader_gone()
        except SystemExit as e:
            _end_process(e.code)
        raise AssertionError("unreachable: _main always exits")

    def _main(self, args, prog_name, complete_var, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # bare `bnfold`: the help is the answer
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            click.echo(f"bnfold: error: {usage_problem(e)} (see '{_command_path(e.ctx)} --help')", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"bnfold: error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:  # Ctrl-C before a command ran (handle_errors takes it inside one)
            click.echo("bnfold: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:  # e.g. `bnfold --help | head -1`
            _reader_gone()
        except SystemExit as e:
            # click catches a broken pipe itself (while printing --help or --version), wraps the
            # standard streams so that the final flush stays quiet, and exits 1: a command whose
            # reader left ends as SIGPIPE would end it, as the commands themselves do
            # click 8.5 renamed it (the old name warns there): the old one only where the new is missing
            pacified = getattr(click.utils, "_PacifyFlushWrapper", None) or getattr(click.utils, "PacifyFlushWrapper",
                                                                                 None)
            if e.code == 1 and pacified is not None and isinstance(sys.stdout, pacified):
                _reader_gone()
            raise
        sys.exit(rv if isinstance(rv, int) else 0)


_TERMINATED: List[bool] = []


def _take_signals() -> None:
    """The command's signal handling, from here on: Ctrl-C raises KeyboardInterrupt again (where the
    entry point, ``bnfold.__main__``, left it at its default action) and SIGTERM is taken as Ctrl-C
    (:func:`_terminate_as_interrupt`). The libraries every command uses are imported before that, so
    that a signal during those imports ends the process quietly, not with a traceback or an abort
    inside onnx's native module initialisation (a new-user trial saw exits 134 and 139 there)."""
    import signal

    if not {"--help", "-h", "--version"} & set(sys.argv[1:]) and len(sys.argv) > 1:
        import numpy  # noqa: F401
        import onnx  # noqa: F401
    if signal.getsignal(signal.SIGINT) is signal.SIG_DFL:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _terminate_as_interrupt()


def _terminate_as_interrupt() -> None:
    """SIGTERM (``kill``, ``timeout``, a cancelled CI job) stops the ``bnfold`` command the way Ctrl-C
    does, so that staged outputs are removed and nothing partial is left; it exits 143."""
    import signal

    def terminated(signum: int, frame: Any) -> None:
        _TERMINATED.append(True)
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, terminated)
    except (ValueError, OSError, AttributeError):  # not the main thread, or no SIGTERM here
        pass


def _end_process(code: object) -> None:
    """End this ``bnfold`` process with ``code`` (as ``sys.exit`` would take it), without the
    interpreter's teardown when nothing is left for it to do: freeing every module and the
    model's objects one by one took 0.06 s of a 0.5 s fold. Standard streams are flushed and
    the ONNX Runtime worker stopped first; with another thread, a child process, a pending
    finalizer or multiprocessing in use, the ordinary exit runs its handlers instead."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):  # the status is decided: a late signal must not interrupt
        signal.signal(sig, signal.SIG_IGN)       # the ending with a traceback (seen in shutdown_worker)
    status = code if isinstance(code, int) else 0 if code is None else 1
    if _TERMINATED and status == EXIT_INTERRUPTED:
        status = EXIT_TERMINATED
    if not isinstance(code, (int, type(None))):
        print(code, file=sys.stderr)
    runner = sys.modules.get("bnfold.runner")
    if runner is not None:
        runner.shutdown_worker()
    if not _nothing_to_tear_down():
        sys.exit(status)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        status = EXIT_SIGPIPE  # as _reader_gone: the reader left before the last lines
    except (OSError, ValueError):
        pass
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    os._exit(status)


def _nothing_to_tear_down() -> bool:
    """True when exiting without the interpreter's teardown loses nothing: one thread, no child
    process, no live ``weakref.finalize`` (temporary folders), no multiprocessing state."""
    import threading
    import weakref

    if threading.active_count() != 1 or "multiprocessing" in sys.modules:
        return False
    if any(info.atexit for info in getattr(weakref.finalize, "_registry", {}).values()):
        return False
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True  # no child at all
    except (AttributeError, OSError):  # no waitid (not Linux/macOS): keep the ordinary exit
        return False
    return False  # a child exists (running or not yet reaped)


def _command_path(ctx: Optional[click.Context]) -> str:
    """``bnfold CMD`` whatever the program was called (``python -m bnfold``, a test runner)."""
    names: List[str] = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(["bnfold"] + names[::-1])


def usage_problem(e: click.UsageError) -> str:
    """Click's message as a clause: lower-case start, no full stop, suggestions in brackets."""
    text = " ".join(e.format_message().split())
    text = text.replace(". (Did you mean", " (did you mean").rstrip(".")
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


@click.group(cls=_Bnfold, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="bnfold")
def main() -> None:
    """Fold, insert and verify BatchNormalization layers in ONNX models.

    \b
    bnfold fuse model.onnx          fold BNs into neighbouring Conv/Gemm/MatMul weights
    bnfold inspect model.onnx       show what fuse would do, write nothing
    bnfold verify ref.onnx new.onnx compare two models through ONNX Runtime
    bnfold check models/            CI gate: fold in memory, verify, apply a policy
    bnfold insert model.onnx        add BNs (identity, or with calibrated statistics)
    bnfold recalibrate model.onnx   re-estimate BN statistics from new data

    Exit codes: 0 success, 1 verification or policy failed, 2 bad usage or unusable
    input, 3 internal error (a bug in bnfold: please report it), 130 interrupted (Ctrl-C), 143
    terminated (SIGTERM).
    """


def fold_options(fn):
    fn = click.option("--reparameterize", is_flag=True,
                      help="After folding, merge sums of parallel linear branches on one input (RepVGG, "
                           "MobileOne, ACNet blocks) into single Convs, where exact.")(fn)
    fn = click.option("--allow-overridable", is_flag=True,
                      help="Treat initializers that are also graph inputs (IR >= 4) as constants, as most "
                           "exporters intend; by default such BNs are kept (reason OVERRIDABLE_PARAMETER).")(fn)
    fn = click.option("--report", "report_path", type=_Path(dir_okay=False, path_type=Path),
                      help="Write the per-BN report as JSON to this file.")(fn)
    fn = click.option("--json", "as_json", is_flag=True,
                      help="Print the report as JSON on stdout instead of a table.")(fn)
    fn = click.option("-v", "--verbose", count=True, help="List every BN, folded ones included.")(fn)
    fn = click.option("-q", "--quiet", is_flag=True, help="Print only errors.")(fn)
    return fn


PROVIDER_CHOICES = ("auto", "cpu", "cuda")


def _check_providers(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A typo in --providers is a usage error, before any work, naming the valid values."""
    import difflib

    parts = [p.strip().lower() for p in value.split(",") if p.strip()]
    bad = [p for p in parts if p not in PROVIDER_CHOICES]
    if not parts or bad or ("auto" in parts and len(parts) > 1):
        close = difflib.get_close_matches(bad[0], PROVIDER_CHOICES, 1) if bad else []
        raise click.BadParameter(f"'{value}' is not one of auto, cpu, cuda, cpu,cuda"
                                 + (f" (did you mean '{close[0]}'?)" if close else ""))
    return value


EXACT_BUDGET_S = 10.0  # = bnfold.verification.EXACT_BUDGET_S (not imported here: --help stays fast; a test checks)


def verify_options(fn):
    """Options shared by ``verify`` and ``fuse`` (which verifies by default)."""
    opts = [
        click.option("--providers", default="auto", show_default=True, callback=_check_providers,
                     help="auto (CPU, plus CUDA when it really works), cpu, cuda, or cpu,cuda."),
        click.option("--samples", type=click.IntRange(1), default=None,
                     help="Random input sets to compare on [default: 2]; not with --inputs (its arrays are the "
                          "one sample)."),
        click.option("--seed", type=click.IntRange(0), default=0, show_default=True,
                     help="Seed for the random inputs (an integer >= 0)."),
        click.option("--dim", "dims", multiple=True, metavar="NAME=VALUE",
                     help="Value of a symbolic dimension (repeatable). Unnamed dynamic dims default to "
                          "2 for axis 0 and 32 elsewhere."),
        click.option("--shape", "shapes", multiple=True, metavar="INPUT=1x3x224x224",
                     help="Whole shape of one input, dimensions separated by 'x' (repeatable)."),
        click.option("--inputs", "inputs_path", type=_Path(path_type=Path),
                     help="Real inputs: .npz with one array per input name, or .npy for a single-input model."),
        click.option("--rtol", type=_Finite(0),
                     help="Relative tolerance: switches to the fixed element-wise check [default: calibrated "
                          "on measured noise, see 'How verify decides' in the README]."),
        click.option("--atol", type=_Finite(0),
                     help="Absolute tolerance: switches to the fixed element-wise check (the other part "
                          "then by dtype, float32 rtol 1e-3, atol 1e-4 x max|reference output|)."),
        click.option("--output-tol", "output_tols", multiple=True, metavar="OUTPUT=RTOL:ATOL",
                     help="Fixed tolerances for one output (either part may be empty; repeatable)."),
        click.option("--exact-budget", "exact_budget", type=_Finite(0, inf_ok=True), default=EXACT_BUDGET_S,
                     show_default=True, metavar="SECONDS",
                     help="Skip the float64 pass when its estimated cost exceeds this (the verdict is then "
                          "runtime-calibrated: the reference rerun with its weights moved 1 ulp; said in the "
                          "report); 0 never runs it."),
        click.option("--localize", is_flag=True,
                     help="On a difference, name the first intermediate tensor (same name in both) that diverges."),
        click.option("--junit", "junit_path", type=_Path(dir_okay=False, path_type=Path),
                     help="Write the verification as JUnit XML (one test case per output and provider)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _verify_kwargs(providers, samples, seed, dims, shapes, inputs_path, rtol, atol, output_tols, localize,
                   exact_budget=EXACT_BUDGET_S) -> dict:
    from .inputs import SHAPE_FORM, parse_assignments, parse_shape

    def parse_tol(text: str) -> tuple:  # (rtol, atol); verify() makes the Tolerance
        import math

        r, colon, a = text.partition(":")
        if not colon:  # "1e-3" alone: rtol or atol? the form says which
            raise ValueError(text)
        tol = float(r) if r else None, float(a) if a else None
        if any(t is not None and not (math.isfinite(t) and t >= 0) for t in tol):
            raise ValueError(text)  # parse_assignments names the option and the item
        return tol

    try:  # a malformed option value is a usage error, pointing at --help like click's own
        parsed = dict(dims=parse_assignments(dims, "--dim", int, "an integer"),
                      shapes=parse_assignments(shapes, "--shape", parse_shape, SHAPE_FORM),
                      output_tolerances=parse_assignments(output_tols, "--output-tol", parse_tol,
                                                          "RTOL:ATOL, each a number >= 0 or empty"))
    except BnfoldError as e:
        raise click.UsageError(e.message) from None
    return dict(providers=providers, samples=samples, seed=seed, inputs=inputs_path, rtol=rtol, atol=atol,
                localize=localize, exact_budget_s=exact_budget, **parsed)


def _g(x: float) -> str:
    return f"{x:.3g}"


def _pct(x: float) -> str:
    """A fraction of a limit: a percentage up to 10x, then a factor (a bug is thousands of times over)."""
    return "inf" if x == float("inf") else (f"{x:.0%}" if x < 10 else f"{x:.3g}x")


def render_verify(rep: dict, verbose: int = 0) -> str:
    """A verify report (``VerifyReport.to_dict``) as text (``verbose``: worst elements' values too)."""
    verdict = _paint("EQUIVALENT", "green") if rep["equivalent"] else _paint("NOT EQUIVALENT", "red")
    used = ", ".join(c["name"] for c in rep["comparisons"])
    method = rep.get("method", "fixed")
    lines = [f"verify: {rep['reference']} vs {rep['candidate']}: {verdict} "
             f"({rep['samples']} sample(s), seed {rep['seed']}; {used}; {method} verdict)"]
    for name, info in rep["inputs"].items():
        lines.append(f"  input {name}: {info['dtype']}{info['shape']} ({info['source']})")
    for note in rep["notes"]:
        lines.append(f"  note: {note}")
    ex = rep.get("exact")
    if ex and ex["ran"]:
        lines.append(f"  float64 check (sample 0, {ex['perturbations']} half-ulp draws per side, "
                     f"limit {ex['multiple']:g} x floor + output floor, {ex['seconds']:.2f} s):")
        for o in ex["outputs"]:
            if o["problem"]:
                lines.append(f"    {o['name']}: FAIL: {o['problem']}")
                continue
            state = "ok" if o["equivalent"] else _paint("FAIL", "red")
            text = (f"    {o['name']}: {state}: deviation {_g(o['deviation'])}, floor {_g(o['allowance'])} "
                    f"(reference {_g(o.get('reference_allowance', 0.0))}, candidate "
                    f"{_g(o.get('candidate_allowance', 0.0))}), limit {_g(o['limit'])}, uses {_pct(o['used'])}")
            if o["direction"]:
                text += (f"; vs exact arithmetic the candidate is {o['direction']} "
                         f"({_g(o['candidate_noise'])} vs the reference's {_g(o['reference_noise'])})")
            lines.append(text)
    rt = rep.get("runtime")
    if rt:
        lines.append(f"  runtime calibration: the reference rerun with {rt['weights']} weight tensors moved "
                     f"{rt['ulps']:g} ulp at random, {rt['draws']} draws; limit {rt['multiple']:g} x floor + "
                     f"{rt['floor_ulps']:g} output ulps ({rt['seconds']:.2f} s)")
    head = ("comparison", "output", "method", "max abs", "max rel", "cosine", "fail", "atol", "rtol", "floor",
            "limit", "used", "worst at")
    rows = []
    for c in rep["comparisons"]:
        for o in c["outputs"]:
            if o["problem"]:
                rows.append((c["name"], o["name"], o.get("method", ""), "FAIL: " + o["problem"])
                            + ("",) * (len(head) - 4))
                continue
            worst = "" if o["worst"] is None else f"#{o['worst']['sample']}{o['worst']['index']}"
            cos = "n/a" if o["cosine_similarity"] is None else f"{o['cosine_similarity']:.6f}"
            floor = o.get("floor")
            rows.append((c["name"], o["name"], o.get("method", ""), _g(o["max_abs_error"]), _g(o["max_rel_error"]),
                         cos, f"{o['fail_fraction']:.2%}" + ("" if o["equivalent"] else " FAIL"),
                         _g(o["atol"]), _g(o["rtol"]), "-" if floor is None else _g(floor), _g(o.get("limit", 0.0)),
                         _pct(o.get("used", 0.0)), worst))
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        lines.append("  " + "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    lines.append("  (floor and limit relative to max|reference output|; used: the largest difference / its bound)")
    for c in rep["comparisons"]:
        if c.get("placement"):
            parts = [f"{side} {p['by_provider'].get('CUDAExecutionProvider', 0)} of {p['nodes']} nodes on CUDA"
                     for side, p in c["placement"].items()]
            lines.append(f"  {c['name']}: " + ", ".join(parts))
    if verbose:
        for c in rep["comparisons"]:
            for o in c["outputs"]:
                if o["worst"]:
                    w = o["worst"]
                    lines.append(f"  worst {c['name']}:{o['name']} sample {w['sample']} at {w['index']}: "
                                 f"reference {w['reference']!r}, candidate {w['candidate']!r}")
    for sk in rep["skipped"]:
        lines.append(f"  skipped {sk['name']}: {sk['why']}")
    loc = rep["localized"]
    if loc:
        if loc["first_divergent"]:
            res = loc["result"] or {}
            if "max_abs_error" in res:
                fig = f"max abs {_g(res['max_abs_error'])}, {res['fail_fraction']:.2%} failing"
            elif res.get("deviation") is not None:
                fig = f"float64 deviation {_g(res['deviation'])}, limit {_g(res['limit'])}"
            else:
                fig = "values differ"
            lines.append(f"  first divergent tensor ({loc.get('method', 'runtime')}): '{loc['first_divergent']}', "
                         f"reference producer {loc['producer']}, candidate producer {loc.get('candidate_producer')} "
                         f"({fig})")
        else:
            lines.append(f"  localize: none of {loc['checked']} shared intermediate tensors diverges; "
                         "the difference arises in the nodes producing the outputs")
    t = rep["timing"]
    lines.append(f"  time: {t['total_s']:.2f} s ({t['inference_s']:.2f} s inference, "
                 f"{t.get('float64_s', 0.0):.2f} s float64, {t.get('runtime_calibration_s', 0.0):.2f} s runtime "
                 "calibration)")
    return "\n".join(lines)


def _collect(paths: Sequence[Path], exclude: Sequence[str] = ()) -> list:
    """``(model, root)`` pairs: files as given (root None), folders searched for ``*.onnx``
    (hidden folders, virtualenvs, site-packages, node_modules skipped); ``--exclude`` globs
    apply to both; a file named twice is kept once. When every model named is excluded,
    a note says so and the list is empty (nothing to do: a pre-commit run on excluded files)."""
    from .paths import find_models, is_excluded, models_reading, unique_models

    models: List[Tuple[Path, Optional[Path]]] = []
    excluded = 0
    for p in paths:
        if p.is_dir():
            found = find_models(p, exclude)
            if not found:
                outputs = len(find_models(p, exclude, outputs=True))
                raise BnfoldError("folder holds no *.onnx file (outside skipped and excluded folders)" if not outputs
                                  else f"folder holds only bnfold outputs ({outputs} *.fused.onnx file(s), skipped "
                                       "when a folder is searched): name them to include them", p)
            models.extend((q, p) for q in found)
        elif p.name.endswith(".data") and p.is_file():  # external data: check the model(s) reading it
            owners = models_reading(p)
            if not owners:
                raise BnfoldError("no *.onnx model in its folder keeps its external data in it", p)
            kept = [q for q in owners if not is_excluded(q, exclude)]
            excluded += len(owners) - len(kept)
            models.extend((q, None) for q in kept)
        elif is_excluded(p, exclude):
            excluded += 1
        else:
            models.append((p, None))
    if not models and excluded:
        click.echo(f"bnfold: note: all {excluded} model(s) named match --exclude; nothing to do", err=True)
    return unique_models(models)


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def _earlier_output(model: Path, root: Optional[Path], out_dir: Path) -> bool:
    """Whether ``model``, found by searching ``root``, lies in ``out_dir`` strictly below ``root``,
    so it is an earlier run's output rather than an input. An out-dir that is the searched
    folder or above it holds the inputs themselves: they are inputs (and an output that
    would replace one is refused later)."""
    if root is None or not _inside(model, out_dir) or not _inside(out_dir, root):
        return False
    return Path(out_dir).resolve() != Path(root).resolve()


def exclude_option(fn):
    skipped = ", ".join(sorted(SKIPPED_FOLDER_NAMES))
    return click.option("--exclude", "exclude", multiple=True, metavar="GLOB",
                        help="Skip models matching GLOB (repeatable), named MODELS and files found in folders "
                             "alike: matched against the path (below the searched folder, or as given) and "
                             "against each of its parts. Folder searches always skip hidden folders (.git, "
                             f".venv, ...), virtual environments (a folder holding pyvenv.cfg), {skipped}.")(fn)


def _help(**texts: str):
    """Set the help of options shared with other commands (by parameter name) for one command."""
    def deco(fn):
        params = {p.name: p for p in getattr(fn, "__click_params__", [])}
        for name, text in texts.items():
            params[name].help = text
        return fn

    return deco


JUNIT_BATCH_HELP = ("Write JUnit XML for CI to this file, whatever the outcome: one test case per model "
                    "(failure: not equivalent or policy failed; error: unusable input or internal error; "
                    "skipped: interrupted), plus one per verified output and provider.")


def _progress(jobs: int, quiet: bool):
    """A progress callback for :func:`bnfold.workflow.run_batch`, and a closer: a bar on a
    terminal, one line per model otherwise (on stderr)."""
    if quiet:
        return None, lambda: None
    if sys.stderr.isatty():
        bar = click.progressbar(length=jobs, label="folding", file=sys.stderr)
        bar.__enter__()
        return (lambda o, done, total: bar.update(1)), (lambda: bar.__exit__(None, None, None))

    def line(o, done: int, total: int) -> None:
        click.echo(f"[{done}/{total}] {o.model}: {'ok' if o.exit_code == 0 else _problem(o)}", err=True)

    return line, lambda: None


def _problem(o) -> str:
    """An outcome's error without the model's name in front (the line names the model already)."""
    error = o.error or ""
    prefix = f"{o.model}: "
    return error[len(prefix):] if error.startswith(prefix) else error


def _run(pairs: list, opts, jobs: int, quiet: bool, single: bool):
    from .workflow import run_batch

    on_outcome, close = (None, lambda: None) if single else _progress(len(pairs), quiet)
    try:
        return run_batch(pairs, opts, jobs, on_outcome)
    finally:
        close()


_STATUS_TEXT = {"written": "ok", "passed": "ok", "forced": "FORCED", "not_equivalent": "FAILED",
                "policy_failed": "FAILED", "unusable": "error", "internal_error": "INTERNAL ERROR",
                "interrupted": "interrupted"}


def render_summary(report) -> str:
    """One line per model, then the totals and the exit code."""
    from .workflow import Status

    head = ("model", "BN", "result", "output / problem")
    rows = []
    for o in report.outcomes:
        rep = o.report
        bn = f"{rep['before']['bn_count']} -> {rep['after']['bn_count']}" if rep else ""
        status = _STATUS_TEXT.get(o.status.value, o.status.value)
        if status == "ok" and o.verified:
            status = "ok, verified"
        text = o.output or _problem(o)
        if not text and rep and o.status is Status.PASSED:
            kept = [r["reason"] for r in rep["records"] if not r["folded"]]
            if kept:
                from .workflow import reason_counts

                text = f"kept: {reason_counts(kept)}"
        if o.status is Status.FORCED:
            text = f"{o.output} (written with --force; not equivalent)"
        if o.hint:
            text += f" ({o.hint})"
        rows.append((o.model, bn, status, text))
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(3)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r[:3], widths)) + "  " + str(r[3]) for r in [head] + rows]
    failed = report.count(Status.NOT_EQUIVALENT, Status.POLICY_FAILED, Status.FORCED)
    text = (f"{len(report.outcomes)} model(s): {report.count(Status.WRITTEN, Status.PASSED)} ok, "
            f"{failed} failed verification or policy, {report.count(Status.UNUSABLE)} could not be processed")
    if report.count(Status.INTERNAL_ERROR):
        text += f", {report.count(Status.INTERNAL_ERROR)} internal error(s)"
    if report.interrupted:
        text += f", {report.count(Status.INTERRUPTED)} not done (interrupted)"
    lines.append(f"{text}; exit {report.exit_code}")
    return "\n".join(lines)


def _interrupt_line(report, command: str, limit: int = 10) -> str:
    def names(paths: List[str]) -> str:
        shown = ", ".join(paths[:limit])
        return f" ({shown}{', ...' if len(paths) > limit else ''})" if paths else ""

    from .workflow import Status

    if command == "check":  # writes no model: say which were checked
        pending = [o.model for o in report.outcomes if o.status is Status.INTERRUPTED]
        return (f"interrupted: {len(report.outcomes) - len(pending)} model(s) checked; "
                f"{len(pending)} not checked{names(pending)}")
    written = report.written
    not_done = [o.model for o in report.outcomes if o.output is None]
    return (f"interrupted: {len(written)} output(s) written{names(written)}; "
            f"{len(not_done)} model(s) not written{names(not_done)}")


def _refuse_reports_over_inputs(paths: Sequence[Optional[Path]], models: Sequence[Path],
                                outputs: Sequence[Path] = (), created: Optional[Path] = None) -> None:
    """Before any work: refuse a --report/--junit path that is a model of the run, a file one
    reads (external data), an output of fuse or the external data it writes beside it
    (``<output>.data``, ``<output>.1.data`` ...: the report, written last, would replace the
    folded weights), or the other report, so a report can never destroy one. ``created``:
    the --out-dir, made only later, so a report inside it is probed then."""
    from .paths import check_output, files_read, probe_writable, same_file

    given = [p for p in paths if p is not None]
    if not given:
        return
    reads = files_read(list(models) + list(outputs))
    for i, p in enumerate(given):
        for out in outputs:  # before the check of the files read, which would call an output one of those
            if same_file(p, out):
                raise BnfoldError(f"report path is the output {out}: the report would replace the folded model; "
                                  "choose another name", p)
        check_output(p, reads, what="report")
        for out in outputs:
            if p.name.startswith(out.name + ".") and p.name.endswith(".data") and same_file(p.parent, out.parent):
                raise BnfoldError(f"report path would replace {p.name}, where the external data of {out} may be "
                                  "written; choose another name", p)
        if any(same_file(p, q) for q in given[:i]):
            raise BnfoldError("--report and --junit name the same file: one would replace the other", p)
        if created is not None and not p.parent.exists() and _inside(p.parent, created):
            continue  # inside the --out-dir that fuse creates: probed once it exists
        probe_writable(p)  # a report that cannot be written fails now, not after the outputs


def _probe_reports_in(paths: Sequence[Optional[Path]], folder: Path) -> None:
    """A report inside a just-created --out-dir, probed now that the folder exists."""
    from .paths import probe_writable

    for p in paths:
        if p is not None and _inside(p.parent, folder):
            probe_writable(p)


def _write_atomic(path: Path, data: bytes) -> None:
    """A report file, written atomically; any OS refusal (a folder where nothing can be created,
    e.g. under /proc) is one line naming the file (a BnfoldError from the writer)."""
    from .modelio import write_bytes_atomic

    write_bytes_atomic(path, data)


def _finish(command: str, report, report_path: Optional[Path], junit_path: Optional[Path], as_json: bool,
            verbose: int, quiet: bool, single: bool, t0: float) -> None:
    """Reports (JSON, JUnit, GitHub step summary), rendering, annotations and the exit code
    (:attr:`bnfold.workflow.Report.exit_code`). Reports are written in every exit path. The run is
    over: Ctrl-C or SIGTERM now is held and dropped, so that the reports, the message and the exit
    status all tell the run as it happened (a trial saw a report "passed" with exit 130, a JUnit file
    missing, and "no model was written" beside a written model)."""
    from .modelio.write import signals_held

    with signals_held():
        _finish_run(command, report, report_path, junit_path, as_json, verbose, quiet, single, t0)


def _finish_run(command: str, report, report_path: Optional[Path], junit_path: Optional[Path], as_json: bool,
                verbose: int, quiet: bool, single: bool, t0: float) -> None:
    from .workflow import Status

    if _TERMINATED:  # its exit codes, in every report, are the process's
        report.mark_terminated()
    outcomes = report.outcomes
    dicts = [o.to_dict() for o in outcomes]
    # one model: its fuse report, or its outcome where it has none (unusable, interrupted: a report of an
    # earlier run must not stay in its place); several: {"models": [...]}
    if single:
        doc = outcomes[0].report if outcomes and outcomes[0].exit_code not in (EXIT_UNUSABLE,) else None
        if doc is None and dicts:
            doc = dicts[0]
    else:
        doc = report.to_dict()
    unwritten: List[BnfoldError] = []  # a report that cannot be written fails the run after it is told

    def write_report(path: Path, data: bytes) -> None:
        try:
            _write_atomic(path, data)
        except BnfoldError as e:
            unwritten.append(e)

    if report_path is not None and doc is not None:
        write_report(report_path, (json.dumps(doc, indent=2) + "\n").encode())
    if junit_path is not None:
        from .reports import junit_for_outcomes

        write_report(junit_path, junit_for_outcomes(command, dicts, time.perf_counter() - t0).encode())
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary and command != "inspect":  # the CI commands
        from .reports import github_summary

        _append_step_summary(Path(summary), github_summary(command, dicts))
    if as_json and doc is not None:
        click.echo(json.dumps(doc, indent=2))
    elif not quiet and not as_json:
        if single:
            for o in outcomes:
                if o.report and o.exit_code != EXIT_UNUSABLE:
                    click.echo(render_fuse(o.report, verbose))
                    if o.report.get("verification"):
                        click.echo(render_verify(o.report["verification"], verbose))
        else:
            click.echo(render_summary(report))
    github = os.environ.get("GITHUB_ACTIONS") == "true"
    for o in outcomes:
        if not quiet:
            for w in o.warnings:
                click.echo(f"bnfold: warning: {w}", err=True)
        if o.error and o.status is not Status.INTERRUPTED:
            line = o.error + (f" ({o.hint})" if o.hint else "")
            if o.status is Status.FORCED:
                click.echo(f"bnfold: warning: {line}", err=True)
            elif single or quiet or as_json or len(outcomes) == 1 or o.status is Status.INTERNAL_ERROR:
                click.echo(f"bnfold: error: {line}", err=True)
            if o.traceback and verbose:
                click.echo(o.traceback.rstrip(), err=True)
            if github:
                click.echo(f"::error file={o.model}::{line}")
    if report.interrupted:
        click.echo(f"bnfold: {_interrupt_line(report, command)}", err=True)
    for e in unwritten:  # the models' outcomes stand: a report's failure must not read as if nothing was written
        done = f"{len(report.written)} output(s) written" if command != "check" else "its checks stand"
        click.echo(f"bnfold: error: {e} (the run itself finished: {done})", err=True)
    if unwritten:
        sys.exit(max(report.exit_code, EXIT_UNUSABLE))
    if report.exit_code:
        sys.exit(report.exit_code)


@contextlib.contextmanager
def _junit_on_refusal(command: str, junit_path: Optional[Path]):
    """When a run is refused before any model runs (a usage error, a missing folder, clashing
    outputs) or interrupted then, still write the JUnit file CI reads: one case saying why (``<error>``;
    ``<skipped>`` when interrupted, as for an interrupted model)."""
    from .paths import same_file

    try:
        yield
    except (BnfoldError, click.UsageError, KeyboardInterrupt) as e:
        refused_itself = isinstance(e, BnfoldError) and e.path is not None and junit_path is not None \
            and same_file(e.path, junit_path)
        if junit_path is not None and not refused_itself:
            from .reports import junit_for_outcomes

            case = ({"model": "bnfold", "status": "interrupted", "error": "interrupted before any model ran"}
                    if isinstance(e, KeyboardInterrupt) else
                    {"model": str(getattr(e, "path", None) or "bnfold"), "status": "unusable", "error": str(e)})
            try:
                _write_atomic(junit_path, junit_for_outcomes(command, [case]).encode())
            except BnfoldError:
                pass  # an unwritable report must not hide the refusal, which is what the user must see
        raise


def _append_step_summary(path: Path, text: str) -> None:
    # GitHub creates the file and reads it after the step; appending is its documented use
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise BnfoldError(f"cannot append the step summary ({e.strerror or e})", path) from None


def _warn_unused(options: dict, why: str, quiet: bool) -> None:
    """Say which of ``options`` were given on the command line although ``why`` makes them do nothing
    (no silent no-ops: a --shape typo under --no-verify passed unnoticed)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    given = [p.opts[0] for p in ctx.command.params
             if p.name in options and ctx.get_parameter_source(p.name) is ParameterSource.COMMANDLINE]
    if given and not quiet:
        click.echo(f"bnfold: warning: {', '.join(given)}: no effect with {why} (nothing is verified)", err=True)


def _options(allow_overridable: bool, reparameterize: bool, verify_opts: dict, **kw):
    from .workflow import FuseOptions

    return FuseOptions(allow_overridable=allow_overridable, reparameterize=reparameterize,
                       verify_kwargs=_verify_kwargs(**verify_opts), **kw)


@main.command(context_settings=CONTEXT)
@_help(report_path="Write the JSON report to this file: one model's per-BN report and verification, or, with "
                   "several models, {\"models\": [...]} with each one's outcome (schema in the README).",
       verbose="List every BN, folded ones included (one model); show internal errors' tracebacks.",
       junit_path=JUNIT_BATCH_HELP)
@click.argument("models", nargs=-1, required=True, type=_Path(path_type=Path))
@click.option("-o", "--output", type=_Path(dir_okay=False, path_type=Path),
              help="Where to write the folded model (one MODEL only) [default: <stem>.fused.onnx beside it].")
@click.option("--out-dir", type=_Path(file_okay=False, path_type=Path),
              help="Write each folded model here under its own name (a folder's layout is kept; created "
                   "if missing). Two models that would get the same name are refused before anything is "
                   "written.")
@click.option("--in-place", is_flag=True, help="Overwrite each MODEL itself (atomically).")
@click.option("-j", "--jobs", type=click.IntRange(1), default=1, show_default=True,
              help="Models folded in parallel processes.")
@click.option("--verify/--no-verify", "do_verify", default=None,
              help="Check each result against its MODEL through ONNX Runtime before writing it "
                   "[default: on when ONNX Runtime is installed].")
@click.option("--force", is_flag=True, help="Write the output even when verification fails; says so and "
                                            "exits 1.")
@exclude_option
@fold_options
@verify_options
@handle_errors
def fuse(models, output: Optional[Path], out_dir: Optional[Path], in_place: bool, jobs: int,
         do_verify: Optional[bool], force: bool, exclude, allow_overridable: bool, reparameterize: bool,
         report_path: Optional[Path], as_json: bool, verbose: int, quiet: bool, junit_path: Optional[Path],
         **verify_opts) -> None:
    """Fold inference-time BatchNormalization into neighbouring linear ops.

    Folds each BN into the Conv, ConvTranspose, Gemm or MatMul(+Add) before it (also
    through a channel Concat), or into an unpadded Conv or a Gemm after it, computing
    in float64 and rounding once. Every BN left in place is listed with a reason
    code. Each result is verified against its MODEL through ONNX Runtime and written
    only if it is equivalent (exit 1 otherwise; --force writes it and still exits 1).
    Inputs are never modified unless --in-place is given, and no output may replace
    a file an input reads; outputs are written atomically.

    MODELS may be files or folders (searched for *.onnx, skipping bnfold's own *.fused.onnx
    outputs: name one to include it). With several, one failure
    does not stop the rest, a summary table ends the run, and the exit code is the
    worst of them.
    """
    from .paths import check_batch_targets

    t0 = time.perf_counter()
    with _junit_on_refusal("fuse", junit_path):
        if sum(bool(x) for x in (output, out_dir, in_place)) > 1:
            raise click.UsageError("use only one of --output, --out-dir and --in-place")
        if in_place and force:  # the only copy of MODEL would be replaced by a model that differs from it
            raise click.UsageError("--force with --in-place would replace MODEL by a model that is not "
                                   "equivalent to it; write it elsewhere with -o or --out-dir")
        found = _collect(models, exclude)
        if out_dir is not None:  # outputs of an earlier run into a folder inside a searched one are not inputs
            searched = len(found)
            found = [(m, r) for m, r in found if not _earlier_output(m, r, out_dir)]
            if searched and not found:
                raise BnfoldError("every model found is inside --out-dir, so taken as an earlier run's output: "
                                  "nothing to fold (give an --out-dir outside the searched folders)", out_dir)
        if output is not None and len(found) > 1:
            raise click.UsageError("--output takes one MODEL; use --out-dir for several")
        if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
            raise BnfoldError("output folder is not a folder", out_dir)
        pairs = []
        created: List[Path] = []  # folders made for the outputs (removed again if left empty)
        for model, root in found:
            if in_place:
                target = model
            elif output is not None:
                target = output
            elif out_dir is not None:
                target = out_dir / (model.relative_to(root) if root is not None else Path(model.name))
            else:
                target = _default_output(model)
            pairs.append((model, target))
        check_batch_targets(pairs, in_place=in_place)
        _refuse_reports_over_inputs([report_path, junit_path], [m for m, _ in pairs], [t for _, t in pairs],
                                    created=out_dir)
        if out_dir is not None:  # only now, when nothing is refused: a missing --out-dir is created
            for _, target in pairs:
                created += [d for d in (target.parent, *target.parent.parents) if not d.exists()]
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise BnfoldError(f"output folder cannot be created ({e.strerror or e})",
                                      target.parent) from None
            _probe_reports_in([report_path, junit_path], out_dir)
    if do_verify is False:
        _warn_unused(verify_opts, "--no-verify", quiet)
    opts = _options(allow_overridable, reparameterize, verify_opts, in_place=in_place, verify=do_verify,
                    force=force)
    single = len(models) == 1 and len(pairs) == 1 and not models[0].is_dir()
    try:
        report = _run(pairs, opts, jobs, quiet, single)
        _finish("fuse", report, report_path, junit_path, as_json, verbose, quiet, single, t0)
    finally:  # folders made for outputs that were never written (a failure, Ctrl-C) do not stay behind
        for d in sorted(set(created), key=lambda d: len(d.parts), reverse=True):
            try:
                d.rmdir()  # only if empty
            except OSError:
                pass


@main.command(context_settings=CONTEXT)
@_help(report_path="Write the JSON report to this file, whatever the outcome: {\"models\": [...]}, each model's "
                   "outcome with its per-BN report and verification (schema in the README).",
       as_json="Print the JSON report (as --report writes it) on stdout instead of the summary table.",
       verbose="Show internal errors' tracebacks.",
       junit_path=JUNIT_BATCH_HELP)
@click.argument("models", nargs=-1, required=True, type=_Path(path_type=Path))
@click.option("--require-folded", is_flag=True,
              help="Fail (exit 1) a model in which fuse would still fold a BatchNormalization (a deployment "
                   "artifact nobody preprocessed), or that keeps one only because of how it was exported: "
                   f"{', '.join(EXPORT_REASONS)} (overridable or run-time computed parameters; the message "
                   "says what to do, and --exclude leaves out a model that really computes them at run time). "
                   "BNs kept for other reasons cannot be folded exactly and pass. A failure lists each "
                   "model's kept BNs by reason code.")
@click.option("-j", "--jobs", type=click.IntRange(1), default=1, show_default=True,
              help="Models checked in parallel processes.")
@exclude_option
@fold_options
@verify_options
@handle_errors
def check(models, require_folded: bool, jobs: int, exclude, allow_overridable: bool, reparameterize: bool,
          report_path: Optional[Path], as_json: bool, verbose: int, quiet: bool, junit_path: Optional[Path],
          **verify_opts) -> None:
    """The CI gate: fold each model in memory, verify the fold, apply the policy. Writes no model.

    Exit 0 when every model passes, 1 when one fails the policy or its fold does not
    verify, 2 when one cannot be used, 3 on an internal error. Under GitHub Actions
    failures are also printed as ::error annotations and a table is appended to the
    step summary.
    """
    t0 = time.perf_counter()
    with _junit_on_refusal("check", junit_path):
        pairs = [(m, None) for m, _ in _collect(models, exclude)]
        _refuse_reports_over_inputs([report_path, junit_path], [m for m, _ in pairs])
    opts = _options(allow_overridable, reparameterize, verify_opts, require_folded=require_folded)
    report = _run(pairs, opts, jobs, True, single=False)
    _finish("check", report, report_path, junit_path, as_json, verbose, quiet, False, t0)


@main.command(context_settings=CONTEXT)
@_help(junit_path="Write JUnit XML to this file, whatever the outcome: one test case per output and provider "
                  "(failure: not equivalent), or one error case when the models could not be compared.")
@click.argument("reference", type=_Path(path_type=Path))
@click.argument("candidate", type=_Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (schema in the README).")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors; the exit code tells the verdict.")
@click.option("-v", "--verbose", count=True, help="Also show the values at each output's worst element.")
@verify_options
@handle_errors
def verify(reference: Path, candidate: Path, as_json: bool, quiet: bool, verbose: int, junit_path: Optional[Path],
           **verify_opts) -> None:
    """Check that CANDIDATE computes what REFERENCE computes.

    Runs both through ONNX Runtime (graph optimisations off; CUDA with TF32 off)
    on the same seeded inputs and judges every output against measured noise: a
    float64 pass with an allowance from both models' weight rounding, or, over
    --exact-budget, the reference rerun with its weights moved 1 ulp. --rtol/--atol
    mean the fixed check (an element fails when it exceeds both). Exit 0 equivalent,
    1 not equivalent, 2 could not run, 3 internal error. --junit is written in every case.
    """
    from .reports import junit_for_verify
    from .verification import verify as verify_models
    from .workflow import exit_code_for, internal_error_message, verify_exit_code

    _refuse_reports_over_inputs([junit_path], [reference, candidate])
    try:
        report = verify_models(reference, candidate, **_verify_kwargs(**verify_opts))
    except (Exception, KeyboardInterrupt) as e:
        if junit_path is not None:  # CI reads the XML whatever happened
            kind = {EXIT_UNUSABLE: "UnusableInput", EXIT_INTERRUPTED: "Interrupted"}.get(exit_code_for(e),
                                                                                          "InternalError")
            message = str(e) if isinstance(e, (BnfoldError, KeyboardInterrupt)) else internal_error_message(e)
            _write_atomic(junit_path, junit_for_verify(None, candidate=str(candidate),
                                                       error=(kind, message or "interrupted")).encode())
        raise
    if junit_path is not None:
        _write_atomic(junit_path, junit_for_verify(report.to_dict(), candidate=str(candidate)).encode())
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif not quiet:
        click.echo(render_verify(report.to_dict(), verbose))
    sys.exit(verify_exit_code(report.equivalent))


@main.command(context_settings=CONTEXT)
@_help(report_path="Write the per-BN report as JSON to this file.")
@click.argument("model", type=_Path(path_type=Path))
@fold_options
@handle_errors
def inspect(model: Path, allow_overridable: bool, reparameterize: bool, report_path: Optional[Path], as_json: bool,
            verbose: int, quiet: bool) -> None:
    """Show which BNs fuse would fold and why the others stay; write no model."""
    from .fold import fuse as fuse_model
    from .workflow import Report, Status, _outcome

    t0 = time.perf_counter()
    _refuse_reports_over_inputs([report_path], [model])
    try:
        data = fuse_model(model, allow_overridable=allow_overridable, reparameterize=reparameterize).to_dict()
    except BnfoldError as e:  # as fuse reports it: one line, and with --json the outcome on stdout
        report = Report([_outcome(model, Status.UNUSABLE, exit_code=e.exit_code, error=str(e))])
    else:
        data["output"] = data["verification"] = None
        report = Report([_outcome(model, Status.PASSED, report=data)])
    _finish("inspect", report, report_path, None, as_json, verbose, quiet, True, t0)


def calibration_options(fn):
    opts = [
        click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True,
                     help="Samples per calibration batch (m/(m-1) uses the values per channel of one batch)."),
        click.option("--estimator", type=click.Choice(["population", "momentum"]), default="population",
                     show_default=True, help="population: the BN paper's inference statistics; momentum: the "
                                             "running averages frameworks keep in training, starting from mean 0 and "
                                             "variance 1 as PyTorch and Keras do (after b batches the data weighs "
                                             "1 - momentum^b; below 99% a warning says so)."),
        click.option("--momentum", type=_Finite(), default=0.99, show_default=True,
                     help="Momentum of the running averages, 0 <= momentum < 1 (Keras' default 0.99; 1 would "
                          "never move from the start values); also written into new BNs."),
        click.option("--exact", is_flag=True,
                     help="Measure each BN with every BN upstream of it at its final statistics: one pass over "
                          "the data per dependency wave (17 for resnet18, 52 for mobilenetv2), each over the part "
                          "of the model it needs: 10x plain inference on resnet18, 28-50x on resnet50, "
                          "mobilenetv2 and efficientnet-b0 (batch 32). By default: one pass in which every BN "
                          "normalises with its current batch statistics (torch's update_bn, AdaBN): 1.3-1.8x plain "
                          "inference on resnet18 and resnet50, 2.3-4.3x on mobilenetv2 and efficientnet-b0. The "
                          "two differ by upstream batch noise, which grows as the last feature maps shrink: at "
                          "224x224 input the default is within 1.0% of sigma in means and 3.7% in variances on all "
                          "four; at 64x64 (2x2 last feature maps) within 1.5% and 3.9% on resnet18, up to 11% and "
                          "62% on the others; the exact method on another 256 samples moves them at least as far. "
                          "Worth its cost for deep or depthwise-separable networks on small inputs (few values per "
                          "channel per batch in the last feature maps), for small batches, or to get the "
                          "statistics the final model itself would measure. insert --mode preserve is exact "
                          "either way."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
        click.option("-q", "--quiet", is_flag=True, help="Print only errors."),
        click.option("-v", "--verbose", count=True, help="List skipped ops too."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _calibration_files(calibration: Optional[Path]) -> list:
    """The calibration data files a command reads (a folder's .npz/.npy files)."""
    if calibration is None:
        return []
    if calibration.is_dir():
        return sorted(q for q in calibration.iterdir() if q.suffix in (".npz", ".npy"))
    return [calibration]


def _calibrated(model: Path, output: Optional[Path], tag: str, quiet: bool, run,
                calibration: Optional[Path] = None) -> dict:
    """Shared by insert and recalibrate: pick the output, show a progress bar on a terminal
    while ``run(progress)`` measures, write the model atomically (external data kept as
    the input had it), return the report."""
    from .modelio import stage_model

    from .paths import check_model_output, model_files

    target = output or _default_output(model, tag)
    if not target.parent.is_dir():  # before spending the calibration time
        raise BnfoldError(f"output folder '{target.parent}' does not exist", target)
    # never replace the model, its external data or the calibration data
    reads = model_files(model) + _calibration_files(calibration)
    check_model_output(target, reads)
    if quiet or not sys.stderr.isatty():
        result = run(None)
    else:
        # one status line, rewritten in place (the sample total is unknown until the data ends)
        def progress(samples: int, k: int, passes: int) -> None:
            click.echo(f"\rcalibrating: pass {k}/{passes}, {samples} samples", nl=False, err=True)

        try:
            result = run(progress)
        finally:
            click.echo("\r\033[K", nl=False, err=True)
    staging = stage_model(result.model, target, external_data=result.source_external_data or None, avoid=reads,
                          source=model)
    from .modelio.write import deliver, signals_held

    with staging as staged:
        with signals_held() as interrupted:  # the model and its data file are replaced together or not at all
            staged.commit()
    if interrupted:
        deliver(interrupted, raising=False)  # its handler runs now: SIGTERM is told from Ctrl-C (exit 143)
        _fail(f"interrupted; {target} was written, complete, before it stopped", EXIT_INTERRUPTED)
    data = result.to_dict()
    data["source"], data["output"] = str(model), str(target)
    return data


def _only_with_calibration(ctx: click.Context, names: tuple) -> None:
    """Options that mean something only with data: refuse them, given explicitly, without it."""
    given = [n for n in names if _given(ctx, n)]
    if given:
        raise click.UsageError(f"{_options_text(given)} {'applies' if len(given) == 1 else 'apply'} only with "
                               "--calibration (without data the BNs are the identity)")


def _options_text(names: Sequence[str]) -> str:
    """``["a", "b_c", "d"]`` as ``--a, --b-c and --d``."""
    opts = ["--" + n.replace("_", "-") for n in names]
    return opts[0] if len(opts) == 1 else ", ".join(opts[:-1]) + " and " + opts[-1]


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT,
                                                  click.core.ParameterSource.DEFAULT_MAP, None)


def _warn(data: dict, quiet: bool) -> None:
    if quiet:
        return
    cal = data.get("calibration")
    for w in (cal or {}).get("warnings", []):
        click.echo(f"bnfold: warning: {w}", err=True)


def _calibration_line(cal: dict) -> str:
    how = "batch statistics upstream" if cal["method"] == "batch" else "exact"
    return (f"{cal['estimator']} statistics from {cal['samples']} samples in {cal['batches']} batches, "
            f"{cal['passes']} pass(es) ({how})")


@main.command(context_settings=CONTEXT)
@_help(verbose="Also list each BN inserted (ops skipped are always listed).")
@click.argument("model", type=_Path(path_type=Path))
@click.option("-o", "--output", type=_Path(dir_okay=False, path_type=Path),
              help="Where to write the model [default: <stem>.bn.onnx beside MODEL].")
@click.option("--op", "ops", multiple=True,
              help=f"Op types to follow with a BN (repeatable) [default: {', '.join(RULES)}].")
@click.option("--node", help="Only ops whose name (or output) matches this regular expression.")
@click.option("--exclude", help="Skip ops whose name (or output) matches this regular expression.")
@click.option("--position", type=click.Choice(["pre-activation", "post-activation"]), default="pre-activation",
              show_default=True, help="Directly after the op (the BN paper), or after its activation.")
@click.option("--calibration", type=_Path(path_type=Path),
              help="Calibration data: .npz (one array per input, samples on axis 0) or a folder of .npz/.npy.")
@click.option("--mode", type=click.Choice(["preserve", "normalize"]), default="preserve", show_default=True,
              help="With data: preserve keeps the function (scale=sqrt(var+eps), bias=mean); normalize "
                   "standardises activations (scale=1, bias=0), changing outputs on purpose.")
@click.option("--epsilon", type=float, default=1e-5, show_default=True, help="BN epsilon attribute (> 0).")
@calibration_options
@click.pass_context
@handle_errors
def insert(ctx: click.Context, model: Path, output: Optional[Path], ops, node, exclude, position, calibration, mode,
           epsilon, batch_size, estimator, momentum, exact, as_json, quiet, verbose) -> None:
    """Add BatchNormalization after chosen ops of a trained model.

    Without --calibration each BN is exactly the identity in the model's dtype. With
    it, the BNs carry statistics measured on the data through ONNX Runtime, in
    batches, accumulated in float64 without holding the activations.
    """
    from .calibration import check_momentum
    from .insert import DEFAULT_OPS, check_epsilon, check_ops, insert as insert_bn

    if calibration is None:
        _only_with_calibration(ctx, ("estimator", "mode", "batch_size", "exact"))
    check_ops(ops)  # option errors before the model is read
    check_epsilon(epsilon)
    check_momentum(momentum)

    def run(progress):
        result = insert_bn(model, ops=ops or DEFAULT_OPS, node=node, exclude=exclude, position=position,
                           calibration=calibration, batch_size=batch_size, estimator=estimator, momentum=momentum,
                           mode=mode, epsilon=epsilon, exact=exact, progress=progress)
        if not any(r.inserted for r in result.records):
            first = result.records[0]
            raise BnfoldError(f"no BatchNormalization inserted: all {len(result.records)} chosen op(s) refused "
                              f"(first: {first.reason}: {first.detail}); nothing written", model)
        return result

    data = _calibrated(model, output, "bn", quiet, run, calibration)
    _warn(data, quiet)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    elif not quiet:
        cal = data["calibration"]
        how = "identity (no data)" if cal is None else _calibration_line(cal)
        click.echo(f"{model} -> {data['output']}: {data['inserted']} BatchNormalization inserted, {how}")
        if cal is not None and mode == "normalize":
            click.echo("note: normalize mode standardises activations: the outputs change, on purpose")
        for r in data["records"]:
            if r["inserted"] and verbose:
                click.echo(f"  {r['detail']}")
            elif not r["inserted"]:
                click.echo(f"  skipped {r['host_op']} '{r['host']}': {r['reason']}: {r['detail']}")


@main.command(context_settings=CONTEXT)
@_help(momentum="Momentum of the running averages with --estimator momentum (Keras' default 0.99).",
       verbose="Also list each BN recalibrated (BNs left as they were are always listed).")
@click.argument("model", type=_Path(path_type=Path))
@click.option("--calibration", type=_Path(path_type=Path), required=True,
              help="Calibration data: .npz (one array per input, samples on axis 0) or a folder of .npz/.npy.")
@click.option("-o", "--output", type=_Path(dir_okay=False, path_type=Path),
              help="Where to write the model [default: <stem>.recalibrated.onnx beside MODEL].")
@calibration_options
@click.pass_context
@handle_errors
def recalibrate(ctx: click.Context, model: Path, calibration: Path, output: Optional[Path], batch_size, estimator,
                momentum, exact, as_json, quiet, verbose) -> None:
    """Re-estimate the running mean and variance of every inference BN from new data.

    Scale and bias stay (AdaBN-style domain adaptation; re-estimation after pruning or
    quantisation). By default in one pass in which every BN normalises with its batch
    statistics; --exact measures each BN with those upstream at their final statistics.
    BNs left alone are listed with a reason code.
    """
    from .insert import recalibrate as recalibrate_bn

    if estimator != "momentum" and _given(ctx, "momentum"):  # recalibrate writes no momentum attribute
        raise click.UsageError("--momentum applies only with --estimator momentum")
    data = _calibrated(model, output, "recalibrated", quiet, lambda progress: recalibrate_bn(
        model, calibration, batch_size=batch_size, estimator=estimator, momentum=momentum, exact=exact,
        progress=progress),
        calibration)
    _warn(data, quiet)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    elif not quiet:
        click.echo(f"{model} -> {data['output']}: {len(data['recalibrated'])} BatchNormalization recalibrated, "
                   f"{_calibration_line(data['calibration'])}")
        if verbose:
            for name in data["recalibrated"]:
                click.echo(f"  recalibrated '{name}'")
        for s in data["skipped"]:
            click.echo(f"  skipped '{s['node']}': {s['reason']}: {s['detail']}")


if __name__ == "__main__":  # pragma: no cover
    main()
