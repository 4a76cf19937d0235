"""BSAPlan: the constants of one BSA call, made once at the public boundary."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from masks import StaticSelection, TileLayout

from .config import BSAConfig

__all__ = ["BSAPlan"]


@dataclass(frozen=True, eq=False)
class BSAPlan:
    """Everything one call of the operator needs besides its tensors and the KV threshold.

    config: the validated BSAConfig; layout: the tile layout of the call's sequence (cached per
    video shape, tile, window, block size, device and text tokens); kernel: what runs the
    attention, "flash", "triton", "flex_cpu" or "blockwise" (``bsa_flex.kernels``); scale: the
    softmax scale; static: the layout's index tables for the kept count (cached with the layout);
    score_mod: the user's FlexAttention score_mod over raster positions, or None; token_order:
    "raster" (q, k, v and out in sequence order) or "tile" (in ``layout.tile_order``);
    query_share: (i, n), this call attends only the i-th of n equal runs of compact query blocks
    (the others attend no key: output 0), for ranks that share heads (``bsa_flex.distributed``).
    Made by ``bsa_flex.runtime.make_plan``; the operator reads it and never changes it.
    """

    config: BSAConfig
    layout: TileLayout
    kernel: str
    scale: float
    static: StaticSelection
    score_mod: Callable | None = None
    token_order: str = "raster"
    query_share: tuple[int, int] = (0, 1)

    @property
    def in_tile_order(self) -> bool:
        """q, k, v and the output are in the layout's tile order, not in sequence order."""
        return self.token_order == "tile"

    @property
    def keep_per_window(self) -> int:
        """Kept queries per window."""
        return self.config.keep_per_window
