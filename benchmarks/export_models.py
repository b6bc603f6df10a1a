"""Export real architectures (timm, torchvision) to ONNX with BatchNormalization preserved.

Run in the benchmark environment (benchmarks/README.md), never needed by bnfold itself:

    python benchmarks/export_models.py [--out /work/corpus] [--jobs 2] [NAME ...]

Each architecture is exported by both torch exporters (TorchScript with
``training=PRESERVE``; dynamo with ``optimize=False``), each in float32 and
float16 (``model.half()`` before export), at a small input (1x3x64x64 unless the
architecture needs more) so that verification stays fast. A few float32 exports
are also copied with their weights as external data.

timm and torchvision give random weights (no hub downloads here), so each BN
first gets trained-like statistics: running mean/var are *measured* on random
input (training-mode passes with a cumulative average), then gamma and beta are
perturbed. Purely random statistics overflow deep networks, float16 first.

Every export is loaded back, counted, checked with the ONNX checker and run
once through ONNX Runtime (CPU, optimisations off): an export whose output is
not finite is recorded as a failure, never silently kept. Failures are recorded
in the manifest, not fatal. Each architecture runs in its own process (a native
crash or a stuck exporter loses that architecture only), ``--jobs`` at a time.

Writes ``OUT/<exporter>/<dtype>/<arch>.onnx``, ``OUT/external/...`` and
``OUT/manifest.json`` (one entry per file: arch, exporter, dtype, path, BN
count, node count, size, export seconds; failures with their one-line reason).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# (source, name, input side). Chosen to cover the BN hosts and block shapes bnfold
# meets in practice: plain/bottleneck/grouped residual nets, depthwise-separable
# mobile nets, squeeze-excite, dense concatenation, multi-branch re-parameterisable
# blocks (RepVGG, MobileOne, RepGhost), hybrid conv/attention nets with BN (LeViT,
# MobileViT, EfficientViT), multi-resolution (HRNet) and aggregation trees (DLA).
ARCHS: list[tuple[str, str, int]] = [
    ("timm", "resnet18", 64),
    ("timm", "resnet50", 64),
    ("timm", "resnext26ts", 64),
    ("timm", "res2net50_14w_8s", 64),
    ("timm", "mobilenetv2_100", 64),
    ("timm", "mobilenetv3_small_100", 64),
    ("timm", "mobilenetv4_conv_small", 64),
    ("timm", "efficientnet_b0", 64),
    ("timm", "efficientnet_lite0", 64),
    ("timm", "mixnet_s", 64),
    ("timm", "mnasnet_100", 64),
    ("timm", "fbnetc_100", 64),
    ("timm", "lcnet_050", 64),
    ("timm", "regnetx_002", 64),
    ("timm", "regnety_002", 64),
    ("timm", "densenet121", 64),
    ("timm", "repvgg_a0", 64),
    ("timm", "mobileone_s0", 64),
    ("timm", "repghostnet_050", 64),
    ("timm", "ghostnet_100", 64),
    ("timm", "rexnet_100", 64),
    ("timm", "hrnet_w18_small", 64),
    ("timm", "dla34", 64),
    ("timm", "dpn68", 64),
    ("timm", "cspresnet50", 64),
    ("timm", "ese_vovnet19b_dw", 64),
    ("timm", "selecsls42b", 64),
    ("timm", "levit_128s", 64),
    ("timm", "mobilevit_xxs", 64),
    ("timm", "efficientvit_b0", 64),
    ("torchvision", "shufflenet_v2_x0_5", 64),
    ("torchvision", "googlenet", 64),
    ("torchvision", "mnasnet0_5", 64),
]
EXPORTERS = ("torchscript", "dynamo")
DTYPES = ("float32", "float16")
# float32 TorchScript exports that also get a copy with external data.
EXTERNAL = ("resnet50", "efficientnet_b0", "mobileone_s0")
CALIBRATION_BATCH = 8


def create(source: str, name: str, side: int):
    """A randomly initialised model in eval mode, built for a side x side input where that matters."""
    if source == "torchvision":
        import torchvision

        kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
        return torchvision.models.get_model(name, weights=None, **kwargs)
    import timm

    kwargs = {}
    if name.startswith(("levit", "efficientvit_m")):
        kwargs["img_size"] = side  # attention biases are sized for one resolution
    return timm.create_model(name, pretrained=False, **kwargs)


def calibrate(model, shape, seed: int = 0) -> None:
    """Give every BN trained-like statistics: measured running mean/var, perturbed gamma/beta."""
    import torch

    torch.manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: running stats = measured stats
        with torch.no_grad():
            if bn.weight is not None:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0.0, 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(*shape))
    model.eval()


def export_one(model, exporter: str, dtype: str, side: int, path: Path, dynamic_batch: bool = False) -> None:
    import copy

    import torch

    m = copy.deepcopy(model)
    x = torch.randn(1, 3, side, side)
    if dtype == "float16":
        m, x = m.half(), x.half()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part.onnx")
    if exporter == "torchscript":
        torch.onnx.export(m, (x,), str(tmp), dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                          opset_version=17, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None)
    else:
        prog = torch.onnx.export(m, (x,), dynamo=True, optimize=False, input_names=["input"],
                                 output_names=["logits"], verify=False, report=False)
        prog.save(str(tmp))
    os.replace(tmp, path)


def describe(path: Path) -> dict:
    """BN/node counts, ONNX checker, and one ORT run (CPU, optimisations off) that must be finite."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    nodes = []

    def walk(graph):
        for n in graph.node:
            nodes.append(n)
            for a in n.attribute:
                if a.g.node:
                    walk(a.g)
                for g in a.graphs:
                    walk(g)

    walk(m.graph)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in s.get_inputs():
        dt = np.float16 if "float16" in i.type else np.float32
        feeds[i.name] = np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1
                                                                  for d in i.shape]).astype(dt)
    outs = s.run(None, feeds)
    finite = all(np.isfinite(o).all() for o in outs if o.dtype.kind == "f")
    return {"bn": sum(n.op_type == "BatchNormalization" for n in nodes), "nodes": len(nodes), "opset": opset,
            "mb": round(path.stat().st_size / 2**20, 2), "finite": bool(finite),
            "input_shape": [list(feeds[k].shape) for k in feeds][0]}


def run_arch(source: str, name: str, side: int, out: Path, exporters=EXPORTERS, dtypes=DTYPES,
             flat: bool = False, dynamic_batch: bool = False) -> list[dict]:
    """All exporter x dtype variants of one architecture (runs in its own process)."""
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = create(source, name, side)
    calibrate(model, (CALIBRATION_BATCH, 3, side, side))
    setup_s = time.perf_counter() - t0
    entries = []
    for exporter in exporters:
        for dtype in dtypes:
            path = out / f"{name}.onnx" if flat else out / exporter / dtype / f"{name}.onnx"
            e = {"arch": name, "source": source, "exporter": exporter, "dtype": dtype,
                 "path": str(path.relative_to(out)), "external": False, "side": side}
            t = time.perf_counter()
            try:
                export_one(model, exporter, dtype, side, path, dynamic_batch)
                e["export_s"] = round(time.perf_counter() - t + setup_s / 4, 2)
                e.update(describe(path))
                if not e["finite"]:
                    raise ValueError("ONNX Runtime output is not finite")
                if e["bn"] == 0:
                    raise ValueError("the export has no BatchNormalization left")
                e["ok"] = True
            except Exception as exc:  # recorded, not fatal: one variant should not stop the rest
                e.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
                e.setdefault("export_s", round(time.perf_counter() - t, 2))
                if path.exists():
                    path.replace(path.with_suffix(".failed.onnx"))
            entries.append(e)
            print(f"{name:24s} {exporter:11s} {dtype:7s} "
                  + (f"{e['bn']:4d} BN {e['nodes']:5d} nodes {e['mb']:6.1f} MB {e['export_s']:6.1f} s" if e["ok"]
                     else f"FAILED {e['error'][:120]}"), flush=True)
    return entries


def external_copy(entry: dict, out: Path) -> dict:
    """Copy one export with every tensor over 1 KiB in a side file (external data)."""
    import onnx

    src = out / entry["path"]
    dst = out / "external" / f"{entry['exporter']}-{entry['dtype']}-{entry['arch']}" / f"{entry['arch']}.onnx"
    dst.parent.mkdir(parents=True, exist_ok=True)
    m = onnx.load(str(src))
    onnx.save_model(m, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{entry['arch']}.data", size_threshold=1024)
    e = dict(entry, path=str(dst.relative_to(out)), external=True,
             mb=round(dst.stat().st_size / 2**20, 3))
    return e


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="architectures to export [default: all of ARCHS]")
    ap.add_argument("--out", type=Path, default=Path("/work/corpus"))
    ap.add_argument("--jobs", type=int, default=2, help="architectures exported in parallel processes")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per architecture")
    ap.add_argument("--exporters", default=",".join(EXPORTERS), help="comma-separated [default: %(default)s]")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated [default: %(default)s]")
    ap.add_argument("--side", type=int, help="input height and width for every architecture [default: per ARCHS]")
    ap.add_argument("--flat", action="store_true",
                    help="write OUT/<arch>.onnx (one exporter and dtype only; no external-data copies)")
    ap.add_argument("--dynamic-batch", action="store_true",
                    help="a dynamic batch axis (torchscript exporter only), as benchmarks/calibration.py needs")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: export one architecture, print JSON
    args = ap.parse_args()
    out = args.out.resolve()
    exporters, dtypes = args.exporters.split(","), args.dtypes.split(",")
    if not set(exporters) <= set(EXPORTERS) or not set(dtypes) <= set(DTYPES) or (
            args.flat and len(exporters) * len(dtypes) != 1):
        sys.exit(f"--exporters from {EXPORTERS}, --dtypes from {DTYPES}; --flat takes one of each")
    if args.dynamic_batch and exporters != ["torchscript"]:
        sys.exit("--dynamic-batch needs --exporters torchscript")
    if args.one:
        source, name, side = next(a for a in ARCHS if a[1] == args.one)
        entries = run_arch(source, name, args.side or side, out, exporters, dtypes, args.flat, args.dynamic_batch)
        (out / "parts").mkdir(parents=True, exist_ok=True)
        (out / "parts" / f"{name}.json").write_text(json.dumps(entries, indent=1))
        return
    archs = [a for a in ARCHS if not args.names or a[1] in args.names]
    unknown = set(args.names) - {a[1] for a in ARCHS}
    if unknown:
        sys.exit(f"unknown architecture(s): {', '.join(sorted(unknown))} (add them to ARCHS)")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def one(arch) -> list[dict]:
        source, name, side = arch
        part = out / "parts" / f"{name}.json"
        part.unlink(missing_ok=True)
        t = time.perf_counter()
        try:
            cmd = [sys.executable, __file__, "--out", str(out), "--one", name, "--exporters", args.exporters,
                   "--dtypes", args.dtypes]
            cmd += (["--side", str(args.side)] if args.side else []) + (["--flat"] if args.flat else [])
            cmd += ["--dynamic-batch"] if args.dynamic_batch else []
            p = subprocess.run(cmd,
                               timeout=args.timeout, capture_output=True, text=True)
            sys.stdout.write("".join(line for line in p.stdout.splitlines(True)
                                       if not line.startswith("[torch.onnx]")))
            if part.exists():
                return json.loads(part.read_text())
            why = f"exporter process exited {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1][:200]}"
        except subprocess.TimeoutExpired:
            why = f"timed out after {args.timeout} s"
        print(f"{name:24s} FAILED {why}", flush=True)
        return [{"arch": name, "source": source, "exporter": ex, "dtype": dt, "ok": False, "error": why,
                 "export_s": round(time.perf_counter() - t, 1)} for ex in exporters for dt in dtypes]

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        entries = [e for part in pool.map(one, archs) for e in part]
    for e in list(entries):
        if (e["ok"] and not args.flat and e["arch"] in EXTERNAL and e["exporter"] == "torchscript"
                and e["dtype"] == "float32"):
            entries.append(external_copy(e, out))
    manifest_path = out / "manifest.json"
    old = json.loads(manifest_path.read_text())["models"] if manifest_path.exists() and args.names else []
    done = {e["arch"] for e in entries}
    entries = [e for e in old if e["arch"] not in done] + entries
    ok = [e for e in entries if e["ok"]]
    manifest = {"created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "export_wall_s": round(time.perf_counter() - t0, 1),
                "versions": versions(), "archs_ok": len({e["arch"] for e in ok}),
                "files_ok": len(ok), "files_failed": len(entries) - len(ok), "models": entries}
    tmp = manifest_path.with_suffix(".part")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, manifest_path)
    print(f"{manifest['archs_ok']} architectures, {len(ok)} files exported, {manifest['files_failed']} failed, "
          f"{manifest['export_wall_s']:.0f} s; manifest {manifest_path}")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    v = {}
    for pkg in ("torch", "torchvision", "timm", "onnx", "onnxruntime", "onnxscript"):
        try:
            v[pkg] = version(pkg)
        except PackageNotFoundError:
            v[pkg] = None
    return v


if __name__ == "__main__":
    main()
