"""What the machine under `python -m dcgan_dist.bench` can do: its CPU and flags, whether bf16 is
native or emulated there, and the bf16 peak a GPU variant's TFLOP/s is a share of."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs that compute bf16 natively
CPU_FLAGS_SHOWN = ("avx2", "fma", "avx512f", "avx512_vnni", *CPU_BF16_FLAGS, "amx_tile")
# Dense bf16 tensor-core peaks (TFLOP/s, vendor specs, no sparsity), matched in order against the
# device name; --peak-tflops overrides. An 8192^3 bf16 matmul reaches ~790 of the H200's 989.
BF16_PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0))


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_emulation(device: torch.device) -> str:
    """Why bf16 arithmetic would be emulated on this device (slow), or '' where it is native."""
    if device.type == "cuda":
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no including_emulation
            native = torch.cuda.get_device_capability(device) >= (8, 0)
        return "" if native else f"bf16 is emulated on {torch.cuda.get_device_name(device)} (compute capability < 8.0)"
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    native = any(probe() for probe in probes if probe) or bool(cpu_flags() & set(CPU_BF16_FLAGS))
    return "" if native else "bf16 is emulated on this CPU (no avx512_bf16/amx_bf16)"


def describe_machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    shown = " ".join(flag if flag in flags else f"no-{flag}" for flag in CPU_FLAGS_SHOWN)
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "?"
    text = f"{cpu} ({shown}; torch CPU kernels: {capability}), {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}; host {text}"
    return text


def bf16_peak_tflops(device: torch.device, given: float | None) -> tuple[float | None, str]:
    """The dense bf16 peak the table's last column divides by, and where it came from."""
    if given:
        return given, "--peak-tflops"
    if device.type != "cuda":
        return None, ""
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS:
        if key in name:
            return peak, f"{key} spec, dense"
    return None, f"unknown for {name}: give --peak-tflops"


def matmul_tflops(device: torch.device, side: int = 8192, repeats: int = 10) -> float:
    """What a large bf16 matrix product reaches here: the practical ceiling beside the spec."""
    a, b = (torch.randn(side, side, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * side**3 * repeats / (time.perf_counter() - start) / 1e12
