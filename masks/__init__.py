"""The BSA mask machinery: tiling, query selection, KV-block selection, BlockMask construction
and dense references. Depends on torch and einops only; never imports ``bsa_flex``."""
from .block_mask import build_block_mask, ordered_kv_blocks, padding_mask_mod, selection_mask_mod, slot_is_real
from .kv_selection import (KV_RULES, ZSCORE_RANGE, extra_kv_blocks, kv_block_probs, own_kv_blocks, pool_blocks,
                           select_kv_blocks, valid_threshold)
from .layout import TileLayout, tile_layout
from .query_selection import (FILL_POLICIES, KeptQueries, compact_queries, fill_candidates, fill_from_kept,
                              gather_tokens, local_query_rows, select_queries, takes_own_output, to_tile_major,
                              video_query_rows)
from .static import StaticSelection, static_selection
from .reference import Selection, reference_attention, token_mask, tokens_with_same_selection

__all__ = [
    "FILL_POLICIES", "KV_RULES", "ZSCORE_RANGE", "KeptQueries", "Selection", "StaticSelection", "TileLayout",
    "static_selection", "valid_threshold",
    "build_block_mask", "compact_queries", "extra_kv_blocks", "fill_candidates", "fill_from_kept", "gather_tokens",
    "ordered_kv_blocks", "padding_mask_mod",
    "kv_block_probs", "local_query_rows", "own_kv_blocks", "pool_blocks",
    "reference_attention", "select_kv_blocks", "select_queries", "selection_mask_mod", "slot_is_real",
    "takes_own_output",
    "tile_layout", "to_tile_major", "token_mask", "tokens_with_same_selection", "video_query_rows",
]
