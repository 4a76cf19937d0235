"""3D tiling: the tile-major slot order and its padding."""
import math

import torch
from hypothesis import given

from bsa_flex.testing import configs, video_shapes
from masks import tile_layout


def layout_for(video_shape, config):
    return tile_layout(video_shape, config.tile, config.window, config.block_size, torch.device("cpu"))


@given(video_shapes(), configs())
def test_real_slots_hold_every_token_exactly_once(video_shape, config):
    layout = layout_for(video_shape, config)
    real = layout.slot_token[layout.slot_valid]
    assert torch.equal(real.sort().values, torch.arange(math.prod(video_shape)))


@given(video_shapes(), configs())
def test_token_slot_inverts_slot_token(video_shape, config):
    layout = layout_for(video_shape, config)
    assert torch.equal(layout.slot_token[layout.token_slot], torch.arange(layout.num_tokens))
    assert bool(layout.slot_valid[layout.token_slot].all())


@given(video_shapes(), configs())
def test_slots_pad_to_whole_kv_blocks(video_shape, config):
    layout = layout_for(video_shape, config)
    assert layout.num_slots % layout.block_size == 0
    assert layout.num_slots - layout.num_video_slots < layout.block_size
    assert int(layout.kv_block_valid_count.sum()) == layout.num_tokens


def _coords(tokens, video_shape):
    _, H, W = video_shape
    return torch.stack([tokens // (H * W), tokens // W % H, tokens % W], -1)


@given(video_shapes(), configs())
def test_windows_and_tiles_are_aligned_boxes_of_their_size(video_shape, config):
    """Consecutive slot groups of window (tile) size cover one aligned window (tile) box each;
    since windows divide tiles, every window lies inside one tile."""
    layout = layout_for(video_shape, config)
    for size, group in ((config.window, layout.window_tokens), (config.tile, layout.tile_tokens)):
        tokens = layout.slot_token[: layout.num_video_slots].view(-1, group)
        valid = layout.slot_valid[: layout.num_video_slots].view(-1, group)
        coords = _coords(tokens, video_shape)
        big = torch.iinfo(torch.int64).max
        lo = torch.where(valid[..., None], coords, big).min(1).values
        hi = torch.where(valid[..., None], coords, -1).max(1).values
        has = valid.any(1)
        extent = (hi - lo + 1)[has]
        assert bool((extent <= torch.tensor(size)).all())
        assert bool((lo[has] % torch.tensor(size) == 0).all())


@given(video_shapes(), configs())
def test_window_anchor_is_a_real_token_nearest_the_centre(video_shape, config):
    layout = layout_for(video_shape, config)
    w = layout.window_tokens
    valid = layout.slot_valid[: layout.num_video_slots].view(-1, w)
    anchor_valid = valid.gather(1, layout.window_anchor[:, None])[:, 0]
    assert torch.equal(anchor_valid, valid.any(1))
    local = torch.stack(torch.meshgrid(*[torch.arange(n) for n in config.window], indexing="ij"), -1).reshape(-1, 3)
    dist = ((local - torch.tensor([n // 2 for n in config.window])) ** 2).sum(-1)
    best = torch.where(valid, dist, 10**9).min(1).values
    assert torch.equal(dist[layout.window_anchor][valid.any(1)], best[valid.any(1)])


@given(video_shapes(), configs())
def test_partial_blocks_are_exactly_those_mixing_real_and_padding(video_shape, config):
    layout = layout_for(video_shape, config)
    per_block = layout.slot_valid.view(-1, layout.block_size)
    assert torch.equal(layout.kv_block_partial, per_block.any(1) & ~per_block.all(1))
    assert torch.equal(layout.kv_block_valid, per_block.any(1))
    assert layout.has_partial_kv_blocks == bool(layout.kv_block_partial.any())


def test_layout_is_cached_per_key():
    a = tile_layout((4, 8, 8), (4, 4, 4), (2, 2, 2), 64, torch.device("cpu"))
    b = tile_layout((4, 8, 8), (4, 4, 4), (2, 2, 2), 64, torch.device("cpu"))
    assert a is b


def test_unpadded_video_uses_no_padding_slot():
    layout = tile_layout((8, 8, 8), (4, 4, 4), (2, 2, 2), 128, torch.device("cpu"))
    assert bool(layout.slot_valid.all()) and not bool(layout.kv_block_partial.any())
