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
from .hosts import RULES

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
                text = f"{r['reason']}: {r['detail'].split(' kept: ', 1)[-1]}"
                status = _paint(f"{'kept':<6}", "yellow")
            scope = "" if r["graph"] == "main graph" else f"  [{r['graph']}]"
            lines.append(f"  {r['node']:<{w_node}}  {status}  {text}{scope}")
        hidden = len(records) - len(rows)
        if hidden:
            lines.append(f"  ... and {hidden} folded (use -v to list them)")
    return "\n".join(lines)


def _default_output(model: Path, tag: str = "fused") -> Path:
    stem = model.name[:-5] if model.name.endswith(".onnx") else model.name
    return model.with_name(f"{stem}.{tag}.onnx")


@click.group(context_settings=CONTEXT)
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


def render_verify(rep: dict, verbose: int = 0) -> str:
    """A verify report (``VerifyReport.to_dict``) as text (``verbose``: worst elements' values too)."""
    verdict = _paint("EQUIVALENT", "green") if rep["equivalent"] else _paint("NOT EQUIVALENT", "red")
    used = ", ".join(c["name"] for c in rep["comparisons"])
    lines = [f"verify: {rep['reference']} vs {rep['candidate']}: {verdict} "
             f"({rep['samples']} sample(s), seed {rep['seed']}; {used})"]
    for name, info in rep["inputs"].items():
        lines.append(f"  input {name}: {info['dtype']}{info['shape']} ({info['source']})")
    for note in rep["notes"]:
        lines.append(f"  note: {note}")
    head = ("comparison", "output", "max abs", "max rel", "mean abs", "cosine", "fail", "atol", "rtol", "worst at")
    rows = []
    for c in rep["comparisons"]:
        for o in c["outputs"]:
            if o["problem"]:
                rows.append((c["name"], o["name"], "FAIL: " + o["problem"], "", "", "", "", "", "", ""))
                continue
            worst = "" if o["worst"] is None else f"#{o['worst']['sample']}{o['worst']['index']}"
            rows.append((c["name"], o["name"], _g(o["max_abs_error"]), _g(o["max_rel_error"]),
                         _g(o["mean_abs_error"]), f"{o['cosine_similarity']:.6f}",
                         f"{o['fail_fraction']:.2%}" + ("" if o["equivalent"] else " FAIL"),
                         _g(o["atol"]), _g(o["rtol"]), worst))
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        lines.append("  " + "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
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
            res = loc["result"]
            lines.append(f"  first divergent tensor: '{loc['first_divergent']}' from {loc['producer']} "
                         f"(max abs {_g(res['max_abs_error'])}, {res['fail_fraction']:.2%} failing)")
        else:
            lines.append(f"  localize: none of {loc['checked']} shared intermediate tensors diverges; "
                         "the difference arises in the nodes producing the outputs")
    lines.append(f"  time: {rep['timing']['total_s']:.2f} s ({rep['timing']['inference_s']:.2f} s inference)")
    return "\n".join(lines)


def _collect(paths) -> list:
    """``(model, root)`` pairs: files as given (root None), folders searched for ``*.onnx``."""
    models = []
    for p in paths:
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.onnx") if not q.name.endswith(".fused.onnx"))
            if not found:
                raise BnfoldError("folder holds no *.onnx file", p)
            models.extend((q, p) for q in found)
        else:
            models.append((p, None))
    return models


def fuse_job(model: Path, target: Optional[Path], opts: dict) -> dict:
    """Fold one model file, verify it and write it, or with ``target`` None only check it.

    Returns plain data, so batch jobs can run in worker processes: ``exit_code``,
    ``error`` (one line or None), ``warnings`` and ``report`` (the fuse report with
    its verification).
    """
    import shutil
    import tempfile

    from .errors import MissingDependencyError
    from .fold import fuse as fuse_model

    out = {"model": str(model), "output": None, "exit_code": 0, "error": None, "warnings": [], "report": None}
    scratch = None
    try:
        if target is not None and not opts["in_place"] and _same_file(model, target):
            raise BnfoldError("output path is the input model; use --in-place to overwrite it", target)
        result = fuse_model(model, allow_overridable=opts["allow_overridable"], reparameterize=opts["reparameterize"])
        data = result.to_dict()
        data["output"] = data["verification"] = None
        out["report"] = data
        if target is None:  # check: the candidate lives in a private folder and goes away
            scratch = Path(tempfile.mkdtemp(prefix="bnfold-check-"))
        staging = target if target is not None else scratch / model.name
        with result.stage(staging, external_data=result.source_external_data or None) as staged:
            result.release_model()  # written: free it before ONNX Runtime loads both models
            report = None
            if opts["verify"] is not False and result.folded:
                try:
                    # the model was just loaded (and so checked), and the candidate written here
                    report = _run_verify(model, Path(staged.path), opts["verify_kwargs"], None, validated=True)
                    report.candidate = str(staging) if target is not None else f"{model} (folded in memory)"
                    data["verification"] = report.to_dict()
                except MissingDependencyError as e:
                    if opts["verify"]:
                        raise
                    out["warnings"].append(f"not verified: {e}")
                except BnfoldError as e:
                    raise BnfoldError(f"{e.message}; nothing written (--no-verify skips verification)",
                                      e.path) from None
            failed = report is not None and not report.equivalent
            if failed and not opts["force"]:
                out["exit_code"] = 1
                out["error"] = (f"{target}: not written: the folded model is not equivalent to {model} "
                                "(--force writes it anyway)" if target is not None else
                                f"{model}: folding it gives a model that is not equivalent")
                return out
            if target is not None:
                staged.commit()
                out["output"] = data["output"] = str(target)
            if failed:
                out["warnings"].append(f"{target} written with --force although verification failed")
    except BnfoldError as e:
        out["exit_code"], out["error"] = e.exit_code, str(e)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return out


def _run_jobs(jobs: list, opts: dict, n_jobs: int, quiet: bool) -> list:
    """``fuse_job`` over ``(model, target)`` pairs, in worker processes when ``n_jobs`` > 1;
    a progress bar on a terminal, a line per model otherwise (on stderr)."""
    if n_jobs > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=n_jobs)
        results = pool.map(fuse_job, [m for m, _ in jobs], [t for _, t in jobs], [opts] * len(jobs))
    else:
        pool = None
        results = (fuse_job(m, t, opts) for m, t in jobs)
    outcomes = []
    try:
        if sys.stderr.isatty() and not quiet:
            with click.progressbar(results, length=len(jobs), label="folding", file=sys.stderr) as bar:
                outcomes = list(bar)
        else:
            for o in results:
                outcomes.append(o)
                if not quiet:
                    click.echo(f"[{len(outcomes)}/{len(jobs)}] {o['model']}: "
                               f"{'ok' if o['exit_code'] == 0 else o['error']}", err=True)
    finally:
        if pool is not None:
            pool.shutdown()
    return outcomes


def render_summary(outcomes: list) -> str:
    """One line per model, then the totals and the exit code."""
    head = ("model", "BN", "result", "output / problem")
    rows = []
    for o in outcomes:
        rep = o["report"]
        bn = f"{rep['before']['bn_count']} -> {rep['after']['bn_count']}" if rep else ""
        verified = rep is not None and rep["verification"] is not None
        status = {0: "ok, verified" if verified else "ok", 1: "FAILED"}.get(o["exit_code"], "error")
        rows.append((o["model"], bn, status, o["output"] or o["error"] or ""))
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(3)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r[:3], widths)) + "  " + str(r[3]) for r in [head] + rows]
    worst = max((o["exit_code"] for o in outcomes), default=0)
    lines.append(f"{len(outcomes)} model(s): {sum(o['exit_code'] == 0 for o in outcomes)} ok, "
                 f"{sum(o['exit_code'] == 1 for o in outcomes)} failed verification or policy, "
                 f"{sum(o['exit_code'] not in (0, 1) for o in outcomes)} could not be processed; exit {worst}")
    return "\n".join(lines)


def _finish(outcomes: list, report_path, junit_path, as_json: bool, verbose: int, quiet: bool,
            single: bool) -> None:
    """Reports, rendering, annotations and the exit code (the worst of all outcomes)."""
    from .modelio import write_bytes_atomic

    # a model that could not be processed (exit 2) gets its one error line, no report
    reports = [o["report"] for o in outcomes if o["report"] and o["exit_code"] != 2]
    doc = (reports[0] if reports else None) if single else {"models": outcomes}
    if report_path is not None and doc is not None:
        write_bytes_atomic(report_path, (json.dumps(doc, indent=2) + "\n").encode())
    if junit_path is not None:
        from .verification import junit_xml

        write_bytes_atomic(junit_path, junit_xml([r["verification"] for r in reports if r["verification"]]).encode())
    if as_json and doc is not None:
        click.echo(json.dumps(doc, indent=2))
    elif not quiet and not as_json:
        if single:
            for rep in reports:
                click.echo(render_fuse(rep, verbose))
                if rep["verification"]:
                    click.echo(render_verify(rep["verification"], verbose))
        else:
            click.echo(render_summary(outcomes))
    github = os.environ.get("GITHUB_ACTIONS") == "true"
    for o in outcomes:
        for w in o["warnings"]:
            if not quiet:
                click.echo(f"bnfold: warning: {w}", err=True)
        if o["error"]:
            if single or quiet or as_json:
                click.echo(f"bnfold: error: {o['error']}", err=True)
            if github:
                click.echo(f"::error file={o['model']}::{o['error']}")
    worst = max((o["exit_code"] for o in outcomes), default=0)
    if worst:
        sys.exit(worst)


def _base_opts(allow_overridable: bool, reparameterize: bool, verify_opts: dict) -> dict:
    return {"in_place": False, "allow_overridable": allow_overridable, "reparameterize": reparameterize,
            "verify": None, "force": False, "verify_kwargs": _verify_kwargs(**verify_opts)}


@main.command(context_settings=CONTEXT)
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the folded model (one MODEL only) [default: <stem>.fused.onnx beside it].")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write each folded model here under its own name (a folder's layout is kept).")
@click.option("--in-place", is_flag=True, help="Overwrite each MODEL itself (atomically).")
@click.option("-j", "--jobs", type=click.IntRange(1), default=1, show_default=True,
              help="Models folded in parallel processes.")
@click.option("--verify/--no-verify", "do_verify", default=None,
              help="Check each result against its MODEL through ONNX Runtime before writing it "
                   "[default: on when ONNX Runtime is installed].")
@click.option("--force", is_flag=True, help="Write the output even when verification fails (and say so).")
@fold_options
@verify_options
@handle_errors
def fuse(models, output: Optional[Path], out_dir: Optional[Path], in_place: bool, jobs: int,
         do_verify: Optional[bool], force: bool, allow_overridable: bool, reparameterize: bool,
         report_path: Optional[Path], as_json: bool, verbose: int, quiet: bool, junit_path: Optional[Path],
         **verify_opts) -> None:
    """Fold inference-time BatchNormalization into neighbouring linear ops.

    Folds each BN into the Conv, ConvTranspose, Gemm or MatMul(+Add) before it (also
    through a channel Concat), or into an unpadded Conv or a Gemm after it, computing
    in float64 and rounding once. Every BN left in place is listed with a reason
    code. Each result is verified against its MODEL through ONNX Runtime and written
    only if it is equivalent (exit 1 otherwise). Inputs are never modified unless
    --in-place is given; outputs are written atomically.

    MODELS may be files or folders (searched for *.onnx). With several, one failure
    does not stop the rest, a summary table ends the run, and the exit code is the
    worst of them.
    """
    if sum(bool(x) for x in (output, out_dir, in_place)) > 1:
        raise click.UsageError("use only one of --output, --out-dir and --in-place")
    found = _collect(models)
    if output is not None and len(found) > 1:
        raise click.UsageError("--output takes one MODEL; use --out-dir for several")
    if out_dir is not None and not out_dir.is_dir():
        raise BnfoldError("output folder does not exist", out_dir)
    pairs = []
    for model, root in found:
        if in_place:
            target = model
        elif output is not None:
            target = output
        elif out_dir is not None:
            target = out_dir / (model.relative_to(root) if root is not None else Path(model.name))
            target.parent.mkdir(parents=True, exist_ok=True)
        else:
            target = _default_output(model)
        pairs.append((model, target))
    opts = _base_opts(allow_overridable, reparameterize, verify_opts)
    opts.update(in_place=in_place, verify=do_verify, force=force)
    single = len(models) == 1 and len(pairs) == 1 and not models[0].is_dir()
    outcomes = [fuse_job(*pairs[0], opts)] if single else _run_jobs(pairs, opts, jobs, quiet)
    _finish(outcomes, report_path, junit_path, as_json, verbose, quiet, single)


@main.command(context_settings=CONTEXT)
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--require-folded", is_flag=True,
              help="Fail a model that still has BatchNormalization fuse would fold (a deployment artifact "
                   "that was not preprocessed).")
@click.option("-j", "--jobs", type=click.IntRange(1), default=1, show_default=True,
              help="Models checked in parallel processes.")
@fold_options
@verify_options
@handle_errors
def check(models, require_folded: bool, jobs: int, allow_overridable: bool, reparameterize: bool,
          report_path: Optional[Path], as_json: bool, verbose: int, quiet: bool, junit_path: Optional[Path],
          **verify_opts) -> None:
    """The CI gate: fold each model in memory, verify the fold, apply the policy. Writes no model.

    Exit 0 when every model passes, 1 when one fails the policy or its fold does not
    verify, 2 when one cannot be used. Under GitHub Actions failures are also printed
    as ::error annotations.
    """
    pairs = [(m, None) for m, _ in _collect(models)]
    outcomes = _run_jobs(pairs, _base_opts(allow_overridable, reparameterize, verify_opts), jobs, True)
    for o in outcomes:
        rep = o["report"]
        if require_folded and o["exit_code"] == 0 and rep and rep["folded"]:
            o["exit_code"] = 1
            o["error"] = (f"{o['model']}: {rep['folded']} BatchNormalization can still be folded "
                          "(run bnfold fuse on it)")
    _finish(outcomes, report_path, junit_path, as_json, verbose, quiet, single=False)


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
@click.option("-v", "--verbose", count=True, help="Also show the values at each output's worst element.")
@verify_options
@handle_errors
def verify(reference: Path, candidate: Path, as_json: bool, quiet: bool, verbose: int, junit_path: Optional[Path],
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
        click.echo(render_verify(report.to_dict(), verbose))
    sys.exit(0 if report.equivalent else 1)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


@main.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@fold_options
@handle_errors
def inspect(model: Path, allow_overridable: bool, reparameterize: bool, report_path: Optional[Path], as_json: bool, verbose: int,
            quiet: bool) -> None:
    """Show which BNs fuse would fold and why the others stay; write no model."""
    from .fold import fuse as fuse_model

    data = fuse_model(model, allow_overridable=allow_overridable, reparameterize=reparameterize).to_dict()
    data["output"] = data["verification"] = None
    _finish([{"model": str(model), "output": None, "exit_code": 0, "error": None, "warnings": [], "report": data}],
            report_path, None, as_json, verbose, quiet, single=True)


def calibration_options(fn):
    opts = [
        click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True,
                     help="Samples per calibration batch (m/(m-1) uses the values per channel of one batch)."),
        click.option("--estimator", type=click.Choice(["population", "momentum"]), default="population",
                     show_default=True, help="population: the BN paper's inference statistics; momentum: the "
                                             "running averages frameworks keep in training."),
        click.option("--momentum", type=click.FloatRange(0, 1), default=0.99, show_default=True,
                     help="Momentum of the running averages (Keras' default 0.99); also written into new BNs."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
        click.option("-q", "--quiet", is_flag=True, help="Print only errors."),
        click.option("-v", "--verbose", count=True, help="List skipped ops too."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _calibrated(model: Path, output: Optional[Path], tag: str, quiet: bool, run) -> dict:
    """Shared by insert and recalibrate: pick the output, show a progress bar on a terminal
    while ``run(progress)`` measures, write the model atomically, return the report."""
    from .modelio import stage_model

    target = output or _default_output(model, tag)
    if _same_file(model, target):
        raise BnfoldError("output path is the input model", target)
    if quiet or not sys.stderr.isatty():
        result = run(None)
    else:
        with click.progressbar(length=None, label="calibrating", file=sys.stderr, show_pos=True) as bar:
            result = run(bar.update)
    stage_model(result.model, target).commit()
    data = result.to_dict()
    data["source"], data["output"] = str(model), str(target)
    return data


def _calibration_line(cal: dict) -> str:
    return (f"{cal['estimator']} statistics from {cal['samples']} samples in {cal['batches']} batches, "
            f"{cal['passes']} pass(es)")


@main.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the model [default: <stem>.bn.onnx beside MODEL].")
@click.option("--op", "ops", multiple=True,
              help=f"Op types to follow with a BN (repeatable) [default: {', '.join(RULES)}].")
@click.option("--node", help="Only ops whose name (or output) matches this regular expression.")
@click.option("--exclude", help="Skip ops whose name (or output) matches this regular expression.")
@click.option("--position", type=click.Choice(["pre-activation", "post-activation"]), default="pre-activation",
              show_default=True, help="Directly after the op (the BN paper), or after its activation.")
@click.option("--calibration", type=click.Path(path_type=Path),
              help="Calibration data: .npz (one array per input, samples on axis 0) or a folder of .npz/.npy.")
@click.option("--mode", type=click.Choice(["preserve", "normalize"]), default="preserve", show_default=True,
              help="With data: preserve keeps the function (scale=sqrt(var+eps), bias=mean); normalize "
                   "standardises activations (scale=1, bias=0), changing outputs on purpose.")
@click.option("--epsilon", type=float, default=1e-5, show_default=True, help="BN epsilon attribute.")
@calibration_options
@handle_errors
def insert(model: Path, output: Optional[Path], ops, node, exclude, position, calibration, mode, epsilon, batch_size,
           estimator, momentum, as_json, quiet, verbose) -> None:
    """Add BatchNormalization after chosen ops of a trained model.

    Without --calibration each BN is exactly the identity in the model's dtype. With
    it, the BNs carry statistics measured on the data through ONNX Runtime, in
    batches, accumulated in float64 without holding the activations.
    """
    from .insert import DEFAULT_OPS, insert as insert_bn

    data = _calibrated(model, output, "bn", quiet, lambda progress: insert_bn(
        model, ops=ops or DEFAULT_OPS, node=node, exclude=exclude, position=position, calibration=calibration,
        batch_size=batch_size, estimator=estimator, momentum=momentum, mode=mode, epsilon=epsilon,
        progress=progress))
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
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calibration", type=click.Path(path_type=Path), required=True,
              help="Calibration data: .npz (one array per input, samples on axis 0) or a folder of .npz/.npy.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the model [default: <stem>.recalibrated.onnx beside MODEL].")
@calibration_options
@handle_errors
def recalibrate(model: Path, calibration: Path, output: Optional[Path], batch_size, estimator, momentum, as_json,
                quiet, verbose) -> None:
    """Re-estimate the running mean and variance of every inference BN from new data.

    Scale and bias stay. Each BN is measured on its input in the model as calibrated
    so far (AdaBN-style domain adaptation; re-estimation after pruning or quantisation).
    """
    from .insert import recalibrate as recalibrate_bn

    data = _calibrated(model, output, "recalibrated", quiet, lambda progress: recalibrate_bn(
        model, calibration, batch_size=batch_size, estimator=estimator, momentum=momentum, progress=progress))
    if as_json:
        click.echo(json.dumps(data, indent=2))
    elif not quiet:
        click.echo(f"{model} -> {data['output']}: {len(data['recalibrated'])} BatchNormalization recalibrated, "
                   f"{_calibration_line(data['calibration'])}")
        for s in data["skipped"]:
            click.echo(f"  skipped '{s['node']}': {s['why']}")


if __name__ == "__main__":  # pragma: no cover
    main()
