"""bnfold against the tools people use today, on the same models in one run.

    python benchmarks/run.py [--repeat 5] [--only NAME ...] [--no-export]

Writes benchmarks/RESULTS.md and prints the same tables. Needs the benchmark
environment (benchmarks/requirements.txt); see the README's Benchmarks section.

For each model (models/, benchmarks/edge_models.py, timm exports from
benchmarks/export_models.py) and tool, one fresh process folds and saves the model
under /usr/bin/time, so wall time and peak RSS are whole-process figures. Every
output is then checked: ONNX checker (full_check), BN count, and equivalence
with the unmodified model through ONNX Runtime (CPU, graph optimisations off on
both sides, bnfold.verification, which never imports the fold code).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "work"

TOOLS = {
    "bnfold": [sys.executable, "-m", "bnfold", "fuse", "{in}", "-o", "{out}", "--no-verify", "-q"],
    "onnxoptimizer": [sys.executable, "-c", "import onnx, onnxoptimizer, sys; m = onnx.load(sys.argv[1]); "
                      "onnx.save(onnxoptimizer.optimize(m, ['fuse_bn_into_conv']), sys.argv[2])", "{in}", "{out}"],
    "onnxsim": [sys.executable, "-c", "import onnx, onnxsim, sys; m, _ = onnxsim.simplify(onnx.load(sys.argv[1])); "
                "onnx.save(m, sys.argv[2])", "{in}", "{out}"],
    "onnxslim": [sys.executable, "-c", "import onnx, onnxslim, sys; "
                 "onnx.save(onnxslim.slim(onnx.load(sys.argv[1])), sys.argv[2])", "{in}", "{out}"],
    "onnxscript": [sys.executable, "-c", "import onnx, sys; from onnxscript import optimizer, rewriter; "
                   "m = optimizer.optimize(onnx.load(sys.argv[1])); onnx.save(rewriter.rewrite(m), sys.argv[2])",
                   "{in}", "{out}"],
    "ort-basic": [sys.executable, "-c", "import onnxruntime as ort, sys; so = ort.SessionOptions(); "
                  "so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC; "
                  "so.optimized_model_filepath = sys.argv[2]; "
                  "ort.InferenceSession(sys.argv[1], so, providers=['CPUExecutionProvider'])", "{in}", "{out}"],
}
RUN_ARCHS = ["resnet18", "resnet50", "mobilenetv2_100", "efficientnet_b0", "densenet121", "levit_128s",
             "repvgg_a0", "mobileone_s0", "mixnet_s", "regnetx_002"]
FLOOR = [sys.executable, "-c", "import onnx, sys; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])", "{in}", "{out}"]


def timed(cmd, inp: Path, out: Path, timeout: int = 600) -> dict:
    args = ["/usr/bin/time", "-f", "@@%e %M"] + [a.replace("{in}", str(inp)).replace("{out}", str(out)) for a in cmd]
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"rc": -1, "wall": float(timeout), "rss_mb": 0.0, "err": "timeout"}
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("@@")][-1]
    wall, rss = line[2:].split()
    err = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("@@")]
    return {"rc": p.returncode, "wall": float(wall), "rss_mb": int(rss) / 1024, "err": err[-1][:160] if err else ""}


def counts(path: Path):
    """(BatchNormalization nodes, all nodes), over all graphs and functions."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def walk(nodes):
        bn = total = 0
        for node in nodes:
            bn += node.op_type == "BatchNormalization"
            total += 1
            for g in [a.g for a in node.attribute if a.HasField("g")] + [g for a in node.attribute for g in a.graphs]:
                b, t = walk(g.node)
                bn, total = bn + b, total + t
        return bn, total

    pairs = [walk(m.graph.node)] + [walk(f.node) for f in m.functions]
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def check_output(original: Path, out: Path) -> dict:
    """Validity, BN count and equivalence of one tool's output."""
    import onnx

    from bnfold.errors import BnfoldError
    from bnfold.verification import verify

    if not out.exists():
        return {"status": "crash", "bn": None}
    try:
        onnx.checker.check_model(str(out), full_check=True)
    except Exception as e:
        return {"status": "invalid", "bn": None, "why": str(e).splitlines()[0][:120]}
    bn, nodes = counts(out)
    try:
        report = verify(original, out, providers="cpu", samples=2)
    except BnfoldError as e:
        return {"status": "invalid", "bn": bn, "nodes": nodes, "why": str(e)[:120]}
    if report.equivalent:
        return {"status": "ok", "bn": bn, "nodes": nodes}
    outputs = [o for c in report.comparisons for o in c.outputs]
    worst = max(outputs, key=lambda o: o.fail_fraction) if outputs else None
    if worst is not None and worst.worst is not None and any(isinstance(v, float) and v != v
                                                             for v in worst.worst.values()):
        return {"status": "wrong", "bn": bn, "nodes": nodes, "why": "NaN"}  # the plainest account first
    if report.exact is not None and report.exact.ran and not report.exact.equivalent:
        # refused by the float64 check: the output's float64 value moved more than rounding the
        # weights once (to nearest) can move it, though the runtime comparison may pass
        used = max(o.used for o in report.exact.outputs)
        return {"status": "wrong", "bn": bn, "nodes": nodes, "why": f"float64 check: {used:.0%} of its limit"}
    return {"status": "wrong", "bn": bn, "nodes": nodes,
            "why": f"{worst.fail_fraction:.0%} of elements off" if worst is not None else "not equivalent"}


def latency(path: Path, runs: int = 20, optimize: bool = False) -> float:
    """Median ms per inference (batch 1), ONNX Runtime CPU, graph optimisations disabled
    (or at the default level with ``optimize``)."""
    import numpy as np
    import onnxruntime as ort

    from bnfold.inputs import random_feeds, resolve_shapes
    from bnfold.runner import Runner, open_runner

    if optimize:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        r = Runner(str(path), "cpu", sess, False, [o.name for o in sess.get_outputs()],
                   open_runner(str(path), "cpu").inputs)
    else:
        r = open_runner(str(path), "cpu")
    shapes, _ = resolve_shapes(list(r.inputs), {}, {})
    shapes = {k: (1,) + tuple(v[1:]) if v else v for k, v in shapes.items()}
    feeds = random_feeds(list(r.inputs), shapes, 0)
    r.run(feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        r.run(feeds)
        times.append(time.perf_counter() - t)
    del ort, np
    return statistics.median(times) * 1000


def corpus(only) -> list:
    models = [("sample", p) for p in sorted((ROOT / "models").glob("*.onnx"))]
    models += [("edge", p) for p in sorted((WORK / "edge").glob("*.onnx"))]
    models += [("timm", p) for p in sorted((WORK / "models").glob("*.onnx"))]
    return [(k, p) for k, p in models if not only or p.stem in only]


def run(args) -> dict:
    subprocess.run([sys.executable, str(HERE / "edge_models.py")], check=True)
    if not args.no_export:
        # the ten architectures RESULTS.md has always used, at their full input size
        subprocess.run([sys.executable, str(HERE / "export_models.py"), "--out", str(WORK / "models"), "--flat",
                        "--exporters", "torchscript", "--dtypes", "float32", "--side", "224", *RUN_ARCHS],
                       check=False)
    # bnfold timed as an installed package runs: from bytecode (an editable install under
    # PYTHONDONTWRITEBYTECODE would compile its modules in every process; the peers' are compiled)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "bnfold")], check=True)
    results = {"models": {}, "meta": {}}
    tmp = Path(tempfile.mkdtemp(prefix="bnfold-bench-"))
    for kind, path in corpus(args.only):
        name = path.stem
        bn, nodes = counts(path)
        entry = {"kind": kind, "mb": path.stat().st_size / 2**20, "bn": bn, "nodes": nodes, "tools": {}}
        print(f"{name}: {entry['bn']} BN, {entry['mb']:.1f} MB", flush=True)
        # rounds of every tool in turn: a slow spell of the machine hits all tools of a round alike,
        # and each tool's ratio to bnfold is taken within a round (paired), then the median over rounds
        cmds = list(TOOLS.items()) + [("floor", FLOOR)]
        runs: dict = {tool: [] for tool, _ in cmds}
        for r in range(args.repeat):
            # the order rotates each round and every run starts with the disk's pending writes done
            # (os.sync, untimed): here a run that followed another tool's 100 MB write paid for its
            # writeback, up to 2x on resnet50, whichever tool it was
            for tool, cmd in cmds[r % len(cmds):] + cmds[:r % len(cmds)]:
                if runs[tool] and runs[tool][-1]["rc"] != 0:
                    continue  # failed once: not retried
                out = tmp / f"{name}.{tool}.onnx"
                if out.exists():
                    out.unlink()
                os.sync()
                runs[tool].append(timed(cmd, path, out))
        for tool, _ in cmds:
            rs = runs[tool]
            res = {"wall": statistics.median(r["wall"] for r in rs), "rss_mb": max(r["rss_mb"] for r in rs),
                   "rc": rs[-1]["rc"], "err": rs[-1]["err"]}
            paired = [r["wall"] / b["wall"] for r, b in zip(rs, runs["bnfold"]) if r["rc"] == 0 and b["rc"] == 0]
            if paired:  # this tool's time / bnfold's, round by round
                res["ratio"] = (statistics.median(paired), min(paired), max(paired), len(paired))
            if tool != "floor":
                out = tmp / f"{name}.{tool}.onnx"
                res.update(check_output(path, out) if res["rc"] == 0 else {"status": "crash", "bn": None,
                                                                              "why": res["err"]})
            entry["tools"][tool] = res
            print(f"  {tool:13s} {res['wall']:6.2f} s {res['rss_mb']:7.0f} MB  "
                  f"{res.get('status', '')} {res.get('bn', '')} {res.get('why', '')}", flush=True)
        bn_out = tmp / f"{name}.bnfold.onnx"
        if kind != "edge" and entry["tools"]["bnfold"]["status"] == "ok":
            entry["latency_ms"] = (latency(path), latency(bn_out))
        if kind == "timm":
            entry["reparam"] = reparam_row(path, tmp / f"{name}.reparam.onnx")
        results["models"][name] = entry
    help_runs = [timed([sys.executable, "-m", "bnfold", "--help"], Path("."), Path("."))["wall"] for _ in range(5)]
    results["meta"] = {"help_s": statistics.median(help_runs), "date": time.strftime("%Y-%m-%d"),
                       "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                       "repeat": args.repeat, "versions": versions()}
    return results


def reparam_row(path: Path, out: Path) -> dict:
    """fuse --reparameterize: counts, verification and latency before/after."""
    from bnfold import fuse
    from bnfold.verification import verify

    result = fuse(path, reparameterize=True)
    result.save(out)
    b, a = counts(path), counts(out)
    ok = verify(path, out, providers="cpu").equivalent
    return {"bn": (b[0], a[0]), "nodes": (b[1], a[1]), "merges": len(result.merges), "equivalent": ok,
            "latency_off": (latency(path), latency(out)),
            "latency_default": (latency(path, optimize=True), latency(out, optimize=True))}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("bnfold", "onnx", "onnxruntime", "onnxoptimizer", "onnxsim", "onnxslim", "onnxscript", "torch", "timm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _ratio(tool: dict, digits: int = 2) -> str:
    """A tool's paired time ratio to bnfold: median [lowest–highest] (the median alone with ``digits`` 1)."""
    if "ratio" not in tool:
        return "—"
    med, lo, hi, _ = tool["ratio"]
    return f"{med:.1f}×" if digits == 1 else f"{med:.2f}× [{lo:.2f}–{hi:.2f}]"


def render(results: dict) -> str:
    tools = list(TOOLS)
    models = results["models"]
    meta = results["meta"]
    lines = ["# Benchmark results", "",
             f"{meta['date']}, {meta['machine']}; {meta['repeat']} rounds per model, each running every tool once "
             "(the order rotating by one tool per round; each run starts after `os.sync()`, untimed). "
             "Regenerate with `python benchmarks/run.py`.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), ""]

    foldable = {n: m["bn"] - (m["tools"]["bnfold"]["bn"] if m["tools"]["bnfold"]["bn"] is not None else m["bn"])
                for n, m in models.items()}
    lines += ["## Summary", "",
              "| tool | BNs folded (of those bnfold folds) | wrong | invalid | crash | "
              "ResNet-50 time | vs bnfold | ResNet-50 peak RSS |",
              "|---|---|---|---|---|---|---|---|"]
    total_foldable = sum(foldable.values())
    r50 = models.get("resnet50")
    for tool in tools + ["floor"]:
        if tool == "floor":
            folded = wrong = invalid = crash = "—"
        else:
            folded_n = sum(min(foldable[n], m["bn"] - m["tools"][tool]["bn"]) for n, m in models.items()
                           if m["tools"][tool]["status"] == "ok")
            folded = f"{folded_n} / {total_foldable}"
            wrong = sum(m["tools"][tool]["status"] == "wrong" for m in models.values())
            invalid = sum(m["tools"][tool]["status"] == "invalid" for m in models.values())
            crash = sum(m["tools"][tool]["status"] == "crash" for m in models.values())
        if r50:
            t = r50["tools"][tool]
            speed = f"{t['wall']:.2f} s", _ratio(t), f"{t['rss_mb']:.0f} MB"
        else:
            speed = ("—",) * 3
        label = "load+save floor" if tool == "floor" else tool
        lines.append(f"| {label} | {folded} | {wrong} | {invalid} | {crash} | " + " | ".join(speed) + " |")
    lines += ["", "Times are medians over rounds; \"vs bnfold\" is the tool's time / bnfold's within each round (all "
              "tools run in turn, each round), median [lowest–highest] over the rounds: above 1× bnfold is faster."]
    if r50 and "ratio" in r50["tools"]["ort-basic"] and "ratio" in r50["tools"]["floor"]:
        ort, floor = r50["tools"]["ort-basic"]["ratio"], r50["tools"]["floor"]["ratio"]
        mem = r50["tools"]["bnfold"]["rss_mb"] / r50["tools"]["floor"]["rss_mb"]
        lines += ["", f"ResNet-50: bnfold's time is {1 / ort[0]:.2f}× ONNX Runtime's offline optimisation "
                  f"(ort-basic; {1 / ort[2]:.2f}–{1 / ort[1]:.2f}× over {ort[3]} rounds) and {1 / floor[0]:.2f}× "
                  f"the onnx load+save floor ({1 / floor[2]:.2f}–{1 / floor[1]:.2f}×), with {mem:.2f}× the floor's "
                  "peak memory."]
    lines += ["", f"`bnfold --help`: {meta['help_s']:.2f} s.", ""]

    lines += ["## Coverage and correctness", "",
              "BNs / nodes left after each tool (fewer BNs is better; a tool that removes a BN by adding nodes that "
              "compute the folded weights at run time shows more nodes) and the verdict of its output against the "
              "unmodified model: ok, **wrong** (not equivalent through ONNX Runtime), **invalid** (rejected by the "
              "ONNX checker or unloadable), **crash** (no output).", "",
              "| model | BN / nodes | " + " | ".join(tools) + " |", "|---|---" + "|---" * len(tools) + "|"]
    for name, m in models.items():
        cells = []
        for tool in tools:
            r = m["tools"][tool]
            if r["status"] == "ok":
                cells.append(f"{r['bn']} / {r['nodes']}")
            else:
                why = f" ({r.get('why')})" if r.get("why") else ""
                cells.append(f"**{r['status']}**{why}".replace("|", "/"))
        lines.append(f"| {name} | {m['bn']} / {m['nodes']} | " + " | ".join(cells) + " |")

    lines += ["", "## Speed and memory", "",
              "Whole-process wall time of fold-and-save (seconds, median; paired ratio to bnfold, median over "
              "rounds) and peak RSS (MB). The floor is "
              "`onnx.load` + `onnx.save` of the same model in a bare process.", "",
              "| model | MB | " + " | ".join(tools + ["floor"]) + " |", "|---|---" + "|---" * (len(tools) + 1) + "|"]
    for name, m in models.items():
        cells = [f"{m['tools'][t]['wall']:.2f} ({_ratio(m['tools'][t], 1)}), {m['tools'][t]['rss_mb']:.0f}"
                 for t in tools + ["floor"]]
        lines.append(f"| {name} | {m['mb']:.1f} | " + " | ".join(cells) + " |")

    lines += ["", "## Inference effect", "",
              "ONNX Runtime CPU latency (batch 1, graph optimisations disabled: what a runtime without its own "
              "fusions gains), median of 20 runs.", "",
              "| model | before (ms) | after bnfold (ms) | change |", "|---|---|---|---|"]
    for name, m in models.items():
        if "latency_ms" in m:
            b, a = m["latency_ms"]
            lines.append(f"| {name} | {b:.2f} | {a:.2f} | {100 * (a - b) / b:+.0f}% |")
    lines += ["", "## Concat folding and re-parameterisation (`fuse --reparameterize`)", "",
              "BN and node counts before → after, blocks merged into one Conv, verification against the "
              "unmodified model, and ONNX Runtime CPU latency (batch 1, median of 20) with graph optimisations "
              "disabled and at the default level.", "",
              "| model | BN | nodes | merged blocks | verify | latency, opt. off (ms) | latency, default (ms) |",
              "|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        r = m.get("reparam")
        if r:
            lo, ld = r["latency_off"], r["latency_default"]
            lines.append(f"| {name} | {r['bn'][0]} → {r['bn'][1]} | {r['nodes'][0]} → {r['nodes'][1]} | "
                         f"{r['merges']} | {'ok' if r['equivalent'] else '**FAIL**'} | "
                         f"{lo[0]:.2f} → {lo[1]:.2f} ({100 * (lo[1] - lo[0]) / lo[0]:+.0f}%) | "
                         f"{ld[0]:.2f} → {ld[1]:.2f} ({100 * (ld[1] - ld[0]) / ld[0]:+.0f}%) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description="Benchmark bnfold against its peers.")
    ap.add_argument("--repeat", type=int, default=5, help="rounds per model (each runs every tool once)")
    ap.add_argument("--only", nargs="*", help="model names (file stems) to run")
    ap.add_argument("--no-export", action="store_true", help="reuse benchmarks/work/models without re-exporting")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args()
    results = run(args)
    (WORK / "results.json").write_text(json.dumps(results, indent=1))
    text = render(results)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
