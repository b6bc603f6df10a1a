"""Stable reason codes, and the one type that says why something did not happen.

Every "why not" in bnfold (a BN kept by ``fuse``, an op ``insert`` skipped, a block
``reparameterize`` did not merge, a name that is not a usable constant) is a
:class:`Refusal`: a code from :class:`Reason` plus a sentence naming the node.
The code is part of the public interface (JSON reports, CI policies): never rename
one.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Reason(str, enum.Enum):
    """Why a BatchNormalization was not folded."""

    TRAINING_MODE = "TRAINING_MODE"
    """training_mode=1, or the running/saved statistics outputs are produced."""
    SPATIAL_PER_ACTIVATION = "SPATIAL_PER_ACTIVATION"
    """BatchNormalization-7/8 with spatial=0: parameters per activation, not per channel."""
    NOT_CONSTANT = "NOT_CONSTANT"
    """A BN parameter is a graph input or computed at run time."""
    OVERRIDABLE_PARAMETER = "OVERRIDABLE_PARAMETER"
    """A parameter is an initializer that is also a graph input (IR >= 4): callers may override it."""
    INVALID_PARAMETERS = "INVALID_PARAMETERS"
    """Parameters with the wrong shape, non-finite values, or var + epsilon <= 0."""
    NO_HOST = "NO_HOST"
    """Nothing foldable on either side: the input is not produced by a linear op and the
    output does not feed one that can absorb it exactly."""
    ACTIVATION_BETWEEN = "ACTIVATION_BETWEEN"
    """A non-linearity sits between the linear op and the BN."""
    HOST_OUTPUT_IN_USE = "HOST_OUTPUT_IN_USE"
    """The linear op's output (or a tensor on the way to the BN) feeds other nodes or is a graph output."""
    HOST_WEIGHT_NOT_CONSTANT = "HOST_WEIGHT_NOT_CONSTANT"
    """The linear op's weight or bias is not a constant."""
    QUANTIZED_WEIGHT = "QUANTIZED_WEIGHT"
    """The linear op's weight comes from DequantizeLinear: bnfold never de-quantizes silently."""
    CHANNEL_AXIS_MISMATCH = "CHANNEL_AXIS_MISMATCH"
    """BN's channel axis (1) is not, or cannot be proven to be, the linear op's output-channel axis."""
    CHANNEL_COUNT_MISMATCH = "CHANNEL_COUNT_MISMATCH"
    """BN's channel count differs from the linear op's output channels."""
    FOLLOWING_CONV_PADDED = "FOLLOWING_CONV_PADDED"
    """Folding forward into the next Conv would be inexact: that Conv pads its input."""
    OVERFLOW = "OVERFLOW"
    """A folded weight or bias would not fit the host's dtype (e.g. beyond float16's 65504)."""
    UNSUPPORTED_DTYPE = "UNSUPPORTED_DTYPE"
    """The weights are not float16, bfloat16, float32 or float64."""
    UNSUPPORTED_HOST = "UNSUPPORTED_HOST"
    """The linear op has a form bnfold does not fold (e.g. a non-default domain, a missing weight)."""
    CONSTANT_TOO_LARGE = "CONSTANT_TOO_LARGE"
    """A weight or parameter is computed from constants, but evaluating it would exceed the size cap."""

    # insert: why no BN was put after a chosen op
    NO_ACTIVATION = "NO_ACTIVATION"
    """post-activation placement, but the op's output does not feed a single activation."""
    UNSUPPORTED_WEIGHT = "UNSUPPORTED_WEIGHT"
    """The op's weight is not a float constant, so its channel count and dtype are unknown."""

    # reparameterize: why a sum of parallel branches was not merged into one Conv
    BRANCH_SHARED = "BRANCH_SHARED"
    """A branch's output also feeds something outside the sum."""
    BRANCH_NOT_LINEAR = "BRANCH_NOT_LINEAR"
    """A branch is not a Conv, a BN or the plain input, or its weights are not constant."""
    BRANCH_MISMATCH = "BRANCH_MISMATCH"
    """The branches' Convs differ in strides, groups, dilations, shapes, padding alignment or dtype."""
    IDENTITY_BRANCH_INEXACT = "IDENTITY_BRANCH_INEXACT"
    """An identity branch needs stride 1, equal in/out channels and a size-keeping kernel."""

    def __str__(self) -> str:  # so f-strings and click print the code
        return self.value


@dataclass(frozen=True)
class Refusal:
    """Why something did not happen: a stable code and one sentence naming the node."""

    reason: Reason
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"
