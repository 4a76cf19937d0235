"""BSAConfig: every knob of Bidirectional Sparse Attention, validated on construction."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from masks import FILL_POLICIES, KV_RULES

from .kernels import KERNELS

__all__ = ["BSAConfig", "keep_count"]


def _check_real(name: str, value, low: float, high: float, *, low_open: bool = False,
                tensor_ok: bool = False) -> None:
    if tensor_ok and isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise TypeError(f"BSAConfig.{name} as a tensor must be a 0-dim floating tensor, "
                            f"got shape {tuple(value.shape)} {value.dtype}")
        value = float(value)
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a float or a 0-dim float tensor" if tensor_ok else "a float"
        raise TypeError(f"BSAConfig.{name} must be {kind}, got {type(value).__name__}")
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        lo = "(" if low_open else "["
        raise ValueError(f"BSAConfig.{name} must be a finite number in {lo}{low}, {high}], got {value!r}")


def _check_int(name: str, value, low: int, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an int or None" if optional else "an int"
        raise TypeError(f"BSAConfig.{name} must be {kind}, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"BSAConfig.{name} must be >= {low}, got {value}")


def _check_triple(name: str, value) -> tuple[int, int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 3 or any(
            isinstance(n, bool) or not isinstance(n, int) for n in value):
        raise TypeError(f"BSAConfig.{name} must be three ints (t, h, w), got {value!r}")
    if any(n < 1 for n in value):
        raise ValueError(f"BSAConfig.{name} must be three positive ints (t, h, w), got {value!r}")
    return tuple(value)


def keep_count(query_keep_ratio: float, window_tokens: int) -> int:
    """Kept queries per window for a keep ratio: ceil(ratio * window tokens), at least 1."""
    return max(1, math.ceil(query_keep_ratio * window_tokens - 1e-9))


@dataclass(frozen=True)
class BSAConfig:
    """Configuration of one BSA attention call.

    Query side: the video is cut into ``tile``-sized 3D tiles and each tile into ``window``-sized
    windows; per window the centre and the least similar queries are kept, ``ceil(ratio *
    window tokens)`` of them. ``fill`` says which kept query's output a pruned query copies.
    KV side: per query block of ``block_size`` compact queries, KV blocks of ``block_size``
    tile-major tokens are chosen by ``kv_rule``: "cumulative" keeps the fewest blocks whose
    pooled attention mass reaches ``kv_threshold`` (1.0 keeps all), "zscore" keeps blocks above
    mean + ``kv_zscore`` * std. ``min_kv_blocks`` most probable blocks and the query block's own
    tiles are always kept; ``max_kv_blocks`` (a budget) caps what the rule adds.

    ``kernel`` picks the CUDA attention kernel: "flash" (FlashAttention-4 through FlexAttention's
    FLASH backend), "triton" (FlexAttention's Triton kernel) or "auto" (FLASH wherever it can
    run correctly, else Triton; the only value that runs on CPU). ``stats.kernel`` says which ran.

    ``kv_threshold`` and ``kv_zscore`` may be 0-dim float tensors: a schedule that updates such
    a tensor in place changes the threshold without recompiling, even inside a model compiled
    as a whole (a Python float there is a constant of the graph). The other fields set shapes
    or code and compile once per distinct value.
    """

    query_keep_ratio: float = 0.5
    kv_threshold: float | torch.Tensor = 0.9
    tile: tuple[int, int, int] = (4, 4, 4)
    window: tuple[int, int, int] = (2, 2, 2)
    min_kv_blocks: int = 1
    max_kv_blocks: int | None = None
    kv_rule: str = "cumulative"
    kv_zscore: float | torch.Tensor = 1.0
    fill: str = "most_similar"
    block_size: int = 128
    kernel: str = "auto"

    def __post_init__(self):
        _check_real("query_keep_ratio", self.query_keep_ratio, 0.0, 1.0, low_open=True)
        _check_real("kv_threshold", self.kv_threshold, 0.0, 1.0, low_open=True, tensor_ok=True)
        _check_real("kv_zscore", self.kv_zscore, -1e6, 1e6, tensor_ok=True)
        object.__setattr__(self, "tile", _check_triple("tile", self.tile))
        object.__setattr__(self, "window", _check_triple("window", self.window))
        if any(t % w for t, w in zip(self.tile, self.window)):
            raise ValueError(f"BSAConfig.window {self.window} must divide BSAConfig.tile {self.tile} on every axis")
        _check_int("min_kv_blocks", self.min_kv_blocks, 0)
        _check_int("max_kv_blocks", self.max_kv_blocks, 1, optional=True)
        if self.kv_rule not in KV_RULES:
            raise ValueError(f"BSAConfig.kv_rule must be one of {KV_RULES}, got {self.kv_rule!r}")
        if self.fill not in FILL_POLICIES:
            raise ValueError(f"BSAConfig.fill must be one of {FILL_POLICIES}, got {self.fill!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"BSAConfig.kernel must be one of {KERNELS}, got {self.kernel!r}")
        _check_int("block_size", self.block_size, 16)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"BSAConfig.block_size must be a power of two >= 16, got {self.block_size}")

    @classmethod
    def dense(cls, **overrides) -> "BSAConfig":
        """Every query kept, every KV block kept: full attention through the BSA machinery."""
        return cls(**{"query_keep_ratio": 1.0, "kv_threshold": 1.0, **overrides})

    @property
    def keep_per_window(self) -> int:
        """Kept queries per window: ceil(query_keep_ratio * window tokens), at least 1."""
        return keep_count(self.query_keep_ratio, math.prod(self.window))

    @property
    def kv_rule_threshold(self) -> float | torch.Tensor:
        """The number the KV rule compares against: p for "cumulative", z for "zscore"."""
        return self.kv_threshold if self.kv_rule == "cumulative" else self.kv_zscore
