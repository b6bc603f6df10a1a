"""Running models through ONNX Runtime: the only module that imports it (lazily).

Sessions always load models by path (external data resolves next to the model)
and run with graph optimisations disabled, so that ONNX Runtime's own Conv+BN and
MatMul+BN fusions cannot hide or cause differences. The CUDA provider runs with
TF32 disabled so float32 results are comparable.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import BnfoldError, MissingDependencyError

CPU = "cpu"
CUDA = "cuda"
PROVIDER_NAMES = {CPU: "CPUExecutionProvider", CUDA: "CUDAExecutionProvider"}
INSTALL_HINT = "pip install 'bnfold[cpu]' (or 'bnfold[gpu]' for CUDA; never both)"
# Models up to this size may fall back to onnx.reference when ONNX Runtime has no kernel.
REFERENCE_FALLBACK_BYTES = 64 * 2**20


def ort():
    """The onnxruntime module, or a clear error saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError(f"ONNX Runtime is not installed: {INSTALL_HINT}") from None
    return onnxruntime


def session_options(optimized: bool = False):
    """Graph optimisations off (ORT's own BN fusions must not hide or cause differences), quiet.
    ``optimized``: ONNX Runtime's default level, for runs that only measure graph outputs."""
    rt = ort()
    so = rt.SessionOptions()
    if not optimized:
        so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return so


def provider_list(provider: str) -> list:
    if provider == CUDA:
        # CPU stays as a fallback for ops with no CUDA kernel, as ONNX Runtime intends.
        return [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@functools.lru_cache(maxsize=None)
def cuda_status() -> Tuple[bool, str]:
    """Whether the CUDA provider really works here, and if not, why.

    ``get_available_providers()`` lists CUDA in onnxruntime-gpu even without a GPU
    or CUDA libraries, so this creates a session and checks what it actually uses.
    """
    rt = ort()
    if "CUDAExecutionProvider" not in rt.get_available_providers():
        return False, "this ONNX Runtime build has no CUDA provider (install onnxruntime-gpu instead of onnxruntime)"
    try:
        from onnx import TensorProto, helper

        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        probe.ir_version = 7
        sess = rt.InferenceSession(probe.SerializeToString(), session_options(), providers=provider_list(CUDA))
    except Exception as e:  # the provider library failed to load or initialise
        return False, f"the CUDA provider failed to start ({_first_line(e)})"
    if sess.get_providers()[0] != "CUDAExecutionProvider":
        return False, "the CUDA provider is installed but a session fell back to the CPU (no GPU or CUDA/cuDNN libraries)"
    return True, ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


@dataclass
class Runner:
    """One model on one provider, by path."""

    path: str
    provider: str
    session: object = None
    reference_fallback: bool = False
    output_names: Sequence[str] = ()
    inputs: Sequence[object] = ()  # InputSpec: what a caller must feed

    def run(self, feeds: Dict[str, np.ndarray], outputs: Optional[List[str]] = None) -> Dict[str, np.ndarray]:
        names = list(outputs or self.output_names)
        if self.reference_fallback:
            values = self.session.run(names, feeds)
        else:
            try:
                values = self.session.run(names, feeds)
            except Exception as e:
                raise BnfoldError(f"ONNX Runtime failed to run it ({_first_line(e)})", self.path) from None
        return dict(zip(names, values))


def open_runner(path: str, provider: str, *, optimized: bool = False) -> Runner:
    """A session for the model at ``path`` on ``provider`` (optimisations disabled).

    On the CPU, a small model ONNX Runtime has no kernel for (e.g. float64 Conv)
    falls back to ``onnx.reference.ReferenceEvaluator``.
    """
    rt = ort()
    try:
        sess = rt.InferenceSession(os.fspath(path), session_options(optimized), providers=provider_list(provider))
    except Exception as e:
        msg = _first_line(e)
        no_kernel = "NOT_IMPLEMENTED" in str(e) or "Could not find an implementation" in str(e)
        if provider == CPU and no_kernel and os.path.getsize(path) <= REFERENCE_FALLBACK_BYTES:
            return _reference_runner(path)
        raise BnfoldError(f"ONNX Runtime cannot load it ({msg})", path) from None
    from .inputs import InputSpec, dtype_of_ort_type

    specs = [InputSpec(i.name, dtype_of_ort_type(i.type), tuple(i.shape)) for i in sess.get_inputs()]
    return Runner(os.fspath(path), provider, sess, False, [o.name for o in sess.get_outputs()], specs)


def _reference_runner(path: str) -> Runner:
    from onnx.reference import ReferenceEvaluator

    from .modelio import load_model

    from .inputs import input_specs

    model = load_model(path)
    ev = ReferenceEvaluator(model)
    return Runner(os.fspath(path), CPU, ev, True, [o.name for o in model.graph.output], input_specs(model))
