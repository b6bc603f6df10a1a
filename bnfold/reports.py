"""Reports for CI: JUnit XML and the GitHub Actions step summary (Markdown).

Both are built from plain data (outcome dicts as :meth:`bnfold.workflow.FuseOutcome.to_dict`
gives them, verify reports as ``VerifyReport.to_dict``), so they render the same whether
a model ran here or in a worker process.

JUnit layout (what Jenkins' and GitLab's JUnit readers expect, see
``tests/junit_schema.py``): one ``<testsuite>`` per run; per model, ``classname`` = the
model's path, so CI tools keep models apart:

- a case named after the command (``fuse``, ``check``) carrying the model's outcome:
  ``<failure>`` for a fold that does not verify or a failed policy, ``<error>`` for an
  unusable model or an internal error, ``<skipped>`` when interrupted;
- where the model was verified, one case per comparison and output (``cpu:logits``),
  ``<failure>`` when not equivalent, and a ``<skipped>`` case per skipped provider.

Counts (tests, failures, errors, skipped) and times are on the suite and the root.
"""
from __future__ import annotations

import socket
import time
from typing import Iterable, List, Optional, Sequence, Tuple
from xml.sax.saxutils import escape, quoteattr

_FAILURE = {"not_equivalent", "forced", "policy_failed"}
_ERROR = {"unusable", "internal_error"}


def _secs(t: Optional[float]) -> str:
    return f"{max(t or 0.0, 0.0):.3f}"


class _Case:
    def __init__(self, classname: str, name: str, time_s: float = 0.0) -> None:
        self.classname, self.name, self.time_s = classname, name, time_s
        self.kind: Optional[str] = None  # failure | error | skipped
        self.type = ""
        self.message = ""
        self.text = ""

    def mark(self, kind: str, type_: str, message: str, text: str = "") -> "_Case":
        self.kind, self.type, self.message, self.text = kind, type_, message, text
        return self

    def xml(self) -> str:
        head = (f"    <testcase classname={quoteattr(self.classname)} name={quoteattr(self.name)} "
                f"time=\"{_secs(self.time_s)}\"")
        if self.kind is None:  # a passing case may still say how it passed (the verify figures)
            return head + (f"><system-out>{escape(self.text)}</system-out></testcase>" if self.text else "/>")
        body = escape(self.text)
        if self.kind == "skipped":
            return head + f"><skipped message={quoteattr(self.message)}/></testcase>"
        return (head + f"><{self.kind} type={quoteattr(self.type)} message={quoteattr(self.message)}>{body}"
                       f"</{self.kind}></testcase>")


def _output_message(o: dict) -> str:
    if o.get("problem"):
        return o["problem"]
    floor = o.get("floor")
    return (f"{o.get('method', 'fixed')} verdict: max abs error {o.get('max_abs_error', 0.0):.3g} "
            f"(atol {o.get('atol', 0.0):.3g}), max rel error {o.get('max_rel_error', 0.0):.3g} "
            f"(rtol {o.get('rtol', 0.0):.3g}), measured floor {'none' if floor is None else f'{floor:.3g}'}, "
            f"limit {o.get('limit', 0.0):.3g}, uses {o.get('used', 0.0):.3g} of it, "
            f"{o.get('fail_fraction', 0.0):.3%} of elements fail")


def _exact_case(classname: str, ex: dict, time_s: float) -> List["_Case"]:
    """The float64 pass as one case per output (``float64:<output>``), when it ran."""
    cases = []
    for o in ex.get("outputs", []):
        case = _Case(classname, f"float64:{o['name']}", time_s)
        message = o.get("problem") or (
            f"calibrated verdict: float64 deviation {o['deviation']:.3g}, measured floor {o['allowance']:.3g}, "
            f"limit {o['limit']:.3g}, uses {o['used']:.3g} of it")
        case.text = message
        if not o.get("equivalent", False):
            case.mark("failure", "NotEquivalent", message)
        cases.append(case)
    return cases


def _verify_cases(classname: str, rep: dict) -> List[_Case]:
    outputs = [(c, o) for c in rep.get("comparisons", []) for o in c.get("outputs", [])]
    total = (rep.get("timing") or {}).get("total_s", 0.0)
    share = total / max(len(outputs), 1)
    cases = []
    ex = rep.get("exact")
    if ex and ex.get("ran"):
        cases.extend(_exact_case(classname, ex, 0.0))
    for comp, o in outputs:
        case = _Case(classname, f"{comp['name']}:{o['name']}", share)
        if not o.get("equivalent", False):
            case.mark("failure", "NotEquivalent", _output_message(o))
        else:
            case.text = _output_message(o)
        cases.append(case)
    for sk in rep.get("skipped", []):
        cases.append(_Case(classname, sk["name"]).mark("skipped", "", sk.get("why", "")))
    return cases


def _document(name: str, cases: Sequence[_Case], time_s: float) -> str:
    n = {k: sum(c.kind == k for c in cases) for k in ("failure", "error", "skipped")}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    counts = f"tests=\"{len(cases)}\" failures=\"{n['failure']}\" errors=\"{n['error']}\""
    # the root takes no skipped count in Jenkins' schema; the suite does
    return ("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n"
            f"<testsuites name={quoteattr(name)} {counts} time=\"{_secs(time_s)}\">\n"
            f"  <testsuite name={quoteattr(name)} {counts} skipped=\"{n['skipped']}\" time=\"{_secs(time_s)}\" "
            f"timestamp=\"{stamp}\" hostname={quoteattr(socket.gethostname())}>\n"
            + "".join(c.xml() + "\n" for c in cases)
            + "  </testsuite>\n</testsuites>\n")


def junit_for_outcomes(command: str, outcomes: Iterable[dict], time_s: float = 0.0) -> str:
    """JUnit XML for ``fuse``/``check`` outcomes (``FuseOutcome.to_dict``): every model present,
    whatever happened to it."""
    cases: List[_Case] = []
    for o in outcomes:
        model = o["model"]
        rep = o.get("report") or {}
        ver = rep.get("verification")
        case = _Case(model, command, o.get("time_s", 0.0))
        status = o.get("status")
        message = o.get("error") or ""
        if o.get("hint"):
            message += f" ({o['hint']})"
        if status in _FAILURE:
            case.mark("failure", "PolicyFailed" if status == "policy_failed" else "NotEquivalent", message)
        elif status in _ERROR:
            case.mark("error", "InternalError" if status == "internal_error" else "UnusableInput", message)
        elif status == "interrupted":
            case.mark("skipped", "", message or "interrupted")
        cases.append(case)
        if ver:
            cases.extend(_verify_cases(model, ver))
    return _document(f"bnfold {command}", cases, time_s)


def junit_for_verify(report: Optional[dict], *, candidate: str, error: Optional[Tuple[str, str]] = None) -> str:
    """JUnit XML for ``verify``: one case per comparison and output (classname: the candidate's
    path); when it could not run, one ``<error>`` case (``error`` = (type, message)), or ``<skipped>``
    when it was interrupted (type ``Interrupted``), as fuse and check mark an interrupted model."""
    if report is not None:
        cases = _verify_cases(candidate, report)
        time_s = (report.get("timing") or {}).get("total_s", 0.0)
    else:
        kind, message = error or ("Error", "could not run")
        case = _Case(candidate, "verify")
        cases = [case.mark("skipped", "", message) if kind == "Interrupted" else case.mark("error", kind, message)]
        time_s = 0.0
    return _document("bnfold verify", cases, time_s)


# -- GitHub Actions ------------------------------------------------------------------------

def _margin(ver: Optional[dict]) -> str:
    """The largest fraction of its limit any output uses (float64 pass and runtime comparisons)."""
    if not ver:
        return ""
    used = [o.get("used") for c in ver.get("comparisons", []) for o in c.get("outputs", [])]
    used += [o.get("used") for o in ((ver.get("exact") or {}).get("outputs") or [])]
    used = [u for u in used if isinstance(u, (int, float))]
    return f"uses {max(used):.0%} of the limit" if used else ""


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def github_summary(command: str, outcomes: Iterable[dict]) -> str:
    """A Markdown table (model, BN before -> after, verdict, margin) for ``$GITHUB_STEP_SUMMARY``."""
    lines = [f"### bnfold {command}", "", "| model | BN before -> after | verdict | margin |",
             "|---|---|---|---|"]
    for o in outcomes:
        rep = o.get("report") or {}
        bn = (f"{rep['before']['bn_count']} -> {rep['after']['bn_count']}"
              if rep.get("before") and rep.get("after") else "")
        ver = rep.get("verification")
        verdict = o.get("status", "")
        if ver is not None and o.get("status") in ("written", "passed"):
            verdict += ", equivalent"
        elif o.get("error") and o.get("status") not in ("written", "passed"):
            error = o["error"]
            verdict += ": " + (error[len(o["model"]) + 2:] if error.startswith(o["model"] + ": ") else error)
        lines.append(f"| {_cell(o['model'])} | {bn} | {_cell(verdict)} | {_margin(ver)} |")
    return "\n".join(lines) + "\n\n"
