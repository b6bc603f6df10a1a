"""The ``bnfold`` command line: a thin layer that parses options, calls the library
and renders its results. The only module that imports click or prints.

Exit codes: 0 success, 1 verification failed (nothing written), 2 bad usage or
unusable input (one line on stderr naming the file and the problem).
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import click

from . import __version__
from .errors import BnfoldError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"bnfold: error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn):
    """Turn BnfoldError into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BnfoldError as e:
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 130)

    return wrapper


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_fuse(result, output: Optional[str], verbose: int) -> str:
    """The fold summary and the per-BN table, as text."""
    b, a = result.before, result.after
    lines = []
    if output:
        lines.append(f"{result.source} -> {output}")
    lines.append(f"BatchNormalization {b.bn_count} -> {a.bn_count}   nodes {b.node_count} -> {a.node_count}   "
                 f"weights {_human_size(b.weight_bytes)} -> {_human_size(a.weight_bytes)}")
    if result.merges:
        lines.append(f"reparameterized {len(result.merges)} multi-branch block(s) into single Convs")
    rows = [r for r in result.records if verbose > 0 or not r.folded or len(result.records) <= 40]
    if rows:
        w_node = max(len("BatchNormalization"), *(len(r.node) for r in rows))
        lines.append(f"  {'BatchNormalization':<{w_node}}  {'result':<6}  into / reason")
        for r in rows:
            if r.folded:
                where = {"into_preceding": "before", "into_following": "after"}.get(r.direction, "merged")
                text = f"{r.host_op} '{r.host}' ({where})"
                status = "folded"
            else:
                text = f"{r.reason.value}: {r.detail.split(' kept: ', 1)[-1]}"
                status = "kept"
            scope = "" if r.graph == "main graph" else f"  [{r.graph}]"
            lines.append(f"  {r.node:<{w_node}}  {status:<6}  {text}{scope}")
        hidden = len(result.records) - len(rows)
        if hidden:
            lines.append(f"  ... and {hidden} folded (use -v to list them)")
    return "\n".join(lines)


def _default_output(model: Path) -> Path:
    stem = model.name[:-5] if model.name.endswith(".onnx") else model.name
    return model.with_name(f"{stem}.fused.onnx")


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="bnfold")
def main() -> None:
    """Fold, insert and verify BatchNormalization layers in ONNX models.

    \b
    bnfold fuse model.onnx          fold BNs into neighbouring Conv/Gemm/MatMul weights
    bnfold inspect model.onnx       show what fuse would do, write nothing
    bnfold verify ref.onnx new.onnx compare two models through ONNX Runtime

    Exit codes: 0 success, 1 verification failed, 2 bad usage or unusable input.
    """


def fold_options(fn):
    fn = click.option("--reparameterize", is_flag=True,
                      help="After folding, merge sums of parallel linear branches on one input (RepVGG, "
                           "MobileOne, ACNet blocks) into single Convs, where exact.")(fn)
    fn = click.option("--allow-overridable", is_flag=True,
                      help="Treat initializers that are also graph inputs (IR >= 4) as constants, as most "
                           "exporters intend; by default such BNs are kept (reason OVERRIDABLE_PARAMETER).")(fn)
    fn = click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
                      help="Write the per-BN report as JSON to this file.")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout instead of a table.")(fn)
    fn = click.option("-v", "--verbose", count=True, help="List every BN, folded ones included.")(fn)
    fn = click.option("-q", "--quiet", is_flag=True, help="Print only errors.")(fn)
    return fn


def verify_options(fn):
    """Options shared by ``verify`` and ``fuse`` (which verifies by default)."""
    opts = [
        click.option("--providers", default="auto", show_default=True,
                     help="auto (CPU, plus CUDA when it really works), cpu, cuda, or cpu,cuda."),
        click.option("--samples", type=click.IntRange(1), default=2, show_default=True,
                     help="Random input sets to compare on."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for the random inputs."),
        click.option("--dim", "dims", multiple=True, metavar="NAME=VALUE",
                     help="Value of a symbolic dimension (repeatable). Unnamed dynamic dims default to "
                          "2 for axis 0 and 32 elsewhere."),
        click.option("--shape", "shapes", multiple=True, metavar="INPUT=1x3x224x224",
                     help="Whole shape of one input (repeatable)."),
        click.option("--inputs", "inputs_path", type=click.Path(path_type=Path),
                     help="Real inputs: .npz with one array per input name, or .npy for a single-input model."),
        click.option("--rtol", type=float, help="Relative tolerance [default: by dtype, float32 1e-3]."),
        click.option("--atol", type=float,
                     help="Absolute tolerance [default: by dtype, float32 1e-4 x max|reference output|]."),
        click.option("--output-tol", "output_tols", multiple=True, metavar="OUTPUT=RTOL:ATOL",
                     help="Tolerances for one output (either part may be empty; repeatable)."),
        click.option("--localize", is_flag=True,
                     help="On a difference, name the first intermediate tensor (same name in both) that diverges."),
        click.option("--junit", "junit_path", type=click.Path(dir_okay=False, path_type=Path),
                     help="Write the verification as JUnit XML (one test case per output and provider)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _verify_kwargs(providers, samples, seed, dims, shapes, inputs_path, rtol, atol, output_tols, localize) -> dict:
    from .inputs import parse_assignments, parse_shape

    def parse_tol(text: str) -> tuple:  # (rtol, atol); verify() makes the Tolerance
        r, _, a = text.partition(":")
        return float(r) if r else None, float(a) if a else None

    return dict(providers=providers, samples=samples, seed=seed,
                dims=parse_assignments(dims, "--dim", int), shapes=parse_assignments(shapes, "--shape", parse_shape),
                inputs=inputs_path, rtol=rtol, atol=atol,
                output_tolerances=parse_assignments(output_tols, "--output-tol", parse_tol), localize=localize)


def _g(x: float) -> str:
    return f"{x:.3g}"


def render_verify(report) -> str:
    verdict = "EQUIVALENT" if report.equivalent else "NOT EQUIVALENT"
    used = ", ".join(c.name for c in report.comparisons)
    lines = [f"verify: {report.reference} vs {report.candidate}: {verdict} "
             f"({report.samples} sample(s), seed {report.seed}; {used})"]
    for name, info in report.inputs.items():
        lines.append(f"  input {name}: {info['dtype']}{info['shape']} ({info['source']})")
    for note in report.notes:
        lines.append(f"  note: {note}")
    head = ("comparison", "output", "max abs", "max rel", "mean abs", "cosine", "fail", "atol", "rtol", "worst at")
    rows = []
    for c in report.comparisons:
        for o in c.outputs:
            if o.problem:
                rows.append((c.name, o.name, "FAIL: " + o.problem, "", "", "", "", "", "", ""))
                continue
            worst = "" if o.worst is None else f"#{o.worst['sample']}{o.worst['index']}"
            rows.append((c.name, o.name, _g(o.max_abs_error), _g(o.max_rel_error), _g(o.mean_abs_error),
                         f"{o.cosine_similarity:.6f}", f"{o.fail_fraction:.2%}" + ("" if o.equivalent else " FAIL"),
                         _g(o.atol), _g(o.rtol), worst))
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        lines.append("  " + "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    for s in report.skipped:
        lines.append(f"  skipped {s['name']}: {s['why']}")
    loc = report.localized
    if loc:
        if loc["first_divergent"]:
            res = loc["result"]
            lines.append(f"  first divergent tensor: '{loc['first_divergent']}' from {loc['producer']} "
                         f"(max abs {_g(res['max_abs_error'])}, {res['fail_fraction']:.2%} failing)")
        else:
            lines.append(f"  localize: none of {loc['checked']} shared intermediate tensors diverges; "
                         "the difference arises in the nodes producing the outputs")
    lines.append(f"  time: {report.timing['total_s']:.2f} s ({report.timing['inference_s']:.2f} s inference)")
    return "\n".join(lines)


@main.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the folded model [default: <stem>.fused.onnx beside MODEL].")
@click.option("--in-place", is_flag=True, help="Overwrite MODEL itself (atomically).")
@click.option("--verify/--no-verify", "do_verify", default=None,
              help="Check the result against MODEL through ONNX Runtime before writing it "
                   "[default: on when ONNX Runtime is installed].")
@click.option("--force", is_flag=True, help="Write the output even when verification fails (and say so).")
@fold_options
@verify_options
@handle_errors
def fuse(model: Path, output: Optional[Path], in_place: bool, do_verify: Optional[bool], force: bool,
         allow_overridable: bool, reparameterize: bool, report_path: Optional[Path], as_json: bool, verbose: int, quiet: bool,
         junit_path: Optional[Path], **verify_opts) -> None:
    """Fold inference-time BatchNormalization into neighbouring linear ops.

    Folds each BN into the Conv, ConvTranspose, Gemm or MatMul(+Add) before it, or
    into an unpadded Conv or a Gemm after it, computing in float64 and rounding once.
    Every BN left in place is listed with a reason code. The result is verified
    against MODEL through ONNX Runtime and written only if it is equivalent (exit 1
    otherwise). The input is never modified unless --in-place is given; the output
    is written atomically.
    """
    from .errors import MissingDependencyError
    from .fold import fuse as fuse_model

    if in_place and output is not None:
        raise click.UsageError("--in-place and --output are mutually exclusive")
    target = model if in_place else (output or _default_output(model))
    if not in_place and _same_file(model, target):
        raise BnfoldError("output path is the input model; use --in-place to overwrite it", target)
    kwargs = _verify_kwargs(**verify_opts)
    result = fuse_model(model, allow_overridable=allow_overridable, reparameterize=reparameterize)
    report = None
    with result.stage(target, external_data=result.source_external_data or None) as staged:
        result.release_model()  # written: free it before ONNX Runtime loads both models
        if do_verify is not False and result.folded:
            try:
                # fuse has just loaded (and so checked) MODEL, and wrote the candidate itself
                report = _run_verify(model, Path(staged.path), kwargs, junit_path, validated=True)
                report.candidate = str(target)
            except MissingDependencyError as e:
                if do_verify:
                    raise
                if not quiet:
                    click.echo(f"bnfold: warning: not verified: {e}", err=True)
            except BnfoldError as e:
                raise BnfoldError(f"{e.message}; nothing written (--no-verify skips verification)", e.path) from None
        failed = report is not None and not report.equivalent
        if failed and not force:
            _emit(result, None, report_path, as_json, verbose, quiet, report)
            _fail(f"{target}: not written: the folded model is not equivalent to {model} "
                  "(--force writes it anyway)", 1)
        staged.commit()
    _emit(result, str(target), report_path, as_json, verbose, quiet, report)
    if failed:
        click.echo(f"bnfold: warning: {target} written with --force although verification failed", err=True)


def _run_verify(reference: Path, candidate: Path, kwargs: dict, junit_path: Optional[Path], validated=False):
    from .modelio import write_bytes_atomic
    from .verification import verify

    report = verify(reference, candidate, validated=validated, **kwargs)
    if junit_path is not None:
        write_bytes_atomic(junit_path, report.to_junit().encode())
    return report


@main.command(context_settings=CONTEXT)
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (schema in the README).")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors; the exit code tells the verdict.")
@verify_options
@handle_errors
def verify(reference: Path, candidate: Path, as_json: bool, quiet: bool, junit_path: Optional[Path],
           **verify_opts) -> None:
    """Check that CANDIDATE computes what REFERENCE computes.

    Runs both through ONNX Runtime (graph optimisations off; CUDA with TF32 off)
    on the same seeded inputs and compares every output. An element fails when it
    exceeds both --atol and --rtol x |reference|. Exit 0 equivalent, 1 not
    equivalent, 2 could not run.
    """
    report = _run_verify(reference, candidate, _verify_kwargs(**verify_opts), junit_path)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif not quiet:
        click.echo(render_verify(report))
    sys.exit(0 if report.equivalent else 1)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _emit(result, output: Optional[str], report_path: Optional[Path], as_json: bool, verbose: int, quiet: bool,
          verification=None):
    data = result.to_dict()
    data["output"] = output
    data["verification"] = None if verification is None else verification.to_dict()
    if report_path is not None:
        from .modelio import write_bytes_atomic

        write_bytes_atomic(report_path, (json.dumps(data, indent=2) + "\n").encode())
    if as_json:
        click.echo(json.dumps(data, indent=2))
    elif not quiet:
        click.echo(render_fuse(result, output, verbose))
        if verification is not None:
            click.echo(render_verify(verification))


@main.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@fold_options
@handle_errors
def inspect(model: Path, allow_overridable: bool, reparameterize: bool, report_path: Optional[Path], as_json: bool, verbose: int,
            quiet: bool) -> None:
    """Show which BNs fuse would fold and why the others stay; write no model."""
    from .fold import fuse as fuse_model

    result = fuse_model(model, allow_overridable=allow_overridable, reparameterize=reparameterize)
    _emit(result, None, report_path, as_json, verbose, quiet)


if __name__ == "__main__":  # pragma: no cover
    main()
