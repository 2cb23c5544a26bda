"""Fine-grained (blockwise) FP8 quantisation, DeepSeek-V3 section 3.3.2 ("Fine-grained quantization").

A tensor is cut into blocks and each block gets its own FP32 scale, so one outlier only costs precision inside
its own block:

- ``(1, 128)``: activations, per token per 128 channels (the inner dimension of the forward GEMM);
- ``(128, 128)``: weights, per 128 output channels per 128 input channels;
- ``(128, 1)``: activation tiles of the weight-gradient GEMM, 128 tokens per channel (its inner dimension).

Blocks tile the last two dimensions (rows, cols); leading dimensions index independent matrices, so for
``(1, 128)`` a (B, T, C) activation is quantised exactly as its (B*T, C) flattening, and a (E, K, N) stack of
expert weights gets 128x128 blocks per expert. A dimension that is not a multiple of the block is padded with
zeros for the amax and cropped back afterwards: the last, partial block gets its own scale, nothing is dropped.

``TENSOR`` is the coarse baseline the paper's fine-grained scheme is measured against (per-tensor scaling, as in
Transformer Engine's FP8 recipes): one block as large as the matrix, so one scale per matrix (per expert for a
stack) and one outlier sets the scale of every element.
"""

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(FP8_DTYPE).max  # 448.0, the largest finite E4M3 value
AMAX_FLOOR = 1e-12  # "tiny": keeps an all-zero block's scale finite and non-zero (its q is 0 anyway)
BLOCKS = ((1, 128), (128, 128), (128, 1))  # activations, weights, weight-gradient activation tiles
TENSOR = "tensor"  # one block covering the whole matrix: per-tensor scaling


def _check_block(block) -> tuple[int, int] | str:
    block = tuple(block) if isinstance(block, (tuple, list)) else block
    if block not in (*BLOCKS, TENSOR):
        raise ValueError(
            f"block must be one of {BLOCKS} (activations, weights, backward tiles) or {TENSOR!r}, got {block!r}"
        )
    return block


def _block_dims(block, rows: int, cols: int) -> tuple[int, int]:
    """(block rows, block cols); TENSOR spans the whole matrix."""
    return (max(rows, 1), max(cols, 1)) if block == TENSOR else block


def _check_matrix(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims (rows, cols), got shape {tuple(x.shape)}; "
                         "reshape a vector to (1, n)")


def block_grid(shape, block) -> tuple[int, ...]:
    """Shape of the scale tensor for ``shape`` cut into ``block``: (*lead, ceil(R/br), ceil(C/bc)); (*lead, 1, 1)
    for TENSOR."""
    *lead, rows, cols = shape
    br, bc = _block_dims(block, rows, cols)
    return (*lead, -(-rows // br), -(-cols // bc))


def _tiles(x: torch.Tensor, block) -> torch.Tensor:
    """(*lead, R, C) -> zero-padded tiles (*lead, nR, br, nC, bc)."""
    *_, rows, cols = x.shape
    br, bc = _block_dims(block, rows, cols)
    n_r, n_c = -(-rows // br), -(-cols // bc)
    if (n_r * br, n_c * bc) != (rows, cols):
        x = F.pad(x, (0, n_c * bc - cols, 0, n_r * br - rows))
    return x.unflatten(-1, (n_c, bc)).unflatten(-3, (n_r, br))


def _untile(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of ``_tiles``: (*lead, nR, br, nC, bc) -> (*lead, R, C), cropping the padding."""
    return tiles.flatten(-2).flatten(-3, -2)[..., :rows, :cols]


def block_scale(amax: torch.Tensor, power_of_two: bool = False) -> torch.Tensor:
    """Per-block FP32 scale ``max(amax, tiny) / 448`` (section 3.3.2: the scale maps the block's absolute
    maximum onto the largest E4M3 value). ``power_of_two`` rounds it up to the next power of two, so scaling
    touches only exponents (the block max then lands in (224, 448])."""
    scale = amax.float().clamp(min=AMAX_FLOOR) / E4M3_MAX
    if power_of_two:
        mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2**exponent, mantissa in [0.5, 1)
        scale = torch.ldexp(torch.ones_like(scale), exponent - (mantissa == 0.5).int())
    return scale


def quantize_blockwise(x: torch.Tensor, block=(1, 128), power_of_two: bool = False):
    """Quantise ``x`` to E4M3 with one FP32 scale per block (DeepSeek-V3 section 3.3.2); ``block=TENSOR`` gives
    one scale per matrix (per-tensor scaling).

    Returns ``(q, scale)``: ``q`` has x's shape in ``torch.float8_e4m3fn``, ``scale`` has shape
    ``block_grid(x.shape, block)`` in fp32, and ``q.float() * scale`` (broadcast per block) reconstructs x:
    ``q = round_e4m3(clamp(x / scale, -448, 448))``.
    """
    block = _check_block(block)
    _check_matrix(x, "x")
    if not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise ValueError(f"x must be a float32/bfloat16/float16 tensor, got {x.dtype}; cast it with x.float()")
    *_, rows, cols = x.shape
    tiles = _tiles(x.float(), block)  # (*lead, nR, br, nC, bc)
    scale = block_scale(tiles.abs().amax(dim=(-3, -1)), power_of_two)  # (*lead, nR, nC)
    q = (tiles / scale[..., :, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return _untile(q, rows, cols).contiguous(), scale


def dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor, block=(1, 128)) -> torch.Tensor:
    """Inverse of ``quantize_blockwise``: ``q.float() * scale`` broadcast over each block, in fp32."""
    block = _check_block(block)
    _check_matrix(q, "q")
    if q.dtype != FP8_DTYPE:
        raise ValueError(f"q must be {FP8_DTYPE} (from quantize_blockwise), got {q.dtype}")
    if tuple(scale.shape) != block_grid(q.shape, block):
        raise ValueError(f"scale has shape {tuple(scale.shape)} but q {tuple(q.shape)} in blocks {block} needs "
                         f"{block_grid(q.shape, block)}; pass the scale quantize_blockwise returned with q")
    *_, rows, cols = q.shape
    tiles = _tiles(q.float(), block).mul_(scale.float()[..., :, None, :, None])
    return _untile(tiles, rows, cols)
