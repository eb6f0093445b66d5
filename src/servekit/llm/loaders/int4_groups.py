"""AWQ and GPTQ checkpoints: 4-bit weights in groups, each group with a scale and a zero point.

Both store a quantised projection ``{prefix}`` as ``qweight`` (eight 4-bit values per int32),
``qzeros`` (the groups' zero points, packed the same way), ``scales`` (float16 ``[groups, out]``)
and, for GPTQ, ``g_idx`` (each input channel's group). A weight is ``w[o, i] = (q - z) * s`` of
its group. They differ in how they pack:

- AWQ (``version: gemm``): ``qweight`` is ``[in, out / 8]``, its eight nibbles the output columns
  ``0, 2, 4, 6, 1, 3, 5, 7`` of their group of eight; ``qzeros`` ``[groups, out / 8]`` likewise.
- GPTQ: ``qweight`` is ``[in / 8, out]``, nibble ``j`` input row ``8 r + j``; ``qzeros``
  ``[groups, out / 8]`` in plain order, holding ``z - 1`` in the original format
  (``checkpoint_format: gptq``) and ``z`` in ``gptq_v2``.

``q - z`` lies in [-15, 15] and ``s`` is a float16, so each group of 32 weights of one output row is
exactly a GGUF Q8_0 block (a float16 scale, 32 int8 values), and a Q4_0 block (``d * (q' - 8)``)
when ``q - z`` stays in [-8, 7], as with symmetric quantisation (zero point 8). The projections are
repacked once at load into such rows and computed with the exact quantised kernels, the numbers
those of the float32 weight ``(q - z) * s``: Q4_0 rows are as small as the 4-bit file, Q8_0 rows
twice its size (a quarter of float32).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from servekit.llm.kernels.quantized import QuantizedTensor

Q4_0, Q8_0 = 2, 8  # GGML type codes
Q8_0_BLOCK = 32
PARTS = ("qweight", "qzeros", "scales", "g_idx")
AWQ_NIBBLE_COLUMNS = (0, 2, 4, 6, 1, 3, 5, 7)  # the output column each nibble of an AWQ int32 holds
Weight = TypeVar("Weight", torch.Tensor, QuantizedTensor)


class UnsupportedQuantization(ValueError):
    """The checkpoint's ``quantization_config`` is one servekit cannot compute exactly."""


@dataclass(frozen=True)
class Int4Scheme:
    method: str  # "awq" or "gptq"
    group_size: int  # -1: one group over the whole input
    zeros_offset: int  # added to the stored zero points (GPTQ's original format stores z - 1)

    def describe(self) -> str:
        group = "per channel" if self.group_size == -1 else f"group {self.group_size}"
        return f"{self.method.upper()} 4-bit, {group}"


def int4_scheme(config_json: Mapping[str, Any]) -> Int4Scheme | None:
    """The AWQ/GPTQ scheme of a checkpoint's ``config.json``; None when it is not quantised. Other
    methods, bit widths and layouts are refused, naming what is supported."""
    quantization = config_json.get("quantization_config")
    if quantization is None:
        return None
    if not isinstance(quantization, Mapping):
        raise UnsupportedQuantization("config.json: quantization_config must be an object")
    method = str(quantization.get("quant_method", "")).lower()
    if method not in ("awq", "gptq"):
        raise UnsupportedQuantization(
            f"checkpoints quantised with {method or 'an unnamed method'!r} are not supported; "
            "supported: AWQ (version gemm) and GPTQ, 4-bit, or a GGUF file"
        )
    bits = quantization.get("bits", quantization.get("w_bit"))
    if bits != 4:
        raise UnsupportedQuantization(f"{method.upper()} with {bits} bits is not supported: only 4-bit")
    group_size = int(quantization.get("group_size", quantization.get("q_group_size", -1)))
    if group_size != -1 and (group_size <= 0 or group_size % Q8_0_BLOCK):
        raise UnsupportedQuantization(
            f"{method.upper()} group_size {group_size} is not supported: a multiple of {Q8_0_BLOCK}, or -1"
        )
    if method == "awq":
        version = str(quantization.get("version", "gemm")).lower()
        if version != "gemm":
            raise UnsupportedQuantization(f"AWQ version {version!r} is not supported: only 'gemm'")
        if quantization.get("zero_point", True) is not True:
            raise UnsupportedQuantization("AWQ without zero points is not supported")
        return Int4Scheme("awq", group_size, 0)
    checkpoint_format = str(quantization.get("checkpoint_format", "gptq")).lower()
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise UnsupportedQuantization(f"GPTQ checkpoint_format {checkpoint_format!r} is not supported")
    return Int4Scheme("gptq", group_size, 1 if checkpoint_format == "gptq" else 0)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., n]`` -> its eight 4-bit values each, ``[..., n, 8]`` (nibble j = bits 4j..4j+3)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF


def unpack(scheme: Int4Scheme, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(``q - z`` as int8 ``[out, in]``, the scales as float16 ``[out, in / group]`` in input order)."""
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    groups, out_features = scales.shape
    if scheme.method == "awq":
        in_features = qweight.shape[0]
        order = torch.tensor(AWQ_NIBBLE_COLUMNS).argsort()  # nibble holding column c of each eight
        q = _nibbles(qweight)[..., order].reshape(in_features, -1)
        z = _nibbles(qzeros)[..., order].reshape(groups, -1)
    else:
        in_features = qweight.shape[0] * 8
        q = _nibbles(qweight).permute(0, 2, 1).reshape(in_features, -1)
        z = _nibbles(qzeros).reshape(groups, -1) + scheme.zeros_offset
    if q.shape[1] != out_features or z.shape[1] != out_features:
        raise ValueError(
            f"qweight/qzeros/scales disagree: {tuple(q.shape)}, {tuple(z.shape)}, {tuple(scales.shape)}"
        )
    group_of = _groups_of_inputs(scheme, tensors.get("g_idx"), in_features, groups)
    shifted = (q - z[group_of]).to(torch.int8).t().contiguous()
    return shifted, scales.to(torch.float16).t()[:, group_of[::Q8_0_BLOCK]].contiguous()


def _groups_of_inputs(
    scheme: Int4Scheme, g_idx: torch.Tensor | None, in_features: int, groups: int
) -> torch.Tensor:
    """Each input channel's group; refused unless every run of 32 channels shares one group."""
    size = in_features if scheme.group_size == -1 else scheme.group_size
    plain = torch.arange(in_features) // size
    if in_features % Q8_0_BLOCK:
        raise UnsupportedQuantization(f"an input width of {in_features} is not whole blocks of {Q8_0_BLOCK}")
    if g_idx is None or torch.equal(g_idx.to(torch.int64), plain):
        if int(plain[-1]) + 1 != groups:
            raise ValueError(
                f"{groups} groups of scales do not cover {in_features} inputs in groups of {size}"
            )
        return plain
    group_of = g_idx.to(torch.int64)
    runs = group_of.reshape(-1, Q8_0_BLOCK)
    if not torch.equal(runs, runs[:, :1].expand_as(runs)):
        raise UnsupportedQuantization(
            "GPTQ act-order (desc_act) checkpoints whose g_idx interleaves groups are not supported"
        )
    return group_of


def block_rows(shifted: torch.Tensor, scales: torch.Tensor) -> QuantizedTensor:
    """``shifted`` int8 ``[out, in]`` with one float16 scale per 32 inputs as GGUF blocks, exactly:
    Q4_0 (``d * (q - 8)``, as small as the 4-bit file) when every value lies in [-8, 7] (symmetric
    quantisation, zero point 8), else Q8_0."""
    if int(shifted.min()) >= -8 and int(shifted.max()) <= 7:
        return q4_0_rows(shifted, scales)
    return q8_0_rows(shifted, scales)


def q4_0_rows(shifted: torch.Tensor, scales: torch.Tensor) -> QuantizedTensor:
    """Values in [-8, 7] as Q4_0 blocks: a float16 scale, then 16 bytes whose low nibbles are
    values 0-15 of the block and high nibbles values 16-31, each stored plus 8."""
    out_features, in_features = shifted.shape
    nibbles = (shifted.to(torch.int16) + 8).to(torch.uint8).reshape(out_features, -1, 2, Q8_0_BLOCK // 2)
    blocks = torch.empty((out_features, in_features // Q8_0_BLOCK, 2 + Q8_0_BLOCK // 2), dtype=torch.uint8)
    blocks[..., :2] = scales.contiguous().view(torch.uint8).reshape(out_features, -1, 2)
    blocks[..., 2:] = nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)
    return QuantizedTensor(blocks.reshape(out_features, -1), Q4_0, (out_features, in_features))


def q8_0_rows(shifted: torch.Tensor, scales: torch.Tensor) -> QuantizedTensor:
    """``shifted`` int8 ``[out, in]`` with one float16 scale per 32 inputs as Q8_0 blocks."""
    out_features, in_features = shifted.shape
    blocks = torch.empty((out_features, in_features // Q8_0_BLOCK, 2 + Q8_0_BLOCK), dtype=torch.uint8)
    blocks[..., :2] = scales.contiguous().view(torch.uint8).reshape(out_features, -1, 2)
    blocks[..., 2:] = shifted.reshape(out_features, -1, Q8_0_BLOCK).view(torch.uint8)
    return QuantizedTensor(blocks.reshape(out_features, -1), Q8_0, (out_features, in_features))


def float_weight(shifted: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight ``(q - z) * s`` (exact: a 4-bit integer times a float16)."""
    return shifted.float() * scales.float().repeat_interleave(Q8_0_BLOCK, dim=1)


def group_tensors(
    scheme: Int4Scheme,
    tensors: Iterator[tuple[str, torch.Tensor]],
    names: set[str],
    convert: Callable[[torch.Tensor, torch.Tensor], Weight],
) -> Iterator[tuple[str, torch.Tensor | Weight]]:
    """The checkpoint's tensors (``names``: all of theirs) with every quantised projection as one
    ``{prefix}.weight``, made by ``convert`` (``q8_0_rows`` or ``float_weight``) from its ``q - z``
    and scales; the others as stored."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        prefix, _, part = name.rpartition(".")
        if part not in PARTS:
            yield name, tensor
            continue
        found = pending.setdefault(prefix, {})
        found[part] = tensor
        if all(f"{prefix}.{p}" not in names or p in found for p in PARTS):
            if not {"qweight", "qzeros", "scales"} <= found.keys():
                raise ValueError(f"quantised projection {prefix} lacks some of qweight, qzeros, scales")
            shifted, scales = unpack(scheme, pending.pop(prefix))
            yield f"{prefix}.weight", convert(shifted, scales)
    incomplete = {prefix: sorted(parts) for prefix, parts in pending.items()}
    if incomplete:
        raise ValueError(f"quantised projections with missing parts: {incomplete}")
