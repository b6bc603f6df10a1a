"""Are bnfold's verdicts right? Correct folds written, planted bugs refused, on a real corpus.

    python benchmarks/verdicts.py [--corpus /work/corpus] [--bnfold PATH] [--ref REV]
                                  [--seeds 5] [--jobs 2] [--subset N | --only ARCH ...]

Needs the corpus from benchmarks/export_models.py (its manifest.json) and an
interpreter with onnx, onnxruntime, numpy and click (the benchmark environment).

1. **False alarms.** For every corpus model and seeds 0..N-1, one fresh process runs
   ``python -m bnfold fuse MODEL -o OUT --json --seed S`` with bnfold's default
   verification, plus ``--reparameterize`` as an extra run for re-parameterisable
   architectures (RepVGG, MobileOne, RepGhost). bnfold's fold is assumed correct
   (the plants below are what an incorrect one looks like), so every refusal is
   counted as a false alarm and listed with its figures.
2. **Margins.** From bnfold's JSON report: the float64 pass's fraction of its allowance
   used (``exact.outputs[].used``) and the runtime comparison's max abs error over
   its atol; worst over seeds and outputs.
3. **Cost.** bnfold's own verification time (``verification.timing.total_s``) against
   the bare ONNX Runtime runs that verification needs, measured here in a separate
   process: both models' sessions (CPU, optimisations off, 1 intra-op thread like
   bnfold's worker) plus their runs on the same inputs (``--samples`` sets).
4. **Detections.** Into the FOLDED model of a few networks (``--plant``), independent
   numpy code on the protobuf (the original BN's parameters, the folded host's
   weight and bias; none of bnfold's fold code) plants each of: the mean dropped,
   the variance used without its square root, two output channels swapped, the
   shift added twice, and (float32 and float16, float16 informational) one output
   channel's weights scaled by 1.01. ``bnfold verify ORIGINAL PLANTED --json``
   must refuse each; the factor is the float64 pass's ``used`` (deviation over
   limit; > 1 refuses). The unplanted fold is verified the same way as a control.

``--bnfold PATH`` selects the bnfold source tree under test: its ``bnfold/`` folder
is copied to a temporary snapshot (or, with ``--ref REV``, ``git archive REV`` of
that checkout) and put on PYTHONPATH, so the tree cannot change under a run.
Writes ``--md`` (default benchmarks/VERDICTS.md) and ``--json`` (default
benchmarks/work/verdicts.json).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPARAM_PREFIXES = ("repvgg", "mobileone", "repghost")
PLANT_DEFAULT = ("resnet18", "mobilenetv2_100", "efficientnet_b0")
BUGS = ("mean_dropped", "var_no_sqrt", "channels_swapped", "shift_twice", "weight_1pct")
BUG_TEXT = {"mean_dropped": "mean dropped", "var_no_sqrt": "variance without its square root",
            "channels_swapped": "two output channels swapped", "shift_twice": "shift added twice",
            "weight_1pct": "one channel's weights x1.01"}


# ----------------------------------------------------------------------------- snapshot

def snapshot(tree: Path, ref: str | None, dest: Path) -> str:
    """Copy bnfold/ from TREE (working files, or git REV) into DEST; return a description."""
    dest.mkdir(parents=True)
    if ref:
        arch = subprocess.run(["git", "-C", str(tree), "archive", ref, "bnfold"], check=True,
                              capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=arch, check=True)
        rev = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", ref], capture_output=True,
                             text=True).stdout.strip()
        return f"{tree} at {ref} ({rev})"
    shutil.copytree(tree / "bnfold", dest / "bnfold", ignore=shutil.ignore_patterns("__pycache__"))
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "bnfold"], capture_output=True,
                           text=True).stdout.strip()
    return f"{tree} working tree (HEAD {head or '?'}{', bnfold/ modified' if dirty else ''})"


def tree_hash(root: Path) -> str:
    """Content hash of a snapshot's .py files: the cache key for 'the same bnfold'."""
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- running bnfold

class Runner:
    def __init__(self, python: str, pythonpath: Path, timeout: int, verify_args: Sequence[str] = ()):
        self.python, self.timeout, self.verify_args = python, timeout, list(verify_args)
        self.env = dict(os.environ, PYTHONPATH=str(pythonpath), OMP_NUM_THREADS="1")
        # run from the snapshot: `python -m` puts the working folder first on sys.path, so started
        # from a checkout it would import that checkout's bnfold, not the snapshot under test
        self.cwd = str(pythonpath)
        found = subprocess.run([python, "-c", "import bnfold; print(bnfold.__file__)"], capture_output=True,
                               text=True, env=self.env, cwd=self.cwd).stdout.strip()
        if not Path(found).resolve().is_relative_to(Path(pythonpath).resolve()):
            raise SystemExit(f"{python} imports bnfold from {found or 'nowhere'}, not from the snapshot "
                             f"{pythonpath}: uninstall the editable bnfold from that environment")

    def bnfold(self, *args: str) -> dict:
        """Run ``python -m bnfold ARGS --json``; return rc, wall, the parsed JSON (or None), stderr tail."""
        t = time.perf_counter()
        try:
            p = subprocess.run([self.python, "-m", "bnfold", *args, "--json"], capture_output=True, text=True,
                               env=self.env, cwd=self.cwd, timeout=self.timeout)
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired:
            rc, out, err = "timeout", "", f"timed out after {self.timeout} s"
        wall = time.perf_counter() - t
        try:
            data = json.loads(out) if out.strip() else None
        except json.JSONDecodeError:
            data = None
        return {"rc": rc, "wall_s": round(wall, 3), "data": data,
                "stderr": "\n".join(err.strip().splitlines()[-3:])[:600]}

    def bare(self, ref: Path, cand: Path, inputs: dict, samples: int) -> dict:
        t = time.perf_counter()
        p = subprocess.run([self.python, __file__, "--_bare", str(ref), str(cand), json.dumps(inputs),
                            str(samples)], capture_output=True, text=True, env=self.env, cwd=self.cwd,
                           timeout=self.timeout)
        if p.returncode != 0:
            return {"error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:300]}
        d = json.loads(p.stdout)
        d["process_wall_s"] = round(time.perf_counter() - t, 3)
        return d


def bare_ort(ref: str, cand: str, inputs: dict, samples: int) -> dict:
    """The ONNX Runtime work verification needs, nothing else: both sessions, every sample run."""
    import numpy as np
    import onnxruntime as ort

    t0 = time.perf_counter()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]) for p in (ref, cand)]
    t1 = time.perf_counter()
    feeds = [{k: np.random.default_rng(s).standard_normal(v["shape"]).astype(v["dtype"])
              for k, v in inputs.items()} for s in range(samples)]
    t2 = time.perf_counter()
    for sess in sessions:
        for f in feeds:
            sess.run(None, f)
    t3 = time.perf_counter()
    return {"sessions_s": round(t1 - t0, 4), "runs_s": round(t3 - t2, 4), "bare_s": round(t1 - t0 + t3 - t2, 4)}


# ----------------------------------------------------------------------------- reading reports

def summarise_verification(v: dict | None) -> dict:
    """The figures this harness tabulates from bnfold's verification JSON."""
    if not v:
        return {}
    exact = v.get("exact") or {}
    used = [o.get("used") for o in exact.get("outputs") or [] if o.get("used") is not None]
    runtime = []
    fails = []
    for c in v.get("comparisons") or []:
        for o in c.get("outputs") or []:
            if o.get("atol"):
                runtime.append((o.get("max_abs_error") or 0.0) / o["atol"])
            fails.append(o.get("fail_fraction") or 0.0)
    dirs = sorted({o.get("direction") for o in exact.get("outputs") or [] if o.get("direction")})
    t = v.get("timing") or {}
    return {"equivalent": v.get("equivalent"), "method": v.get("method"), "exact_ran": exact.get("ran"),
            "exact_equivalent": exact.get("equivalent"), "exact_why": exact.get("why"),
            "used": max(used) if used else None, "runtime_used": max(runtime) if runtime else None,
            "fail_fraction": max(fails) if fails else None, "direction": ",".join(dirs) or None,
            "verify_s": t.get("total_s"), "inference_s": t.get("inference_s"), "float64_s": t.get("float64_s"),
            "notes": v.get("notes") or [], "inputs": v.get("inputs")}


# ----------------------------------------------------------------------------- planting bugs

def _const(model, name: str):
    """The numpy value of an initializer or Constant output NAME (None if neither)."""
    from onnx import numpy_helper

    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
    return None


def _set_init(model, name: str, value) -> None:
    from onnx import numpy_helper

    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
            return
    raise KeyError(f"initializer {name} not found in the folded model")


def plant(original: Path, folded: Path, records: list, bug: str, out: Path) -> dict:
    """Write FOLDED with BUG planted at a middle BN folded into its preceding Conv; numpy float64 only."""
    import numpy as np
    import onnx

    cands = [r for r in records if r.get("folded") and r.get("direction") == "into_preceding"
             and r.get("host_op") == "Conv" and r.get("graph") == "main graph"]
    if not cands:
        raise ValueError("no BN folded into a preceding Conv in the main graph")
    orig = onnx.load(str(original))
    fold = onnx.load(str(folded))
    bn_nodes = {n.name: n for n in orig.graph.node if n.op_type == "BatchNormalization"}
    hosts = {n.name: n for n in fold.graph.node if n.op_type == "Conv"}
    usable = [r for r in cands if r["node"] in bn_nodes and r["host"] in hosts and len(hosts[r["host"]].input) > 2]
    if not usable:
        raise ValueError("no folded host found by name in the folded model")
    rec = usable[len(usable) // 2]
    bn, host = bn_nodes[rec["node"]], hosts[rec["host"]]
    gamma, beta, mean, var = (_const(orig, x) for x in bn.input[1:5])
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    w0, b0 = _const(fold, host.input[1]), _const(fold, host.input[2])
    if any(x is None for x in (gamma, beta, mean, var, w0, b0)):
        raise ValueError("BN parameters or host weights are not constants")
    dt = w0.dtype
    g, be, mu, v = (np.asarray(x, np.float64) for x in (gamma, beta, mean, var))
    w, b = w0.astype(np.float64), b0.astype(np.float64)
    s = g / np.sqrt(v + eps)
    cshape = (-1,) + (1,) * (w.ndim - 1)
    if bug == "mean_dropped":  # the fold forgot "- mean": bias = b*s + beta
        b = b + mu * s
    elif bug == "var_no_sqrt":  # scale gamma / (var + eps) instead of gamma / sqrt(var + eps)
        r = 1.0 / np.sqrt(v + eps)
        w = w * r.reshape(cshape)
        b = (b - be) * r + be
    elif bug == "channels_swapped":  # output channels 0 and 1 exchanged (weights and bias)
        w[[0, 1]] = w[[1, 0]]
        b[[0, 1]] = b[[1, 0]]
    elif bug == "shift_twice":  # beta - mean*s added once more
        b = b + (be - mu * s)
    elif bug == "weight_1pct":  # one output channel's weights 1 % off
        w[0] = w[0] * 1.01
    else:
        raise ValueError(bug)
    _set_init(fold, host.input[1], w.astype(dt))
    _set_init(fold, host.input[2], b.astype(dt))
    onnx.save(fold, str(out))
    return {"bn": rec["node"], "host": rec["host"], "position": f"{usable.index(rec) + 1}/{len(usable)}"}


# ----------------------------------------------------------------------------- one model

def is_reparam(arch: str) -> bool:
    return arch.startswith(REPARAM_PREFIXES)


def _factor(row: dict):
    """A verdict's use of its limit: the float64 pass's, or the runtime comparison's when no float64 pass ran
    (runtime-calibrated verdicts)."""
    return row.get("used") if row.get("used") is not None else row.get("runtime_used")


def tag_of(entry: dict) -> str:
    return f"{entry['exporter']}-{entry['dtype']}-{entry['arch']}" + ("-ext" if entry.get("external") else "")


def run_task(entry: dict, seed: int, rep: bool, corpus: Path, work: Path, runner: Runner, plants: set,
             log) -> dict:
    """One ``bnfold fuse`` run; after the plain seed-0 run also the bare ORT timing and the plants."""
    src = corpus / entry["path"]
    tag = tag_of(entry)
    wd = work / f"{tag}-s{seed}{'-rep' if rep else ''}"
    wd.mkdir(parents=True, exist_ok=True)
    out = wd / "fused.onnx"
    args = ["fuse", str(src), "-o", str(out), "--seed", str(seed)] + (["--reparameterize"] if rep else [])
    args += runner.verify_args
    r = runner.bnfold(*args)
    d = r["data"] or {}
    row = {"seed": seed, "reparameterize": rep, "rc": r["rc"], "wall_s": r["wall_s"],
           "written": out.exists(), "bn_after": (d.get("after") or {}).get("bn_count"),
           "merged": len(d.get("reparameterized") or []), **summarise_verification(d.get("verification"))}
    row.pop("inputs", None)
    if r["rc"] != 0:
        row["stderr"] = r["stderr"]
    log(f"{tag:48s} seed {seed}{' rep' if rep else '    '} rc {r['rc']} "
        f"used {row.get('used')!s:.6} rt {row.get('runtime_used')!s:.6} {r['wall_s']:.1f} s")
    if seed == 0 and not rep and out.exists():
        v = d.get("verification") or {}
        row["bare"] = runner.bare(src, out, v.get("inputs") or {}, v.get("samples") or 2)
        if entry["arch"] in plants and not entry.get("external"):
            row["control"], row["plants"] = plant_all(src, out, d.get("records") or [], wd, runner, tag, log)
    shutil.rmtree(wd, ignore_errors=True)
    return row


def plant_all(src: Path, folded: Path, records: list, wd: Path, runner: Runner, tag: str, log):
    control = runner.bnfold("verify", str(src), str(folded), "--seed", "0", *runner.verify_args)
    c = {"rc": control["rc"], **summarise_verification(control["data"])}
    c.pop("inputs", None)
    rows = []
    for bug in BUGS:
        p = wd / f"planted-{bug}.onnx"
        row = {"bug": bug}
        try:
            row.update(plant(src, folded, records, bug, p))
        except Exception as e:  # a plant that cannot be made is recorded, not fatal
            row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            continue
        v = runner.bnfold("verify", str(src), str(p), "--seed", "0", *runner.verify_args)
        sv = summarise_verification(v["data"])
        sv.pop("inputs", None)
        row.update(rc=v["rc"], refused=v["rc"] == 1, **sv)
        if v["rc"] not in (0, 1):
            row["stderr"] = v["stderr"]
        rows.append(row)
        log(f"{tag:48s} plant {bug:16s} rc {v['rc']} used {row.get('used')!s:.8}")
        p.unlink(missing_ok=True)
    return c, rows


def assemble(entries: list, rows: dict) -> list:
    """Per-file results (the shape render() reads) from the per-run rows done so far."""
    models = []
    for e in entries:
        runs = sorted((r for (t, _, _), r in rows.items() if t == tag_of(e)),
                      key=lambda r: (r["reparameterize"], r["seed"]))
        if not runs:
            continue
        m = {k: e.get(k) for k in ("arch", "exporter", "dtype", "path", "external", "bn", "nodes", "mb")}
        first = next((r for r in runs if r["seed"] == 0 and not r["reparameterize"]), {})
        for k in ("bare", "control", "plants"):
            if k in first:
                m[k] = first[k]
        m["runs"] = [{k: v for k, v in r.items() if k not in ("bare", "control", "plants")} for r in runs]
        models.append(m)
    models.sort(key=lambda m: (m["exporter"], m["dtype"], bool(m.get("external")), m["arch"]))
    return models


# ----------------------------------------------------------------------------- report

def _fmt(x, spec=".3g", none="–") -> str:
    return none if x is None else format(x, spec)


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _max(xs):
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


def render(data: dict) -> str:
    meta, models = data["meta"], data["models"]
    runs = [(m, r) for m in models for r in m["runs"]]
    plain = [(m, r) for m, r in runs if not r["reparameterize"]]
    rep = [(m, r) for m, r in runs if r["reparameterize"]]

    def refused(r):
        return r["rc"] == 1

    def errored(r):
        return r["rc"] not in (0, 1)

    archs = sorted({m["arch"] for m in models})
    L = ["# Verdicts on a real corpus", "",
         f"Generated by `benchmarks/verdicts.py` on {meta['date']} ({meta['machine']}); bnfold under test: "
         f"{meta['bnfold']}. Corpus: {meta.get('corpus_archs')} architectures, {meta.get('corpus_files')} files "
         f"({meta['corpus']}), {len(archs)} architectures and {len(models)} files run; seeds 0..{meta['seeds'] - 1}; "
         + ("report written from cached runs (--cached-only); the" if meta.get("cached_only") else
            f"this process ran {meta['wall_s'] / 60:.1f} min with --jobs {meta['jobs']}; the")
         + f" fuse processes took {sum(r['wall_s'] for _, r in runs) / 60:.0f} min "
         "in all (plants and bare ORT timing not included)."
         + ("" if meta.get("exact_budget") is None else
            f" Every fuse and verify ran with `--exact-budget {meta['exact_budget']}`"
            + (" (runtime-calibrated verdicts throughout)." if float(meta["exact_budget"]) == 0 else "."))
         + "", ""] + ([] if meta.get("complete") else [
         f"**Partial run: {meta.get('tasks_done')} of {meta.get('tasks')} fuse runs done** (a rerun of the same "
         "command resumes from its cache).", ""]) + [
         "A *false alarm* is a correct fold that `bnfold fuse` (default verification) refuses to write. "
         "*used* is the float64 pass's deviation over its limit (>= 1 refuses); *runtime* is the "
         "model-dtype ONNX Runtime comparison's max abs error over its atol (> 1 fails). Worst over seeds "
         "and outputs. *verify* is bnfold's reported verification time, *bare ORT* both models' sessions "
         "and runs on the same inputs (CPU, optimisations off, 1 thread), medians.", "",
         "## Summary", "",
         f"- fuse runs: {len(plain)} (+{len(rep)} with --reparameterize); written: "
         f"{sum(r['rc'] == 0 and r['written'] for _, r in runs)}; **false alarms: "
         f"{sum(refused(r) for _, r in runs)}**; errors (exit 2/3/timeout): {sum(errored(r) for _, r in runs)}",
         ]
    pl = [(m, p) for m in models for p in m.get("plants") or []]
    four = [(m, p) for m, p in pl if p["bug"] != "weight_1pct"]
    L.append(f"- planted bugs (four fold bugs): refused {sum(bool(p.get('refused')) for _, p in four)} of "
             f"{len(four)}; 1 % weight error float32: refused "
             f"{sum(bool(p.get('refused')) for m, p in pl if p['bug'] == 'weight_1pct' and m['dtype'] == 'float32')}"
             f" of {sum(1 for m, p in pl if p['bug'] == 'weight_1pct' and m['dtype'] == 'float32')}"
             f" (float16, informational: "
             f"{sum(bool(p.get('refused')) for m, p in pl if p['bug'] == 'weight_1pct' and m['dtype'] == 'float16')}"
             f" of {sum(1 for m, p in pl if p['bug'] == 'weight_1pct' and m['dtype'] == 'float16')})")
    L.append(f"- worst margins over all fuse runs: used {_fmt(_max(r.get('used') for _, r in runs))}, runtime "
             f"{_fmt(_max(r.get('runtime_used') for _, r in runs))}; smallest detection factor of the four bugs: "
             f"{_fmt(min((_factor(p) for _, p in four if _factor(p) is not None), default=None))}")
    ratios = [ _ratio(m) for m in models]
    L.append(f"- verify time / bare ORT: median {_fmt(_med(ratios), '.1f')}x, worst "
             f"{_fmt(_max(ratios), '.1f')}x")
    L += ["", "## Per exporter and dtype", "",
          "| exporter | dtype | files | fuse runs | written | false alarms | errors | worst used | worst runtime "
          "| verify s (median) | bare ORT s (median) | ratio (median, worst) |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups = sorted({(m["exporter"], m["dtype"], bool(m.get("external"))) for m in models})
    for ex, dt, ext in groups:
        ms = [m for m in models if (m["exporter"], m["dtype"], bool(m.get("external"))) == (ex, dt, ext)]
        rs = [r for m in ms for r in m["runs"]]
        rr = [_ratio(m) for m in ms]
        L.append(f"| {ex}{' (external data)' if ext else ''} | {dt} | {len(ms)} | {len(rs)} | "
                 f"{sum(r['rc'] == 0 and r['written'] for r in rs)} | {sum(refused(r) for r in rs)} | "
                 f"{sum(errored(r) for r in rs)} | {_fmt(_max(r.get('used') for r in rs))} | "
                 f"{_fmt(_max(r.get('runtime_used') for r in rs))} | "
                 f"{_fmt(_med(_med(r.get('verify_s') for r in m['runs']) for m in ms), '.2f')} | "
                 f"{_fmt(_med((m.get('bare') or {}).get('bare_s') for m in ms), '.3f')} | "
                 f"{_fmt(_med(rr), '.1f')}x, {_fmt(_max(rr), '.1f')}x |")
    if rep:
        L += ["", "## --reparameterize", "",
              "| file | runs | written | false alarms | BN before → after | merged blocks | worst used |",
              "|---|---:|---:|---:|---|---:|---:|"]
        for m in models:
            rs = [r for r in m["runs"] if r["reparameterize"]]
            if rs:
                L.append(f"| {_name(m)} | {len(rs)} | {sum(r['rc'] == 0 and r['written'] for r in rs)} | "
                         f"{sum(refused(r) for r in rs)} | {m.get('bn')} → {rs[0].get('bn_after')} | "
                         f"{rs[0].get('merged')} | {_fmt(_max(r.get('used') for r in rs))} |")
    L += ["", "## Planted bugs (into bnfold's folded model, verified against the original)", "",
          "Factor = float64 deviation over its limit (`used`; the runtime comparison's when no float64 pass ran); "
          "refused when the exit code is 1. "
          "Control = the unplanted fold.", "",
          "| network | exporter | dtype | BN (position) | control | " + " | ".join(BUG_TEXT[b] for b in BUGS) + " |",
          "|---|---|---|---|---:|" + "---:|" * len(BUGS)]
    for m in models:
        if not m.get("plants"):
            continue
        cells = []
        for b in BUGS:
            p = next((p for p in m["plants"] if p["bug"] == b), None)
            if p is None or "error" in p:
                cells.append("n/a" if p is None else "error")
            else:
                verdict = 'refused' if p.get('refused') else '**passed**' if p['rc'] == 0 else f"exit {p['rc']}"
                cells.append(f"{verdict} {_fmt(_factor(p))}")
        first = next((p for p in m["plants"] if "bn" in p), {})
        c = m.get("control") or {}
        L.append(f"| {m['arch']} | {m['exporter']} | {m['dtype']} | "
                 f"{first.get('bn', '?')} ({first.get('position', '?')})"
                 f" | {'ok' if c.get('rc') == 0 else 'rc ' + str(c.get('rc'))} {_fmt(_factor(c))} | "
                 + " | ".join(cells) + " |")
    L += ["", "## Every file", "",
          "| file | BN | seeds written | worst used | worst runtime | direction | method | verify s "
          "| bare ORT s | ratio |",
          "|---|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for m in models:
        rs = [r for r in m["runs"] if not r["reparameterize"]]
        L.append(f"| {_name(m)} | {m.get('bn')} → {rs[0].get('bn_after') if rs else '?'} | "
                 f"{sum(r['rc'] == 0 and r['written'] for r in rs)}/{len(rs)} | "
                 f"{_fmt(_max(r.get('used') for r in rs))} | "
                 f"{_fmt(_max(r.get('runtime_used') for r in rs))} | "
                 f"{','.join(sorted({r.get('direction') or '–' for r in rs}))} | "
                 f"{','.join(sorted({r.get('method') or '–' for r in rs}))} | "
                 f"{_fmt(_med(r.get('verify_s') for r in rs), '.2f')} | "
                 f"{_fmt((m.get('bare') or {}).get('bare_s'), '.3f')} | {_fmt(_ratio(m), '.1f')}x |")
    bad = [(m, r) for m, r in runs if r["rc"] != 0]
    if bad:
        L += ["", "## Refusals and errors", "",
              "*refused by*: which check failed, the float64 pass (used >= 1) or the model-dtype runtime "
              "comparison (runtime > 1) while the other passed.", "",
              "| file | seed | rep | exit | refused by | used | runtime | fail fraction | message |",
              "|---|---:|---|---:|---|---:|---:|---:|---|"]
        for m, r in bad:
            msg = (f"float64 pass skipped: {r['exact_why']}" if r.get("exact_why") else
                   r.get("stderr") or "").replace("|", "/").replace("\n", " ")[:220]
            by = [k for k, bad in (("float64", (r.get("used") or 0) >= 1),
                                   ("runtime", (r.get("runtime_used") or 0) > 1)) if bad]
            L.append(f"| {_name(m)} | {r['seed']} | {'yes' if r['reparameterize'] else ''} | {r['rc']} | "
                     f"{' + '.join(by) or '–'} | "
                     f"{_fmt(r.get('used'))} | {_fmt(r.get('runtime_used'))} | "
                     f"{_fmt(r.get('fail_fraction'))} | {msg} |")
    if data.get("export_failures"):
        L += ["", "## Export failures (from the manifest)", ""]
        for e in data["export_failures"]:
            L.append(f"- {e['arch']} {e['exporter']} {e['dtype']}: {e.get('error')}")
    L += ["", "## Versions", "", "```", json.dumps(meta.get("versions"), indent=1), "```", ""]
    return "\n".join(L)


def _name(m: dict) -> str:
    return f"{m['arch']} {m['exporter']} {m['dtype']}{' ext' if m.get('external') else ''}"


def _ratio(m: dict):
    v = _med(r.get("verify_s") for r in m["runs"] if not r["reparameterize"])
    b = (m.get("bare") or {}).get("bare_s")
    return v / b if v and b else None


def versions(python: str) -> dict:
    code = ("import json, importlib.metadata as m\nv = {}\nfor p in ('onnx', 'onnxruntime', 'numpy', 'click', "
            "'torch', 'timm'):\n    try: v[p] = m.version(p)\n    except Exception: v[p] = None\nprint(json.dumps(v))")
    try:
        return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True).stdout)
    except Exception:  # informational only
        return {}


# ----------------------------------------------------------------------------- main

def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_bare":
        print(json.dumps(bare_ort(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=Path("/work/corpus"), help="folder with manifest.json")
    ap.add_argument("--bnfold", type=Path, default=HERE.parent, help="bnfold source tree to test")
    ap.add_argument("--ref", help="test this git revision of --bnfold (git archive) instead of its working files")
    ap.add_argument("--python", default=sys.executable, help="interpreter with onnx, onnxruntime, numpy, click")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--exact-budget", help="pass --exact-budget to every fuse/verify (0: runtime-calibrated "
                                           "verdicts everywhere); default: bnfold's own default")
    ap.add_argument("--jobs", type=int, default=2, help="models in parallel")
    ap.add_argument("--subset", type=int, help="only the first N architectures (quick run)")
    ap.add_argument("--only", nargs="*", default=[], help="only these architectures")
    ap.add_argument("--plant", default=",".join(PLANT_DEFAULT), help="architectures that get planted bugs")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per bnfold process")
    ap.add_argument("--cache", type=Path, default=HERE / "work" / "verdicts-cache",
                    help="per-file results, reused when bnfold's snapshot, the file and the settings are the same "
                         "(an interrupted run resumes); --no-cache to ignore")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--cached-only", action="store_true",
                    help="run nothing: write the report from the cached runs (e.g. after stopping a long run)")
    ap.add_argument("--md", type=Path, default=HERE / "VERDICTS.md")
    ap.add_argument("--json", type=Path, default=HERE / "work" / "verdicts.json")
    args = ap.parse_args()

    args.corpus = args.corpus.resolve()  # the runs start in the snapshot folder
    if (args.corpus / "manifest.json").exists():
        manifest = json.loads((args.corpus / "manifest.json").read_text())
    else:  # an export still running: the architectures finished so far
        parts = sorted((args.corpus / "parts").glob("*.json"))
        models = [e for p in parts for e in json.loads(p.read_text())]
        manifest = {"created": "partial (export running)", "models": models}
    entries = [e for e in manifest["models"] if e["ok"]]
    archs = list(dict.fromkeys(e["arch"] for e in entries))
    if args.only:
        archs = [a for a in archs if a in args.only]
    if args.subset:
        archs = archs[:args.subset]
    entries = [e for e in entries if e["arch"] in archs]
    # slowest first, so the parallel tail is short
    entries.sort(key=lambda e: -(e.get("mb") or 0) * (1 + is_reparam(e["arch"])))
    plants = {a for a in args.plant.split(",") if a}

    tmp = Path(tempfile.mkdtemp(prefix="bnfold-verdicts-"))
    desc = snapshot(args.bnfold.resolve(), args.ref, tmp / "src")
    runner = Runner(args.python, tmp / "src", args.timeout,
                    [] if args.exact_budget is None else ["--exact-budget", args.exact_budget])
    print(f"bnfold under test: {desc}; {len(entries)} files, {len(archs)} architectures, "
          f"seeds {args.seeds}, jobs {args.jobs}", flush=True)
    t0 = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - t0:7.0f} s] {line}", flush=True)

    key = tree_hash(tmp / "src")
    # seed-major order: every file's seed 0 (with plants and timing) before any seed 1, so that a run
    # cut short still covers the whole corpus; plant networks first
    order = sorted(entries, key=lambda e: (e["arch"] not in plants, -(e.get("mb") or 0)))
    tasks = [(e, seed, rep) for seed in range(args.seeds) for e in order
             for rep in ([False, True] if is_reparam(e["arch"]) else [False])]
    rows: dict = {}
    lock = threading.Lock()

    def write(final: bool) -> dict:
        data = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                         "bnfold": f"{desc}, bnfold/ hash {key}",
                         "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                         "corpus": f"{args.corpus}, manifest of {manifest.get('created')}", "seeds": args.seeds,
                         "exact_budget": args.exact_budget,
                         "jobs": args.jobs, "wall_s": time.perf_counter() - t0, "versions": vers,
                         "cached_only": args.cached_only, "corpus_archs": len(archs), "corpus_files": len(entries),
                         "tasks_done": len(rows), "tasks": len(tasks), "complete": final},
                "models": assemble(entries, rows),
                "export_failures": [e for e in manifest["models"] if not e["ok"] and (
                    e["arch"] in archs or not (args.only or args.subset))]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1))
        args.md.write_text(render(data))
        return data

    def one(task) -> None:
        e, seed, rep = task
        f = args.corpus / e["path"]
        st = f.stat()
        ident = {"bnfold": key, "file": str(f), "size": st.st_size, "mtime": st.st_mtime, "seed": seed, "rep": rep,
                 "plant": e["arch"] in plants, "python": args.python}
        if args.exact_budget is not None:
            ident["exact_budget"] = args.exact_budget
        name = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
        cached = args.cache / f"{name}.json"
        if not args.no_cache and cached.exists():
            row = json.loads(cached.read_text())
        elif args.cached_only:
            return
        else:
            row = run_task(e, seed, rep, args.corpus, tmp / "work", runner, plants, log)
            args.cache.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(row))
        with lock:
            rows[(tag_of(e), seed, rep)] = row
            if len(rows) % 10 == 0:
                write(False)

    vers = versions(args.python)
    try:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(one, tasks))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data = write(len(rows) == len(tasks))
    print(f"wrote {args.md} and {args.json} ({data['meta']['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
