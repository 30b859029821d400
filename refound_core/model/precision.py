"""Which autocast precision to run the model in, and why.

bfloat16 autocast is used where the hardware runs it natively: on CUDA GPUs (every GPU torch
supports with bf16, i.e. compute capability >= 8.0; older GPUs stay in float32) and on x86 CPUs
that advertise AMX-BF16 or AVX512-BF16 (Sapphire Rapids, Cooper Lake, Zen 4 ...). Everywhere
else float32: emulated bf16 on a CPU without those instructions is slower than float32 and
less accurate. ``refound doctor`` prints :func:`describe_precision`.

The CPU detection reads the kernel's flag list (Linux ``/proc/cpuinfo``), with torch's own CPU
capability probe as a fallback; it imports torch only when asked about a torch device, so the
doctor can report CPU features even when torch is missing.
"""
from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass
from pathlib import Path

# /proc/cpuinfo flag names (Linux kernel spelling).
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class PrecisionChoice:
    """The autocast decision for one device.

    Attributes:
        device_type: ``"cuda"`` or ``"cpu"`` (what ``torch.autocast`` wants).
        dtype_name: ``"bfloat16"`` or ``"float32"`` (float32 = autocast disabled).
        reason: one human-readable line (shown by ``refound doctor``).
    """

    device_type: str
    dtype_name: str
    reason: str

    @property
    def enabled(self) -> bool:
        return self.dtype_name != "float32"

    @property
    def dtype(self):
        import torch
        return getattr(torch, self.dtype_name)


def cpu_bf16_features(cpuinfo_path: str = "/proc/cpuinfo") -> dict:
    """CPU bf16 instruction sets: ``{"amx_bf16": bool, "avx512_bf16": bool, "source": str}``.

    ``source`` tells where the answer came from (``/proc/cpuinfo``, ``torch`` or ``unknown``).
    """
    found = {flag: False for flag in _BF16_CPU_FLAGS}
    path = Path(cpuinfo_path)
    if platform.system() == "Linux" and path.exists():
        try:
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    for flag in _BF16_CPU_FLAGS:
                        found[flag] = flag in flags
                    return {**found, "source": str(path)}
        except OSError:
            pass
    try:  # private but stable-for-years torch probes; only a fallback
        import torch
        found["amx_bf16"] = bool(torch._C._cpu._is_amx_tile_supported())
        found["avx512_bf16"] = bool(torch._C._cpu._is_avx512_bf16_supported())
        return {**found, "source": "torch"}
    except Exception:  # noqa: BLE001 - any failure means "we do not know": stay in float32
        return {**found, "source": "unknown"}


def choose_precision(device="cpu", cpuinfo_path: str = "/proc/cpuinfo") -> PrecisionChoice:
    """Pick bf16 autocast on CUDA (capability >= 8.0) and bf16-capable CPUs, float32 elsewhere.

    Args:
        device: a ``torch.device`` or a string (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``).
    """
    kind = str(device).split(":")[0]
    if kind == "cuda":
        import torch
        if not torch.cuda.is_available():
            return PrecisionChoice("cuda", "float32", "CUDA requested but not available")
        index = torch.device(str(device)).index or 0
        if torch.cuda.is_bf16_supported(including_emulation=False) and torch.cuda.get_device_capability(index)[0] >= 8:
            name = torch.cuda.get_device_name(index)
            return PrecisionChoice("cuda", "bfloat16", f"bf16 autocast on {name} (native bf16 tensor cores)")
        return PrecisionChoice("cuda", "float32", "GPU without native bf16 (compute capability < 8.0): float32")
    if kind == "cpu":
        feats = cpu_bf16_features(cpuinfo_path)
        have = [flag for flag in _BF16_CPU_FLAGS if feats[flag]]
        if have:
            return PrecisionChoice("cpu", "bfloat16", f"bf16 autocast on CPU ({', '.join(have)} from {feats['source']})")
        return PrecisionChoice("cpu", "float32", "CPU without AMX-BF16/AVX512-BF16: float32 (bf16 would be emulated)")
    return PrecisionChoice(kind, "float32", f"device type {kind!r}: float32")


def describe_precision(device="cpu") -> str:
    """One line for ``refound doctor``: the chosen dtype and the reason."""
    choice = choose_precision(device)
    return f"{choice.device_type}: {choice.dtype_name} ({choice.reason})"


def autocast(device="cpu", choice: PrecisionChoice | None = None):
    """Context manager running the enclosed forward pass in the chosen precision.

    ``torch.autocast`` when :func:`choose_precision` (or the given ``choice``) picked bf16,
    a no-op context otherwise.
    """
    choice = choice or choose_precision(device)
    if not choice.enabled:
        return contextlib.nullcontext()
    import torch
    return torch.autocast(device_type=choice.device_type, dtype=choice.dtype)
