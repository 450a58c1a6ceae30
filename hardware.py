"""
What this machine can do, for MFU and the speed figures: whether the CPU multiplies bf16 natively,
the peak matmul FLOP/s (a GPU's from its datasheet, a CPU's measured) and the read bandwidth; and
the one allocator setting a CPU training run needs (keep_freed_memory).

    peak = gpu_peak_flops(device) or matmul_flops(device, torch.float32)
"""
import time

import torch

def cpu_has_bf16():
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), read from /proc/cpuinfo: a
    capability check rather than a timing probe, so the choice is the same on every run. With it,
    oneDNN runs bf16 matmuls at twice the fp32 rate (training ran 2.6x faster on a 2-core EPYC);
    without it bf16 is emulated and slower than fp32. Not Linux: assume not."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags

def keep_freed_memory():
    """Have the C allocator (glibc's, on Linux) keep the memory this process frees, for reuse. A training
    step frees its activations and allocates the same sizes again in the next step; by default glibc
    returns large blocks to the system at once (mmap, and trimming the heap), and touching them again
    costs a page fault per 4 KB: 36k faults a step for the CPU demo, a fifth of its step time (2-core
    AVX2 EPYC). Kept, the process stays near its peak memory (peak 618 -> 719 MiB for the demo).
    -> True if set; False elsewhere (macOS, musl), where nothing changes."""
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    # No block from mmap (the heap serves all), and never trim the heap's free top.
    return bool(mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1))  # 1 = done

def matmul_flops(device, dtype, n=1024, repeats=3):
    """Measured peak matmul FLOP/s of device in dtype: the best of a few n x n products. A CPU without
    native bf16 emulates it ~50x slower than fp32 (measured on an AVX2-only EPYC): its peak is fp32's,
    and timing the emulation would take minutes."""
    if device.type == "cpu" and dtype != torch.float32 and not cpu_has_bf16():
        dtype = torch.float32
    g = torch.Generator().manual_seed(0)  # its own: drawing from torch's would shift a run's dropout
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    best = min(seconds(lambda: a @ b, device) for _ in range(repeats + 1))  # the first warms up too
    return 2 * n ** 3 / best

# Dense (no sparsity) bf16/fp16 tensor-core peak FLOP/s per GPU from the vendors' datasheets: MFU
# is quoted against these whatever the dtype (pass --peak-flops for fp32/TF32 runs or other GPUs).
# The first name found in torch.cuda.get_device_name() wins: specific names before general ones.
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
              ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
              ("A10", 125e12), ("4090", 165e12), ("3090", 71e12), ("V100", 125e12), ("T4", 65e12)]

def gpu_peak_flops(device):
    """Peak FLOP/s of a CUDA device from PEAK_FLOPS; 0.0 when unknown (MFU is then not shown)."""
    import torch
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((flops for key, flops in PEAK_FLOPS if key in name), 0.0) if name else 0.0


def read_bandwidth(device, gigabytes=0.5):
    """Bytes per second of reading a large tensor (a sum over it), the best of a few."""
    x = torch.ones(int(gigabytes * 2**30) // 4, device=device)
    x.sum()  # warm-up: the pages are touched
    return x.numel() * 4 / min(seconds(x.sum, device) for _ in range(3))

def seconds(fn, device):
    """Wall seconds of fn(), with the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0
