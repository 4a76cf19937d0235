"""What a tile layout and a kept count fix for every call, computed once per pair and cached."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .kv_selection import own_kv_blocks
from .layout import TileLayout
from .query_selection import fill_candidates, video_query_rows

__all__ = ["StaticSelection", "static_selection"]


@dataclass(frozen=True, eq=False)
class StaticSelection:
    """Index tables that depend on the layout and the kept count only, never on q, k or v.

    A frozen dataclass like TileLayout, so that torch.compile takes it as a constant.
    """

    own_kv_blocks: torch.Tensor  # [video query blocks, n_kv_blocks] bool: each query block's own tiles' KV blocks
    fill_candidates: torch.Tensor  # [Nq, c] int64: the tokens that may copy each compact row
    fill_candidate_valid: torch.Tensor  # [Nq, c] bool


@functools.lru_cache(maxsize=128)
def static_selection(layout: TileLayout, keep_per_window: int) -> StaticSelection:
    """The layout's :class:`StaticSelection` for ``keep_per_window`` kept queries per window (cached)."""
    video_rows = video_query_rows(layout, keep_per_window)
    rows = video_rows + layout.num_slots - layout.text_slot_start
    candidates, valid = fill_candidates(layout, keep_per_window, rows)
    return StaticSelection(own_kv_blocks(layout, keep_per_window, video_rows // layout.block_size), candidates, valid)
