"""Matrix-vector products with weights pre-packed for the CPU's GEMM library.

oneDNN (mkldnn) can reorder a weight once into its blocked layout; every call then skips the
repacking a plain ``F.linear`` does and runs the kernels tuned for the CPU (AVX-512, AVX512-BF16).
Measured on a 2-core AVX-512 machine it is as fast or faster than ``F.linear`` for the matrix shapes
of small Llama models, most of all in bfloat16 at batch size 1. Falls back to ``F.linear`` wherever
oneDNN is unavailable (or on non-CPU tensors). Float32 weights on a CPU with the C kernels do not
come here: ``layers.make_linear`` gives them to the kernels, which read them in place.

oneDNN compiles one kernel per input shape and keeps it in two caches (ideep's and its own), each
1024 entries by default at about 0.3-1 MB an entry: with the row count changing every step (prefill
chunks of any length), the process grows by hundreds of MB before they fill. ``bound_onednn_caches``
caps them before the first packed weight is made.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from servekit.cpu import cpu_flags
from servekit.llm.kernels import kernels_available
from servekit.llm.kernels.int8 import dequantize, quantize_rows

logger = logging.getLogger(__name__)


# The caches' environment variables, read by ideep and oneDNN when each first creates a kernel.
ONEDNN_CACHE_ENV = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
# Kernels kept per cache: a decode step reuses one row count for all its projections, so this holds
# the recent batch sizes while a prefill's one-off lengths are evicted (measured: RSS then plateaus
# about 50 MB above the start on the tiny test model instead of growing for thousands of requests).
ONEDNN_CACHE_CAPACITY = 64


def bound_onednn_caches() -> None:
    """Cap oneDNN's per-shape kernel caches, unless the user set their variables."""
    for name in ONEDNN_CACHE_ENV:
        os.environ.setdefault(name, str(ONEDNN_CACHE_CAPACITY))


def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Linear:
    """``y = x @ weight.T + bias`` for 2-D ``x``; the weight may be held pre-packed."""

    __slots__ = ("bias", "in_features", "out_features", "packed", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, pack: bool = True) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.packed: torch.Tensor | None = None
        self.weight: torch.Tensor | None = weight
        if pack and weight.device.type == "cpu" and onednn_available():
            bound_onednn_caches()
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
                self.weight = None
            except RuntimeError as error:  # unsupported dtype/shape on this build: keep the plain weight
                logger.debug("oneDNN weight packing unavailable (%s); using F.linear", error)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        assert self.weight is not None
        return F.linear(x, self.weight, self.bias)


# CPU flags (as /proc/cpuinfo names them) of units that multiply int8 with int32 accumulation in
# hardware. Without one, torch._int_mm falls back to a loop ~300x slower than float32 (measured on an
# AVX2-only AMD EPYC: 39 ms against 0.13 ms for [1,576]x[576,1536]), so int8 would be a slowdown.
INT8_DOT_PRODUCT_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "i8mm", "asimddp")
INT8_ANY_CPU_ENV = "SERVEKIT_INT8_ANY_CPU"  # tests of the int8 arithmetic on any CPU, however slow


def int8_dot_product_unit() -> str | None:
    """The CPU's int8 dot-product unit (its flag's name), or None when it has none."""
    flags = cpu_flags()
    return next((flag for flag in INT8_DOT_PRODUCT_FLAGS if flag in flags), None)


def int8_matmul_available() -> bool:
    """Whether int8 matmuls are faster than float32 here: torch has them and the CPU has a unit."""
    if not hasattr(torch, "_int_mm"):
        return False
    forced = os.environ.get(INT8_ANY_CPU_ENV, "").strip().lower() in ("1", "true", "yes")
    return forced or int8_dot_product_unit() is not None


class Int8Linear:
    """``y = x @ weight.T + bias`` in int8: weights per output channel, activations per token.

    The weight is quantised once (symmetric, one scale per output row); each call quantises every
    row of ``x`` on its own (symmetric, one scale per token), multiplies in int8 with int32
    accumulation (VNNI on CPUs that have it) and rescales. Because a row's scale depends only on that
    row and integer accumulation is exact, a token's result does not depend on what else is in the
    batch. A quarter of the float32 weight bytes also keeps small models in the CPU's cache. The
    quantise and rescale passes run as C kernels when they are available (``servekit.llm.kernels``).
    """

    __slots__ = ("bias", "fused", "in_features", "out_features", "scales", "weight_t")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.float().contiguous()
        master = weight.float()
        scales = master.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        quantised = torch.round(master / scales.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
        self.weight_t = quantised.t()  # [in, out] view of the row-major [out, in] int8 weight
        self.scales = scales.contiguous()
        self.fused = kernels_available(torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.device.type == "cpu" and kernels_available(x.dtype):
            quantised, row_scales = quantize_rows(x)
            return dequantize(
                torch._int_mm(quantised, self.weight_t), row_scales, self.scales, self.bias, x.dtype
            )
        source = x.float()
        row_scales = source.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127.0)
        quantised = torch.round(source * row_scales.reciprocal()).clamp_(-127, 127).to(torch.int8)
        out = torch._int_mm(quantised, self.weight_t).float()
        out.mul_(row_scales).mul_(self.scales)
        if self.bias is not None:
            out.add_(self.bias)
        return out if x.dtype == torch.float32 else out.to(x.dtype)
