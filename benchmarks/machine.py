"""The machine a benchmark ran on, as its figures should name it."""
from __future__ import annotations

import os
import platform
import re
import subprocess


def cpu_model() -> str:
    """The CPU model as ``lscpu`` names it (e.g. "AMD EPYC", "Intel(R) Xeon(R) Platinum 8480+"):
    machines differ a lot (bf16 units, AMX), so every figure says which one it came from."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return re.search(r"Model name:\s*(.*)", text).group(1).strip()
    except Exception:  # no lscpu: /proc/cpuinfo, then what Python knows
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """``lscpu``'s flags (avx512_bf16, amx_tile, ...: what decides bf16 and matrix speed), or "unknown"."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return re.search(r"Flags:\s*(.*)", text).group(1).strip()
    except Exception:
        return "unknown"


def machine_line() -> str:
    """CPU model, cores and memory in one line."""
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    return f"{cpu_model()}, {os.cpu_count()} cores, {memory:.0f} GiB"
