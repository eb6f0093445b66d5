"""Native CPU kernels, compiled on first use with the machine's C compiler.

The engine's hot loops that PyTorch cannot express without copies or many small operators (attention
straight over the paged KV cache, the int8 quantise/rescale passes around an int8 matmul, residual
add + RMSNorm or LayerNorm, SiLU-and-multiply, tanh GELU, matmuls straight on GGUF's quantised weight blocks, the
mixture-of-experts grouped matmul over packed expert weights) are written in C here. The source ships with the package; the first process that needs a
kernel compiles it (``-O3 -march=native``, a second or so) into a cache directory keyed by the
source, the compiler and the CPU, and every later process loads the cached library. Without a C
compiler, or with ``SERVEKIT_KERNELS=0``, every caller falls back to its pure PyTorch path.
``SERVEKIT_AMX=0`` keeps the GEMM on its vector path on a CPU with AMX tiles (``amx_tiles.h``).

Cache directory: ``$SERVEKIT_CACHE_DIR/kernels``, else ``$XDG_CACHE_HOME/servekit/kernels``, else
``~/.cache/servekit/kernels``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from servekit.cpu import cpu_signature

logger = logging.getLogger(__name__)

SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in (
        "paged_attention.c",
        "int8_rows.c",
        "elementwise.c",
        "quantized_matmul.c",
        "rotary_cache.c",
        "quantized_gemm.c",
        "expert_matmul.c",
        "q8_rows.c",
        "decode_step.c",
    )
)
HEADERS = tuple(Path(__file__).with_name(name) for name in ("dtypes.h", "hsum.h", "blocks.h", "amx_tiles.h"))
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC", "-shared", "-pthread")
OPENMP_FLAGS = ("-fopenmp",)  # dropped when the compiler has no OpenMP (then plain threads)


# The storage types the kernels read and write, as the codes their ``dtype`` arguments take.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def kernels_available(*dtypes: torch.dtype) -> bool:
    """Whether the kernels are built (or can be) and handle every one of ``dtypes``."""
    return all(dtype in DTYPE_CODES for dtype in dtypes) and load_library() is not None


def attention_simd_lanes() -> int:
    """The float32 lanes of the attention kernel's vector path on this CPU (16: AVX-512, 8: AVX2 +
    FMA + F16C, 1: the portable loop; 0: no kernels)."""
    library = load_library()
    return 0 if library is None else int(library.attention_simd_lanes())


def _flag_enabled(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def kernels_enabled() -> bool:
    return _flag_enabled("SERVEKIT_KERNELS")


def cache_dir() -> Path:
    if os.environ.get("SERVEKIT_CACHE_DIR"):
        return Path(os.environ["SERVEKIT_CACHE_DIR"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "servekit" / "kernels"


def _compiler() -> str | None:
    configured = os.environ.get("CC")
    if configured:
        return shutil.which(configured)
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: processes starting together never load a half-written file.
    handle, scratch = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        command = [compiler, *FLAGS, "-o", scratch, *map(str, SOURCES), "-lm"]
        try:
            subprocess.run([*command, *OPENMP_FLAGS], check=True, capture_output=True, text=True, timeout=300)
        except subprocess.CalledProcessError:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)


_POINTER, _INT, _INT64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
_SIGNATURES: dict[str, list[type]] = {
    # query, cache (one layer), block tables int32 [seqs, max_blocks], context lengths int32, out;
    # seqs, heads, kv heads, head_dim, block_size, max_blocks, window, dtype, kv dtype; scale; threads
    "paged_decode_attention": [*[_POINTER] * 5, *[_INT] * 9, ctypes.c_float, _INT],
    # x, x dtype, rows, cols, out int8, scales float32
    "quantize_rows_int8": [_POINTER, _INT, _INT64, _INT64, _POINTER, _POINTER],
    # acc int32, rows, cols, row scales, column scales, bias (or NULL), out, out dtype
    "dequantize_int32": [_POINTER, _INT64, _INT64, _POINTER, _POINTER, _POINTER, _POINTER, _INT],
    # hidden (updated in place), delta, extra (each or NULL), weight, bias (or NULL), out, rows, cols,
    # eps, rms (else LayerNorm), dtype
    "add_norm": [*[_POINTER] * 6, _INT64, _INT64, ctypes.c_float, _INT, _INT],
    # gate_up [rows, 2 * cols], out [rows, cols], rows, cols, dtype
    "silu_mul": [_POINTER, _POINTER, _INT64, _INT64, _INT],
    # x, out (same shape, contiguous), elements, dtype
    "gelu_tanh": [_POINTER, _POINTER, _INT64, _INT],
    "attention_simd_lanes": [],
    # qkv float32, row stride, cos, sin (or NULL), rotary dim, slots int64, cache, cache dtype;
    # tokens, heads, kv heads, head_dim, block_size
    "rotary_write_kv": [
        _POINTER,
        _INT64,
        _POINTER,
        _POINTER,
        _INT64,
        _POINTER,
        _POINTER,
        _INT,
        *[_INT64] * 5,
    ],
    # x float32, rows, cols (K), weight blocks, out rows (N), bytes per weight row, GGML type, bias (or
    # NULL), out float32, threads
    "quantized_matmul": [_POINTER, _INT64, _INT64, _POINTER, _INT64, _INT64, _INT, _POINTER, _POINTER, _INT],
    # the same, 8-bit activations (Q4_0, Q4_1, Q8_0)
    "q8_matmul": [_POINTER, _INT64, _INT64, _POINTER, _INT64, _INT64, _INT, _POINTER, _POINTER, _INT],
    # x float32, rows, K; gate_up blocks, bytes per row, type; intermediate; down blocks, bytes per
    # row, type; scratch float32, out float32, threads
    "quantized_silu_mlp": [
        _POINTER,
        _INT64,
        _INT64,
        _POINTER,
        _INT64,
        _INT,
        _INT64,
        _POINTER,
        _INT64,
        _INT,
        _POINTER,
        _POINTER,
        _INT,
    ],
    # weight blocks, bytes per row, GGML type, K, row indices int64, count, out float32
    "dequantize_rows": [_POINTER, _INT64, _INT, _INT64, _POINTER, _INT64, _POINTER],
    "quantized_simd_lanes": [],
    # x float32, rows (M), cols (K), weight blocks, out rows (N), bytes per weight row, GGML type,
    # bias (or NULL), out float32, threads
    "quantized_gemm": [_POINTER, _INT64, _INT64, _POINTER, _INT64, _INT64, _INT, _POINTER, _POINTER, _INT],
    "quantized_gemm_lanes": [],
    # enable: 0 off, 1 on where the CPU allows, -1 ask
    "quantized_gemm_tiles": [_INT],
    # x float32, its rows, K, x rows int32 (or NULL), group ends int32, group experts int32, groups, experts,
    # packed weights, N, out, out rows int32 (or NULL), scale float32 (or NULL), gated, threads
    "expert_matmul": [
        _POINTER,
        _INT64,
        _INT64,
        _POINTER,
        _POINTER,
        _POINTER,
        _INT,
        _INT,
        _POINTER,
        _INT64,
        _POINTER,
        _POINTER,
        _POINTER,
        _INT,
        _INT,
    ],
    # chosen int64, slots, top_k, experts, order int32, tokens int32, ends int32
    "expert_order": [_POINTER, _INT64, _INT, _INT, _POINTER, _POINTER, _POINTER],
    "expert_panel_columns": [],
    # model struct, token, position, block table int32, its length, cos, sin (or NULL), logits, threads
    "decode_step": [_POINTER, _INT64, _INT64, _POINTER, _INT64, _POINTER, _POINTER, _POINTER, _INT],
    # model struct, tokens int64, positions int64, block tables int32 [B][max blocks], max blocks,
    # cos and sin tables (or NULL), logits, B, threads
    "decode_step_batch": [
        _POINTER,
        _POINTER,
        _POINTER,
        _POINTER,
        _INT64,
        _POINTER,
        _POINTER,
        _POINTER,
        _INT64,
        _INT,
    ],
    # threads, rounds
    "decode_phases_check": [_INT, _INT64],
}
_RETURNS_INT = (
    "paged_decode_attention",
    "attention_simd_lanes",
    "quantized_matmul",
    "q8_matmul",
    "quantized_silu_mlp",
    "dequantize_rows",
    "quantized_simd_lanes",
    "quantized_gemm",
    "quantized_gemm_lanes",
    "quantized_gemm_tiles",
    "expert_matmul",
    "expert_order",
    "expert_panel_columns",
    "decode_step",
    "decode_step_batch",
)
_RETURNS_INT64 = ("decode_phases_check",)


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernels, building them if needed; None when disabled or impossible here."""
    if not kernels_enabled():
        return None
    compiler = _compiler()
    if compiler is None:
        logger.warning(
            "no C compiler found: using the PyTorch paths instead of the C kernels (slower on CPU)"
        )
        return None
    try:
        version = subprocess.run(
            [compiler, "--version"], check=True, capture_output=True, text=True, timeout=60
        ).stdout
        key = hashlib.sha256(
            "\0".join(
                [
                    *(source.read_text() for source in (*SOURCES, *HEADERS)),
                    compiler,
                    version,
                    " ".join(FLAGS),
                    cpu_signature(),
                ]
            ).encode()
        ).hexdigest()[:16]
        target = cache_dir() / f"servekit_kernels-{key}.so"
        if not target.exists():
            logger.info("compiling servekit's CPU kernels into %s", target)
            _build(compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        logger.warning("could not build servekit's CPU kernels (%s): using the PyTorch path", detail)
        return None
    for name, argtypes in _SIGNATURES.items():
        function = getattr(library, name)
        function.restype = (
            ctypes.c_int64 if name in _RETURNS_INT64 else ctypes.c_int if name in _RETURNS_INT else None
        )
        function.argtypes = argtypes
    if not _flag_enabled("SERVEKIT_AMX"):
        library.quantized_gemm_tiles(0)
    return library
