"""The large-model benchmark: fold a >= 3 GB external-data Conv/BN model.

    python benchmarks/large_model.py [--layers 22] [--channels 2048]

Targets (issue: production scale): peak RSS <= 3 x the largest tensor + 300 MB, and
wall time <= 1.5 x copying the model's files (median of the per-round ratios). Prints the figures and writes
benchmarks/LARGE.md. The model is generated once into benchmarks/work/large/.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(args) -> tuple:
    p = subprocess.run(["/usr/bin/time", "-f", "@@%e %M"] + args, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{args[0]} failed: {p.stderr[-500:]}")
    wall, rss = [ln for ln in p.stderr.splitlines() if ln.startswith("@@")][-1][2:].split()
    return float(wall), int(rss) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--channels", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=6, help="paired rounds (cp and bnfold, alternating which goes first)")
    args = ap.parse_args()
    work = HERE / "work" / "large"
    src, out, copy = work / "src", work / "out", work / "copy"
    for d in (src, out, copy):
        d.mkdir(parents=True, exist_ok=True)
    model = src / f"conv{args.layers}x{args.channels}.onnx"
    if not model.exists():
        subprocess.run([sys.executable, str(HERE / "make_large_model.py"), str(model), "--layers", str(args.layers),
                        "--channels", str(args.channels)], check=True)
    data_bytes = Path(str(model) + ".data").stat().st_size
    largest = args.channels * args.channels * 9 * 4
    copies, folds = [], []
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(HERE.parent / "bnfold")], check=True)

    def run_copy() -> None:
        shutil.rmtree(copy)
        copy.mkdir()
        copies.append(timed(["cp", str(model), str(model) + ".data", str(copy)]))
        shutil.rmtree(copy)  # its page cache goes back before the next run
        copy.mkdir()

    def fold() -> tuple:
        for f in out.iterdir():
            f.unlink()
        return timed([sys.executable, "-m", "bnfold", "fuse", str(model), "-o", str(out / "big.onnx"),
                      "--no-verify", "-q"])

    def run_fold() -> None:
        folds.append(fold())
        for f in out.iterdir():  # as the copy's: its page cache goes back before the next run
            f.unlink()

    for k in range(args.repeat):
        # the order alternates: on this virtual machine the first large write after a pause runs
        # up to 10x slower than the next (the host backs freshly reused memory again), whatever writes
        for run_one in ((run_copy, run_fold) if k % 2 == 0 else (run_fold, run_copy)):
            run_one()
    fold()  # an output for the verification below (untimed)
    copy_s = statistics.median(c[0] for c in copies)
    fold_s = statistics.median(f[0] for f in folds)
    ratios = [f[0] / c[0] for f, c in zip(folds, copies)]  # paired: the copy and the fold of one round
    ratio = statistics.median(ratios)
    rss = max(f[1] for f in folds)
    t = time.perf_counter()
    v = subprocess.run([sys.executable, "-m", "bnfold", "verify", str(model), str(out / "big.onnx"), "--samples", "1",
                        "--providers", "cpu"], capture_output=True, text=True)
    verify_s = time.perf_counter() - t
    budget_rss = 3 * largest / 2**20 + 300
    lines = [
        "# Large-model benchmark", "",
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores; "
        f"`python benchmarks/large_model.py` ({args.repeat} rounds, each a `cp` of the model's files and a "
        "`bnfold fuse` of it, in alternating order, outputs removed between runs; on this virtual machine a "
        "large write's time varies up to 10× with the host's memory state, so the paired ratio is the figure).", "",
        f"Model: {args.layers} × (Conv {args.channels}→{args.channels} 3×3 + BN + ReLU), "
        f"{data_bytes / 2**30:.2f} GiB of external data, largest tensor {largest / 2**20:.0f} MiB.", "",
        "| measure | figure | target | met |", "|---|---|---|---|",
        f"| peak RSS of `bnfold fuse --no-verify` | {rss:.0f} MB | ≤ 3 × {largest / 2**20:.0f} + 300 = "
        f"{budget_rss:.0f} MB | {'yes' if rss <= budget_rss else 'no'} |",
        f"| wall time of `bnfold fuse --no-verify` / `cp` of the files, paired by round | {ratio:.2f}× "
        f"(range {min(ratios):.2f}–{max(ratios):.2f}×; medians {fold_s:.1f} s and {copy_s:.1f} s) | ≤ 1.5× | "
        f"{'yes' if ratio <= 1.5 else 'no'} |",
        f"| `bnfold verify` of the output (1 sample, CPU) | {verify_s:.1f} s, "
        f"{'equivalent' if v.returncode == 0 else 'NOT equivalent (exit %d)' % v.returncode} | — | — |",
    ]
    lines += ["", "Per round (which of the two ran first alternates):", "",
              "| round | first | `cp` s | `bnfold fuse` s | ratio |", "|---|---|---|---|---|"]
    for k, (c, f) in enumerate(zip(copies, folds)):
        lines.append(f"| {k + 1} | {'cp' if k % 2 == 0 else 'bnfold'} | {c[0]:.1f} | {f[0]:.1f} | {f[0] / c[0]:.2f}× |")
    text = "\n".join(lines) + "\n"
    (HERE / "LARGE.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
