"""Dense references for tests: the token-level mask a selection implies, and the float64 oracle.

Everything here works in raster order on an S x S mask, with no tile-major order, no block
lists and no FlexAttention: it shares only the *selection* with the paths it checks.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .layout import TileLayout

__all__ = ["Selection", "token_mask", "reference_attention", "tokens_with_same_selection"]


class Selection(NamedTuple):
    """What BSA chose for one call: kept queries, their fill sources and the KV-block matrix."""

    kept_token: torch.Tensor  # [B, Hq, Nq] int64 raster token of each compact query row
    kept_valid: torch.Tensor  # [B, Hq, Nq] bool: the row is a real token
    fill_source: torch.Tensor  # [B, Hq, S] int64 compact row whose output each token takes
    kv_blocks: torch.Tensor  # [B, Hq, nq, nkv] bool: query block attends to KV block
    local_row: torch.Tensor  # [B, Hq, Nq] bool: the row is a pruned query attending its own tile (fill "local")


def _query_block_of_token(selection: Selection, block_size: int, num_tokens: int) -> torch.Tensor:
    """[B, Hq, S] query block of every kept raster token, -1 for pruned tokens."""
    kept_token, kept_valid = selection.kept_token, selection.kept_valid
    row_block = torch.arange(kept_token.shape[-1], device=kept_token.device) // block_size
    target = torch.where(kept_valid, kept_token, num_tokens)  # padding rows land in a spare column
    out = torch.full((*kept_token.shape[:2], num_tokens + 1), -1, dtype=torch.int64, device=kept_token.device)
    out.scatter_(2, target, row_block.expand_as(target).clone())
    return out[..., :num_tokens]


def token_mask(selection: Selection, layout: TileLayout) -> torch.Tensor:
    """[B, Hq, S, S] bool: kept query i attends to key j (rows of pruned queries are all False)."""
    S = layout.num_tokens
    q_block = _query_block_of_token(selection, layout.block_size, S)
    kv_block = layout.token_slot // layout.block_size  # every raster token is a real slot
    kept = q_block >= 0
    rows = selection.kv_blocks.gather(2, q_block.clamp_min(0)[..., None].expand(-1, -1, -1, selection.kv_blocks.shape[-1]))
    return rows[..., kv_block] & kept[..., None]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: Selection,
                        layout: TileLayout, *, scale: float, score_mod: Callable | None = None,
                        zero_pruned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 masked attention of the kept queries, then the fill rule; returns (out, lse).

    q: [B, Hq, S, D]; k, v: [B, Hkv, S, D] (Hq a multiple of Hkv). score_mod is called on
    broadcastable index tensors with raster positions. out: [B, Hq, S, D] float64; lse:
    [B, Hq, S] natural log, each pruned token carrying its source's value, or with
    ``zero_pruned`` (the fill rule "none") output 0 and LSE -inf, as a query with no key.
    """
    B, Hq, S, _ = q.shape
    group = Hq // k.shape[1]
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    scores = (q.double() @ k64.transpose(-1, -2)) * scale
    if score_mod is not None:
        idx = [torch.arange(n, device=q.device) for n in (B, Hq, S, S)]
        scores = score_mod(scores, idx[0][:, None, None, None], idx[1][None, :, None, None],
                           idx[2][None, None, :, None], idx[3][None, None, None, :])
    mask = token_mask(selection, layout)
    kept = (_query_block_of_token(selection, layout.block_size, S) >= 0)[..., None]
    # Pruned rows get a harmless dummy row (replaced by the fill below); a kept row with no key
    # stays all -inf and turns NaN, so such a selection bug cannot pass a comparison.
    scores = scores.masked_fill(~mask & kept, float("-inf")).masked_fill(~kept, 0.0)
    lse = scores.logsumexp(-1)
    out = (scores - lse[..., None]).exp() @ v64
    source = selection.kept_token.gather(2, selection.fill_source)  # raster token each output copies
    out, lse = out.gather(2, source[..., None].expand_as(out)), lse.gather(2, source)
    if zero_pruned:
        pruned = ~kept[..., 0]
        out, lse = out.masked_fill(pruned[..., None], 0.0), lse.masked_fill(pruned, float("-inf"))
    return out, lse


def tokens_with_same_selection(a: Selection, b: Selection, block_size: int) -> torch.Tensor:
    """[B, Hq, S] bool: the token's output comes from the same query over the same KV blocks in a and b.

    Two runs can make different discrete choices (a near-tie in a window's query scores can flip
    under another compilation); only where this holds must their outputs agree to rounding.
    Conservative: a token whose compact row moved counts as differing even if its query and
    KV blocks are the same.
    """
    same_row = a.fill_source == b.fill_source
    same_query = a.kept_token.gather(2, a.fill_source) == b.kept_token.gather(2, b.fill_source)
    same_blocks = (a.kv_blocks == b.kv_blocks).all(-1).gather(2, a.fill_source // block_size)
    return same_row & same_query & same_blocks
