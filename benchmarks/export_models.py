"""Export real architectures from timm to ONNX with BatchNormalization preserved.

Run in the benchmark environment (see benchmarks/requirements.txt), never needed by
bnfold itself:

    python benchmarks/export_models.py [--out benchmarks/work/models] [NAME ...]

timm gives random weights (no hub downloads here), so each BN first gets
trained-like statistics: running mean/var are *measured* on random input (one
training-mode pass with a cumulative average), then gamma and beta are perturbed.
The TorchScript exporter with ``training=PRESERVE`` keeps BN nodes in eval mode.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT = ["resnet18", "resnet50", "mobilenetv2_100", "efficientnet_b0", "densenet121", "levit_128s",
           "repvgg_a0", "mobileone_s0", "mixnet_s", "regnetx_002"]


def calibrate(model, shape, seed: int = 0) -> None:
    import torch

    torch.manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: running stats = measured stats
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(*shape))
    model.eval()


def export(name: str, out: Path, batch: int = 8) -> Path:
    import timm
    import torch

    model = timm.create_model(name, pretrained=False)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = cfg.get("input_size", (3, 224, 224))
    calibrate(model, (batch,) + tuple(size))
    path = out / f"{name}.onnx"
    x = torch.randn(1, *size)
    torch.onnx.export(model, (x,), str(path), dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                      opset_version=17, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=DEFAULT)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "work" / "models")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import onnx

    for name in args.names:
        t = time.perf_counter()
        try:
            path = export(name, args.out)
        except Exception as e:  # report and go on: one architecture should not stop the rest
            print(f"{name}: export failed: {type(e).__name__}: {e}")
            continue
        m = onnx.load(str(path), load_external_data=False)
        bn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
        print(f"{name}: {bn} BN, {len(m.graph.node)} nodes, {path.stat().st_size / 2**20:.1f} MB "
              f"({time.perf_counter() - t:.1f} s)")


if __name__ == "__main__":
    main()
