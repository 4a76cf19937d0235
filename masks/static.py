"""What a tile layout, a kept count and a fill rule fix for every call, computed once and cached."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .kv_selection import own_kv_blocks
from .layout import TileLayout
from .query_selection import fill_candidates, local_query_rows, video_query_rows

__all__ = ["StaticSelection", "static_selection"]


@dataclass(frozen=True, eq=False)
class StaticSelection:
    """Index tables that depend on the layout, the kept count and the fill rule only, never on q, k or v.

    A frozen dataclass like TileLayout, so that torch.compile takes it as a constant.
    """

    own_kv_blocks: torch.Tensor  # [video query blocks, n_kv_blocks] bool: each query block's own tiles' KV blocks
    fill_candidates: torch.Tensor  # [Nq, c] int64: the tokens that may copy each compact row
    fill_candidate_valid: torch.Tensor  # [Nq, c] bool
    # [local query blocks, n_kv_blocks] bool: with the fill "local", what each block of pruned queries attends to
    # (its own tiles' KV blocks and the non-video ones); no rows for the other fill rules
    local_kv_blocks: torch.Tensor


@functools.lru_cache(maxsize=128)
def static_selection(layout: TileLayout, keep_per_window: int, fill: str = "most_similar") -> StaticSelection:
    """The layout's :class:`StaticSelection` for ``keep_per_window`` kept queries per window and a fill rule (cached)."""
    video_rows = video_query_rows(layout, keep_per_window)
    rows = video_rows + layout.num_slots - layout.text_slot_start
    candidates, valid = fill_candidates(layout, keep_per_window, rows)
    local_rows = local_query_rows(layout, keep_per_window, fill)
    local = layout.kv_block_text.new_zeros(0, layout.num_kv_blocks)
    if local_rows:  # the pruned queries' rows: each copied by its own token, one of its window's
        pruned = layout.window_tokens - keep_per_window
        local = own_kv_blocks(layout, pruned, local_rows // layout.block_size) | layout.kv_block_text
        local_candidates, local_valid = fill_candidates(layout, pruned, local_rows)
        candidates, valid = torch.cat([candidates, local_candidates]), torch.cat([valid, local_valid])
    return StaticSelection(own_kv_blocks(layout, keep_per_window, video_rows // layout.block_size), candidates, valid,
                           local)
