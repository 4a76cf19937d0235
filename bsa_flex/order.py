"""The tile order: a sequence's tokens as BSA tiles them, for models that keep their tokens so."""
from __future__ import annotations

from typing import NamedTuple

import torch

from masks import tile_layout

from .config import BSAConfig
from .validation import check_text_tokens, check_triple

__all__ = ["TokenOrder", "tile_order"]


class TokenOrder(NamedTuple):
    """Two permutations of a sequence's S tokens, inverse to each other."""

    to_tile: torch.Tensor  # [S] int64: x_tile = x[:, :, to_tile] (sequence -> tile order)
    to_raster: torch.Tensor  # [S] int64: x = x_tile[:, :, to_raster] (tile -> sequence order)


def tile_order(video_shape, config: BSAConfig | None = None, *, prefix_tokens: int = 0, suffix_tokens: int = 0,
               device: torch.device | str = "cpu") -> TokenOrder:
    """The permutations between sequence (raster) order and the tile order of ``config``'s tiles.

    Tile order: tiles in raster order over the tile grid, windows in raster order inside a tile,
    tokens in raster order inside a window, the video's tile padding dropped; the non-video tokens
    (prefix, then suffix) follow the video. Permute q, k, v once (e.g. right after patchify),
    call ``bsa_flex.attention(..., token_order="tile")`` in every layer, and permute the output
    back once (before unpatchify). Position-dependent code (RoPE, a score_mod) must keep using
    sequence positions: ``to_tile`` says which sequence token sits at each tile position.
    """
    config = BSAConfig() if config is None else config
    if not isinstance(config, BSAConfig):
        raise TypeError(f"config must be a BSAConfig or None, got {type(config).__name__}")
    text = check_text_tokens(prefix_tokens, suffix_tokens)
    layout = tile_layout(check_triple("video_shape", video_shape), config.tile, config.window, config.block_size,
                         torch.device(device), text)
    return TokenOrder(layout.tile_order, layout.tile_position)


@torch.compiler.assume_constant_result
def tile_positions(video_shape: tuple[int, int, int], tile: tuple[int, int, int], window: tuple[int, int, int],
                   block_size: int, device: torch.device) -> torch.Tensor:
    """[S] int64: the sequence index of the token at each tile-order place of a video without text
    (``tile_order(...).to_tile``); a constant to torch.compile, whose constant functions take plain values."""
    return tile_layout(video_shape, tile, window, block_size, device).tile_order
