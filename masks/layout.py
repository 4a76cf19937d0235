"""3D tiling: the tile-major token order of one video shape, computed once and cached.

Tokens arrive in raster order over (T, H, W). BSA works on 3D tiles, and inside each tile on
query windows, so every per-tile or per-window step wants those tokens contiguous. A *slot* is
a position in tile-major order: tiles in raster order over the tile grid, windows in raster
order inside a tile, tokens in raster order inside a window. Videos whose sides are not
multiples of the tile are padded; the slot list is then padded once more to whole KV blocks.
Padding slots carry no token (``slot_valid`` is False) and point at token 0 so that gathers
stay in range; every consumer masks them.

The *tile order* of a sequence is its tokens in slot order with the padding dropped (video tiles
first, then any non-video tokens): a model may keep its tokens in that order, and then keys and
values of a video without padding need no permutation at all.

Joint attention: the sequence may hold ``prefix`` non-video tokens (e.g. text) before the video
and ``suffix`` after it. They are never tiled or pruned: their slots follow the video's, in
sequence order, padded to whole KV blocks, so that they form their own KV blocks (and query
blocks). Token indices in ``slot_token``/``token_slot`` are positions in the whole sequence.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange

__all__ = ["TileLayout", "tile_layout"]


@dataclass(frozen=True, eq=False)
class TileLayout:
    """Precomputed slot metadata for (video_shape, tile, window, block_size, device).

    Plain fields only (no properties), so that torch.compile reads every value as a constant.
    """

    video_shape: tuple[int, int, int]
    tile: tuple[int, int, int]
    window: tuple[int, int, int]
    block_size: int
    num_prefix: int  # non-video tokens before the video
    num_suffix: int  # non-video tokens after the video
    num_tokens: int  # the whole sequence: num_prefix + T * H * W + num_suffix
    tile_tokens: int
    window_tokens: int
    windows_per_tile: int
    num_tiles: int
    num_windows: int
    num_video_slots: int  # slots of the tile-padded video, before padding to whole KV blocks
    text_slot_start: int  # num_video_slots padded to whole KV blocks: where the non-video slots begin
    num_slots: int  # text_slot_start + the non-video tokens padded to whole KV blocks
    num_kv_blocks: int
    slot_token: torch.Tensor  # [num_slots] int64: sequence index of the token in each slot (0 for padding)
    slot_valid: torch.Tensor  # [num_slots] bool: the slot holds a real token
    token_slot: torch.Tensor  # [num_tokens] int64: slot of each token of the sequence
    tile_order: torch.Tensor  # [num_tokens] int64: the sequence's tokens in slot order (padding dropped)
    tile_position: torch.Tensor  # [num_tokens] int64: each token's position in tile_order (its inverse)
    window_anchor: torch.Tensor  # [num_windows] int64: index inside the window of its centre token
    kv_block_valid_count: torch.Tensor  # [num_kv_blocks] int64: real tokens per KV block
    kv_block_valid: torch.Tensor  # [num_kv_blocks] bool: the block holds at least one real token
    kv_block_partial: torch.Tensor  # [num_kv_blocks] bool: real and padding slots mixed (element masking)
    has_partial_kv_blocks: bool  # kv_block_partial.any(), known without reading the tensor
    kv_block_video: torch.Tensor  # [num_kv_blocks] bool: a valid block of video tokens (what the KV rule ranks)
    kv_block_text: torch.Tensor  # [num_kv_blocks] bool: a valid block of non-video tokens (always attended)


def _slot_order(video_shape, tile, window):
    """Raster index and validity of every tile-major slot of the tile-padded video, as numpy."""
    padded = [-(-n // t) * t for n, t in zip(video_shape, tile)]
    t, h, w = np.meshgrid(*[np.arange(p) for p in padded], indexing="ij")
    valid = (t < video_shape[0]) & (h < video_shape[1]) & (w < video_shape[2])
    raster = np.where(valid, (t * video_shape[1] + h) * video_shape[2] + w, 0)
    pattern = "(nt at wt) (nh ah wh) (nw aw ww) -> (nt nh nw at ah aw wt wh ww)"
    sizes = dict(wt=window[0], wh=window[1], ww=window[2],
                 at=tile[0] // window[0], ah=tile[1] // window[1], aw=tile[2] // window[2])
    return rearrange(raster, pattern, **sizes), rearrange(valid, pattern, **sizes)


def _window_anchors(valid_by_window: np.ndarray, window) -> np.ndarray:
    """Per window, the real token nearest the window's centre (ties: lowest index)."""
    coords = np.stack(np.meshgrid(*[np.arange(n) for n in window], indexing="ij"), -1).reshape(-1, 3)
    centre = np.array([n // 2 for n in window])
    nearest_first = np.argsort(((coords - centre) ** 2).sum(-1), kind="stable")
    first_valid = valid_by_window[:, nearest_first].argmax(axis=1)
    return nearest_first[first_valid]


def _whole_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size) * block_size


def _slots(video_shape, tile, window, block_size: int, text_tokens: tuple[int, int]):
    """(slot_token, slot_valid, text_slot_start) as numpy: the tile-padded video's slots padded to whole
    blocks, then the non-video tokens' slots, padded to whole blocks too."""
    prefix, suffix = text_tokens
    video_token, video_valid = _slot_order(video_shape, tile, window)
    text_start = _whole_blocks(video_token.shape[0], block_size)
    text_token = np.concatenate([np.arange(prefix), prefix + math.prod(video_shape) + np.arange(suffix)])
    text_slots = _whole_blocks(text_token.shape[0], block_size)
    video_slot_token = np.where(video_valid, video_token + prefix, 0)
    slot_token = np.concatenate([np.pad(video_slot_token, (0, text_start - video_token.shape[0])),
                                 np.pad(text_token.astype(np.int64), (0, text_slots - text_token.shape[0]))])
    slot_valid = np.concatenate([np.pad(video_valid, (0, text_start - video_valid.shape[0])),
                                 np.arange(text_slots) < text_token.shape[0]])
    return slot_token, slot_valid, text_start


def _token_maps(slot_token: np.ndarray, slot_valid: np.ndarray):
    """(token_slot, tile_order, tile_position) as numpy: each token's slot, the tokens in slot order
    without padding, and each token's place in that order."""
    tile_order = slot_token[slot_valid]
    token_slot, tile_position = np.empty_like(tile_order), np.empty_like(tile_order)
    token_slot[tile_order] = np.flatnonzero(slot_valid)
    tile_position[tile_order] = np.arange(tile_order.shape[0])
    return token_slot, tile_order, tile_position


@functools.lru_cache(maxsize=64)
def tile_layout(video_shape: tuple[int, int, int], tile: tuple[int, int, int],
                window: tuple[int, int, int], block_size: int, device: torch.device,
                text_tokens: tuple[int, int] = (0, 0)) -> TileLayout:
    """Build (once per key) the tile-major layout; arguments are assumed validated by the caller.

    ``text_tokens``: (prefix, suffix), the non-video tokens before and after the video.
    """
    prefix, suffix = text_tokens
    slot_token, slot_valid, text_start = _slots(video_shape, tile, window, block_size, text_tokens)
    anchors = _window_anchors(slot_valid[:math.prod(-(-n // t) * t for n, t in zip(video_shape, tile))]
                              .reshape(-1, math.prod(window)), window)
    num_video, n_slots = math.prod(video_shape), slot_token.shape[0]
    token_slot, tile_order, tile_position = _token_maps(slot_token, slot_valid)
    block_count = slot_valid.reshape(-1, block_size).sum(1)
    is_partial = (block_count > 0) & (block_count < block_size)
    is_text_block = np.arange(n_slots // block_size) >= text_start // block_size

    def as_tensor(a, dtype):
        return torch.as_tensor(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

    tile_tokens, window_tokens = math.prod(tile), math.prod(window)
    num_tiles = math.prod(-(-n // t) for n, t in zip(video_shape, tile))
    return TileLayout(
        video_shape=tuple(video_shape), tile=tuple(tile), window=tuple(window), block_size=block_size,
        num_prefix=prefix, num_suffix=suffix, num_tokens=prefix + num_video + suffix,
        tile_tokens=tile_tokens, window_tokens=window_tokens,
        windows_per_tile=tile_tokens // window_tokens, num_tiles=num_tiles,
        num_windows=num_tiles * tile_tokens // window_tokens, num_video_slots=num_tiles * tile_tokens,
        text_slot_start=text_start, num_slots=n_slots, num_kv_blocks=n_slots // block_size,
        slot_token=as_tensor(slot_token, torch.int64), slot_valid=as_tensor(slot_valid, torch.bool),
        token_slot=as_tensor(token_slot, torch.int64), tile_order=as_tensor(tile_order, torch.int64),
        tile_position=as_tensor(tile_position, torch.int64), window_anchor=as_tensor(anchors, torch.int64),
        kv_block_valid_count=as_tensor(block_count, torch.int64),
        kv_block_valid=as_tensor(block_count > 0, torch.bool),
        kv_block_partial=as_tensor(is_partial, torch.bool), has_partial_kv_blocks=bool(is_partial.any()),
        kv_block_video=as_tensor((block_count > 0) & ~is_text_block, torch.bool),
        kv_block_text=as_tensor((block_count > 0) & is_text_block, torch.bool),
    )
