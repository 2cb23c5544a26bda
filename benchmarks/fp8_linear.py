"""Forward+backward time of the FP8 linear (DeepSeek-V3 section 3.3) against a BF16 nn.Linear.

    .venv/bin/python benchmarks/fp8_linear.py --device cuda            # Hopper: the scaled_mm backend
    .venv/bin/python benchmarks/fp8_linear.py --device cpu --tokens 1024  # CPU: the emulation's overhead

Both layers see the same BF16 activations and output gradients, without bias (DeepSeek-V3's linears have
none). BF16: nn.Linear with BF16 weights. FP8: FP8Linear with FP32 master weights, so its time includes
quantising x, W, dy every step, as in training. TFLOP/s counts the three GEMMs: 6 * tokens * in * out.
"""

import argparse
import platform
import time

import torch
from torch import nn

from dsv3.fp8 import FP8Linear, resolve_backend

SHAPES = [(7168, 2048), (2048, 7168), (4096, 4096)]  # (in, out), at 8192 tokens in the issue


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    """One forward+backward; gradients are dropped so every step allocates alike."""
    layer(x).backward(dy)
    layer.weight.grad = None
    x.grad = None


def time_ms(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step(layer, x, dy)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step(layer, x, dy)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step (shrink it on a CPU)")
    parser.add_argument("--backend", default="auto", choices=["auto", "scaled_mm", "emulated"])
    parser.add_argument("--warmup", type=int, default=None, help="default: 10 on GPU, 1 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default: 50 on GPU, 3 on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile both layers (fuses quantisation)")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    repeats = args.repeats if args.repeats is not None else (50 if gpu else 3)
    backend = resolve_backend(args.backend, device)

    what = torch.cuda.get_device_name(device) if gpu else f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"# fp8_linear: device {device} ({what}), torch {torch.__version__}, FP8 backend {backend}, "
          f"tokens {args.tokens}{'' if args.tokens == 8192 else ' (shrunk from the issue 8192)'}, "
          f"warmup {warmup}, repeats {repeats}{', compiled' if args.compile else ''}")
    print("| tokens | in | out | BF16 ms | FP8 ms | FP8 speed vs BF16 | BF16 TFLOP/s | FP8 TFLOP/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    for d_in, d_out in SHAPES:
        bf16 = nn.Linear(d_in, d_out, bias=False, device=device, dtype=torch.bfloat16)
        fp8 = FP8Linear(d_in, d_out, bias=False, device=device, backend=backend)  # fp32 master weight
        x = torch.randn(args.tokens, d_in, device=device, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(args.tokens, d_out, device=device, dtype=torch.bfloat16)
        layers = [torch.compile(m) if args.compile else m for m in (bf16, fp8)]
        ms_bf16, ms_fp8 = (time_ms(m, x, dy, warmup, repeats) for m in layers)
        tflop = 6 * args.tokens * d_in * d_out / 1e12
        print(f"| {args.tokens} | {d_in} | {d_out} | {ms_bf16:.2f} | {ms_fp8:.2f} | {ms_bf16 / ms_fp8:.2f}x | "
              f"{tflop / ms_bf16 * 1e3:.2f} | {tflop / ms_fp8 * 1e3:.2f} |")
        del bf16, fp8, x, dy, layers
        if gpu:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
