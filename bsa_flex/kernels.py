"""Which FlexAttention kernel runs a call: FlashAttention-4 (Flex's FLASH backend) or Flex's Triton.

A runtime concern, apart from the operator: the choice is made once per call from facts about
the inputs and the machine (:class:`KernelFacts`), by a pure function (:func:`choose_kernel`),
so that the rule can be tested anywhere with facts written by hand.

The rule for ``BSAConfig.kernel="auto"``: FLASH wherever it computes the right result on this
torch, Triton otherwise. ``"flash"`` raises a ValueError saying why where FLASH cannot run;
``"triton"`` always takes Triton on CUDA. Both name CUDA kernels: on CPU only "auto" runs
(FlexAttention's C++ template without gradients, the blockwise path with them).

What FLASH cannot do (torch 2.11, flash-attn-4 4.0.0b36, H200; each seen, see the README):
float32 inputs; blocks other than 128 tokens; a deterministic backward with a block mask;
a score_mod that reads tensors (bsa_flex's, which map to raster positions, always does);
gradients through the LSE (bsa_flex detaches the LSE when FLASH runs: LSE gradients need
``kernel="triton"``).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import math
from dataclasses import dataclass

import torch

__all__ = ["KERNELS", "KernelFacts", "choose_kernel", "kernel_facts", "flash_lse_to_natural_log"]

log = logging.getLogger("bsa_flex")

KERNELS = ("auto", "flash", "triton")
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_BLOCK_SIZE = 128  # FlashAttention-4's tile on SM90; the block lists must use it
FLASH_MIN_CAPABILITY = (9, 0)


@dataclass(frozen=True)
class KernelFacts:
    """Everything the kernel choice depends on, for one call."""

    device_type: str  # "cuda" or "cpu"
    capability: tuple[int, int] | None  # CUDA compute capability (None off CUDA)
    flash_importable: bool  # flash_attn.cute (flash-attn-4) can be imported
    dtype: torch.dtype
    head_dim: int
    block_size: int
    needs_grad: bool
    deterministic: bool  # torch.use_deterministic_algorithms(True) is in force
    has_score_mod: bool = False


def _flash_head_dim_ok(head_dim: int, capability: tuple[int, int]) -> bool:
    """FlashAttention-4's head dims: multiples of 8, up to 256 on SM90, up to 128 elsewhere."""
    return head_dim % 8 == 0 and 8 <= head_dim <= (256 if capability[0] == 9 else 128)


def flash_unavailable_reason(facts: KernelFacts) -> str | None:
    """Why FLASH cannot run this call correctly, or None when it can."""
    if facts.device_type != "cuda":
        return f"FLASH needs a CUDA GPU (inputs are on {facts.device_type})"
    if facts.capability < FLASH_MIN_CAPABILITY:
        return (f"FLASH needs compute capability {FLASH_MIN_CAPABILITY[0]}.{FLASH_MIN_CAPABILITY[1]} or newer "
                f"(this GPU has {facts.capability[0]}.{facts.capability[1]})")
    if not facts.flash_importable:
        return "flash_attn.cute is not importable: pip install 'bsa-flex[flash]' (see the README)"
    if facts.dtype not in FLASH_DTYPES:
        return f"FLASH takes float16 or bfloat16 inputs, not {str(facts.dtype).replace('torch.', '')}"
    if not _flash_head_dim_ok(facts.head_dim, facts.capability):
        return f"FLASH does not support head_dim {facts.head_dim} on compute capability {facts.capability[0]}.x"
    if facts.block_size != FLASH_BLOCK_SIZE:
        return f"FLASH needs block_size={FLASH_BLOCK_SIZE} (the config has {facts.block_size})"
    if facts.needs_grad and facts.deterministic:
        return ("deterministic algorithms are requested and FLASH's backward with a block mask is not "
                "deterministic")
    if facts.has_score_mod:
        # bsa_flex's score_mod wrapper reads index tensors (raster positions); FLASH's generated
        # call reads them after Inductor has freed them (torch 2.11: UnboundLocalError), and a
        # freed buffer that were reused instead would be read silently.
        return "FLASH cannot take a score_mod over captured tensors on this torch (bsa_flex's raster positions)"
    return None


def choose_kernel(requested: str, facts: KernelFacts) -> tuple[str, str | None]:
    """(kernel that runs, why FLASH was passed over or None) for ``BSAConfig.kernel == requested``.

    The kernel is "flash" or "triton" on CUDA; on CPU "flex_cpu" (FlexAttention's C++ template,
    no gradients) or "blockwise" (the autograd path). Raises ValueError where the request
    cannot run here.
    """
    if facts.device_type != "cuda":
        if requested != "auto":
            raise ValueError(f"BSAConfig.kernel={requested!r} names a CUDA kernel, but the inputs are on "
                             f"{facts.device_type}: use kernel='auto' there")
        return ("blockwise" if facts.needs_grad else "flex_cpu"), None
    if facts.block_size < 128 and facts.needs_grad:
        raise ValueError(f"BSAConfig.block_size={facts.block_size} has no FlexAttention backward kernel on "
                         f"CUDA (torch {torch.__version__} finds no valid tile configuration): use block_size=128 "
                         f"for training; smaller blocks work for inference (no gradients)")
    if requested == "triton":
        return "triton", None
    reason = flash_unavailable_reason(facts)
    if requested == "flash" and reason is not None:
        raise ValueError(f"BSAConfig.kernel='flash' cannot run this call: {reason}. "
                         f"Use kernel='auto' (Triton where FLASH cannot run) or kernel='triton'")
    return ("triton", reason) if reason is not None else ("flash", None)


@functools.cache
def _flash_importable() -> bool:
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):  # no flash_attn at all, or a broken install
        return False


@torch.compiler.assume_constant_result
def _machine_facts(device: torch.device) -> tuple[tuple[int, int] | None, bool]:
    """(compute capability, flash_attn.cute importable): constants to torch.compile."""
    if device.type != "cuda":
        return None, False
    return tuple(torch.cuda.get_device_capability(device)), _flash_importable()


def kernel_facts(q: torch.Tensor, block_size: int, needs_grad: bool, has_score_mod: bool) -> KernelFacts:
    """The facts of one call on q (validated inputs)."""
    capability, importable = _machine_facts(q.device)
    return KernelFacts(device_type=q.device.type, capability=capability, flash_importable=importable,
                       dtype=q.dtype, head_dim=q.shape[-1], block_size=block_size, needs_grad=needs_grad,
                       deterministic=torch.are_deterministic_algorithms_enabled(), has_score_mod=has_score_mod)


@torch.compiler.assume_constant_result
def announce_kernel(kernel: str, reason: str | None) -> bool:
    """Log the kernel choice the first time it is made (once per distinct choice and reason).

    A constant to torch.compile, so that inside a user's compiled model it logs while tracing.
    """
    return _announce_once(kernel, reason)


@functools.cache
def _announce_once(kernel: str, reason: str | None) -> bool:
    if reason is None:
        log.info("bsa_flex: attention runs on the %s kernel", kernel)
    else:
        log.info("bsa_flex: attention runs on the %s kernel; FLASH passed over: %s", kernel, reason)
    return True


# torch 2.11 and 2.12 multiply the FLASH backend's LSE by ln 2 as if it were in log2 units, but
# FlashAttention-4 returns it in natural log already (pytorch#181645, fixed in 2.13 by #181824).
_FLASH_LSE_SCALED_BY_LN2 = tuple(int(n) for n in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13)


def flash_lse_to_natural_log(lse: torch.Tensor) -> torch.Tensor:
    """The FLASH backend's LSE as returned by flex_attention, in natural log on every torch."""
    return lse / math.log(2.0) if _FLASH_LSE_SCALED_BY_LN2 else lse
