"""A small checker for the JUnit XML that Jenkins and GitLab read.

The rules below restate the Jenkins xUnit plugin's ``junit-10.xsd`` (the schema Jenkins
validates JUnit reports against; GitLab reads the same elements):
https://github.com/jenkinsci/xunit-plugin/blob/master/src/main/resources/org/jenkinsci/plugins/xunit/types/model/xsd/junit-10.xsd
(MIT License, Copyright (c) 2014 Gregory Boissinot). They are written out here rather
than the file vendored, and checked without a schema library (none is a bnfold
dependency): which elements may appear where, which attributes each allows and
requires, and the pattern of the ``time`` attributes.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Dict, FrozenSet, List, Tuple

# element -> (allowed children, allowed attributes, required attributes)
_OUTCOME = (frozenset(), frozenset({"type", "message"}), frozenset())
_RERUN = (frozenset({"stackTrace", "system-out", "system-err"}), frozenset({"type", "message"}), frozenset({"type"}))
RULES: Dict[str, Tuple[FrozenSet[str], FrozenSet[str], FrozenSet[str]]] = {
    "testsuites": (frozenset({"testsuite"}), frozenset({"name", "time", "tests", "failures", "errors"}), frozenset()),
    "testsuite": (frozenset({"testsuite", "properties", "testcase", "system-out", "system-err"}),
                  frozenset({"name", "tests", "failures", "errors", "group", "time", "skipped", "timestamp",
                             "hostname", "id", "package", "file", "log", "url"}),
                  frozenset({"name", "tests", "failures", "errors"})),
    "testcase": (frozenset({"skipped", "error", "failure", "rerunFailure", "rerunError", "flakyFailure",
                            "flakyError", "system-out", "system-err"}),
                 frozenset({"name", "time", "classname", "group"}), frozenset({"name"})),
    "failure": _OUTCOME, "error": _OUTCOME, "skipped": _OUTCOME,
    "properties": (frozenset({"property"}), frozenset(), frozenset()),
    "property": (frozenset(), frozenset({"name", "value"}), frozenset({"name", "value"})),
    "system-out": (frozenset(), frozenset(), frozenset()), "system-err": (frozenset(), frozenset(), frozenset()),
    "stackTrace": (frozenset(), frozenset(), frozenset()),
    "rerunFailure": _RERUN, "rerunError": _RERUN, "flakyFailure": _RERUN, "flakyError": _RERUN,
}
# SUREFIRE_TIME, on testsuites/@time and testsuite/@time
SUREFIRE_TIME = re.compile(r"(([0-9]{0,3},)*[0-9]{3}|[0-9]{0,3})*(\.[0-9]*)?")


def problems(xml_text: str) -> List[str]:
    """What in ``xml_text`` the schema rejects (empty when it is valid)."""
    root = ET.fromstring(xml_text)
    out: List[str] = []
    roots = {"testsuites", "testsuite"}  # the schema's global elements a report starts with
    if root.tag not in roots:
        out.append(f"root element <{root.tag}>")

    def walk(el: ET.Element, path: str) -> None:
        rule = RULES.get(el.tag)
        if rule is None:
            out.append(f"{path}: unknown element <{el.tag}>")
            return
        children, allowed, required = rule
        for a in el.attrib:
            if a not in allowed:
                out.append(f"{path}: attribute {a!r} not allowed on <{el.tag}>")
        for a in required - set(el.attrib):
            out.append(f"{path}: <{el.tag}> lacks required attribute {a!r}")
        timed = el.tag in ("testsuites", "testsuite") and "time" in el.attrib
        if timed and not SUREFIRE_TIME.fullmatch(el.get("time")):
            out.append(f"{path}: time {el.get('time')!r} does not match SUREFIRE_TIME")
        if el.tag == "testsuites" and any(c.tag != "testsuite" for c in el):
            out.append(f"{path}: <testsuites> holds only <testsuite>")
        for i, c in enumerate(el):
            if c.tag not in children:
                out.append(f"{path}/{c.tag}[{i}]: not allowed inside <{el.tag}>")
            else:
                walk(c, f"{path}/{c.tag}[{i}]")

    walk(root, root.tag)
    return out

