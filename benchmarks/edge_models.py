"""Edge-case models where BN-folding tools are known to miss or break things.

    python benchmarks/edge_models.py [OUT_DIR]      # default benchmarks/work/edge

Each model is small, valid (ONNX checker, full_check) and runs in ONNX Runtime.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
from onnx import helper, numpy_helper

HEAD = '<ir_version: 8, opset_import: ["" : 15]>'


def _stats(c, seed, dtype=np.float32, prefix=""):
    rng = np.random.default_rng(seed)
    return {f"{prefix}s": rng.uniform(0.5, 1.5, c).astype(dtype), f"{prefix}b": rng.normal(0, 0.5, c).astype(dtype),
            f"{prefix}m": rng.normal(0, 1, c).astype(dtype),
            f"{prefix}v": (10.0 ** rng.uniform(-2, 1, c)).astype(dtype)}


def _w(*shape, seed=1, dtype=np.float32):
    return np.random.default_rng(seed).normal(0, 1 / np.sqrt(np.prod(shape[1:]) or 1), shape).astype(dtype)


def _model(text, **arrays):
    m = onnx.parser.parse_model(text)
    for k, v in arrays.items():
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(v), k))
    return m


def bn_then_conv():
    """BN on the input, then an unpadded Conv: exact to fold forward."""
    return _model(f"""{HEAD}
    g (float[N,8,16,16] x) => (float[N,16,16,16] y) {{
        z = BatchNormalization (x, s, b, m, v)
        y = Conv (z, W, B)
    }}""", W=_w(16, 8, 1, 1), B=_w(16, seed=2), **_stats(8, 3))


def matmul_add_bn():
    """Linear with bias as MatMul + Add, then BatchNorm1d."""
    return _model(f"""{HEAD}
    g (float[N,64] x) => (float[N,32] y) {{
        mm = MatMul (x, W)
        c = Add (mm, B)
        z = BatchNormalization (c, s, b, m, v)
        y = Relu (z)
    }}""", W=_w(64, 32), B=_w(32, seed=2), **_stats(32, 3))


def gemm_bn():
    """Linear as Gemm (transB=1), then BatchNorm1d."""
    return _model(f"""{HEAD}
    g (float[N,64] x) => (float[N,32] y) {{
        c = Gemm <transB = 1> (x, W, B)
        z = BatchNormalization (c, s, b, m, v)
        y = Relu (z)
    }}""", W=_w(32, 64), B=_w(32, seed=2), **_stats(32, 3))


def grouped_convtranspose_bn():
    return _model(f"""{HEAD}
    g (float[N,16,8,8] x) => (float[N,32,16,16] y) {{
        c = ConvTranspose <group = 4, strides = [2, 2], pads = [1, 1, 1, 1], output_padding = [1, 1]> (x, W, B)
        y = BatchNormalization (c, s, b, m, v)
    }}""", W=_w(16, 8, 3, 3), B=_w(32, seed=2), **_stats(32, 3))


def mixed_precision_bn15():
    """float16 Conv followed by BatchNormalization-15 with float32 parameters."""
    return _model(f"""{HEAD}
    g (float16[N,8,16,16] x) => (float16[N,16,16,16] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y = BatchNormalization (c, s, b, m, v)
    }}""", W=_w(16, 8, 3, 3, dtype=np.float16), **_stats(16, 3))


def float16_overflow():
    """A finite float16 model whose folded weights would pass 65504 (small inputs, large
    weight x BN scale): folding must refuse rather than write inf."""
    stats = _stats(8, 3, np.float16)
    stats["v"][:] = 1e-4
    stats["s"][:] = 8.0
    return _model(f"""{HEAD}
    g (float16[N,8,16,16] x) => (float16[N,8,16,16] y) {{
        small = Mul (x, k)
        c = Conv (small, W)
        y = BatchNormalization <epsilon = 1e-7> (c, s, b, m, v)
    }}""", k=np.array(1e-3, np.float16), W=_w(8, 8, 1, 1, dtype=np.float16) * np.float16(300), **stats)


def name_collisions():
    """Initializer and tensor names that generated names are likely to take."""
    names = ["conv_bias", "conv.bias", "W_fused", "B_fused", "W_bn", "conv_W", "conv_B", "bias", "W__1",
             "conv_weight_bnfold", "conv_bias_bnfold", "c_bias", "W_folded", "W_0", "B"]
    extra = {n: np.full(4, i, np.float32) for i, n in enumerate(names)}
    adds = "\n".join(f"        a{i} = Add ({'y0' if i == 0 else f'a{i - 1}'}, {n!r})".replace("'", "")
                     for i, n in enumerate(names))
    text = f"""{HEAD}
    g (float[N,4,8,8] x) => (float[N,4,8,8] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y0 = BatchNormalization (c, s, b, m, v)
{adds}
        y = Identity (a{len(names) - 1})
    }}"""
    m = onnx.parser.parse_model(text.replace("conv.bias", "conv_dot_bias"))
    for n in m.graph.node:
        n.input[:] = ["conv.bias" if i == "conv_dot_bias" else i for i in n.input]
    m.graph.node[0].name = "conv"
    for k, v in {**extra, "W": _w(4, 4, 3, 3), **_stats(4, 3)}.items():
        m.graph.initializer.append(numpy_helper.from_array(v.reshape(4, 1, 1) if k in extra else v, k))
    return m


def spatial0_bn7():
    """BatchNormalization-7 with spatial=0 (per-activation parameters)."""
    stats = {k: np.broadcast_to(v[:, None, None], (4, 8, 8)).copy() for k, v in _stats(4, 3).items()}
    m = _model("""<ir_version: 3, opset_import: ["" : 7]>
    g (float[N,4,8,8] x, float[4,4,3,3] W, float[4,8,8] s, float[4,8,8] b, float[4,8,8] m, float[4,8,8] v)
      => (float[N,4,8,8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        y = BatchNormalization <spatial = 0> (c, s, b, m, v)
    }""", W=_w(4, 4, 3, 3), **stats)
    return m


def matmul_transpose_bn():
    """MatMul [8, C] -> Transpose -> BN over the 8 rows: BN's channels are not the MatMul's
    features, so nothing may fold (ONNX Runtime's MatMul+BN fusion folds it, wrongly)."""
    return _model(f"""{HEAD}
    g (float[8,8] x) => (float[8,8] y) {{
        mm = MatMul (x, W)
        t = Transpose <perm = [1, 0]> (mm)
        y = BatchNormalization (t, s, b, m, v)
    }}""", W=_w(8, 8), **_stats(8, 3))


def matmul3d_bn():
    """3-D MatMul output fed straight to BN: BN normalises axis 1 (tokens), not the features."""
    return _model(f"""{HEAD}
    g (float[N,12,8] x) => (float[N,12,12] y) {{
        mm = MatMul (x, W)
        y = BatchNormalization (mm, s, b, m, v)
    }}""", W=_w(8, 12), **_stats(12, 3))


def bn_chain():
    """Conv -> BN -> BN, and BN -> BN -> Conv(1x1)."""
    return _model(f"""{HEAD}
    g (float[N,8,16,16] x) => (float[N,8,16,16] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, W)
        d = BatchNormalization (c, as, ab, am, av)
        e = BatchNormalization (d, bs, bb, bm, bv)
        f = Relu (e)
        g1 = BatchNormalization (f, cs, cb, cm, cv)
        g2 = BatchNormalization (g1, ds, db, dm, dv)
        y = Conv (g2, W2)
    }}""", W=_w(8, 8, 3, 3), W2=_w(8, 8, 1, 1, seed=4), **_stats(8, 3, prefix="a"), **_stats(8, 5, prefix="b"),
        **_stats(8, 6, prefix="c"), **_stats(8, 7, prefix="d"))


def if_branch_bn():
    """Conv + BN inside an If branch, parameters from the outer scope."""
    return _model(f"""{HEAD}
    g (bool cond, float[N,8,16,16] x) => (float[N,8,16,16] y) {{
        y = If (cond) <
            then_branch = t () => (float[N,8,16,16] ty) {{
                c = Conv <pads = [1, 1, 1, 1]> (x, W)
                ty = BatchNormalization (c, s, b, m, v)
            }},
            else_branch = e () => (float[N,8,16,16] ey) {{ ey = Conv <pads = [1, 1, 1, 1]> (x, W) }}
        >
    }}""", W=_w(8, 8, 3, 3), **_stats(8, 3))


def vit_bn1d_reshape():
    """Token MatMul [B,T,C] -> Reshape [B*T, C] -> BN -> Reshape back."""
    return _model(f"""{HEAD}
    g (float[N,16,32] x) => (float[N,16,32] y) {{
        mm = MatMul (x, W)
        flat = Reshape (mm, to2d)
        z = BatchNormalization (flat, s, b, m, v)
        y = Reshape (z, to3d)
    }}""", W=_w(32, 32), to2d=np.array([-1, 32], np.int64), to3d=np.array([-1, 16, 32], np.int64),
        **_stats(32, 3))


EDGE = {f.__name__: f for f in (bn_then_conv, matmul_add_bn, gemm_bn, grouped_convtranspose_bn, mixed_precision_bn15,
                                float16_overflow, name_collisions, spatial0_bn7, matmul_transpose_bn, matmul3d_bn,
                                bn_chain, if_branch_bn, vit_bn1d_reshape)}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, make in EDGE.items():
        model = make()
        if model.ir_version < 4:  # IR 3: every initializer is also a graph input
            listed = {i.name for i in model.graph.input}
            for t in model.graph.initializer:
                if t.name not in listed:
                    model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
        onnx.checker.check_model(model, full_check=True)
        (out / f"{name}.onnx").write_bytes(model.SerializeToString())


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "work" / "edge")
