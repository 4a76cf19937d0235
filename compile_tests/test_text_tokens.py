"""Joint attention: non-video (text) tokens before and after the video are never tiled or pruned."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import bsa_flex
from bsa_flex import BSAConfig
from bsa_flex.testing import assert_matches_oracle, attention_inputs, configs, video_shapes
from masks import token_mask, tile_layout

CPU = torch.device("cpu")
TEXT = st.tuples(st.integers(0, 40), st.integers(0, 40)).filter(lambda t: t != (0, 0))


@settings(max_examples=80)
@given(attention_inputs(requires_grad=True, max_text_tokens=40), configs())
def test_blockwise_path_with_text_matches_oracle_forward_and_gradients(inputs, config):
    stats = assert_matches_oracle(*inputs.qkv, inputs.video_shape, config, enable_gqa=inputs.enable_gqa,
                                  text_tokens=inputs.text_tokens, check_grads=True)
    assert stats.path == "blockwise"


CASE = dict(video_shape=(3, 5, 7), config=BSAConfig(tile=(2, 2, 2), window=(1, 2, 2), block_size=16), text=(13, 7))


@settings(max_examples=10)
@given(st.integers(0, 2**31 - 1), st.floats(0.1, 1.0))
def test_compiled_path_with_text_matches_oracle(seed, threshold):
    """One compile (fixed shapes), fresh data and thresholds."""
    q, k, v = _inputs(seed, CASE["video_shape"], CASE["text"])
    config = BSAConfig(**{**CASE["config"].__dict__, "kv_threshold": threshold})
    with torch.no_grad():
        stats = assert_matches_oracle(q, k, v, CASE["video_shape"], config, enable_gqa=True, text_tokens=CASE["text"])
    assert stats.path == "flex"


def _inputs(seed, video_shape, text):
    g = torch.Generator().manual_seed(seed)
    n = text[0] + math.prod(video_shape) + text[1]
    q, k, v = (torch.randn(2, heads, n, 16, generator=g) * 2 for heads in (4, 2, 2))
    return q, k, v


@given(st.integers(0, 2**31 - 1), TEXT, video_shapes(max_tokens=200), configs())
def test_text_queries_are_full_attention_over_every_key(seed, text, video_shape, config):
    q, k, v = _inputs(seed, video_shape, text)
    with torch.enable_grad():  # the blockwise path: no compile per drawn shape
        leaves = [t.requires_grad_() for t in (q, k, v)]
        out = bsa_flex.attention(*leaves, video_shape, config, enable_gqa=True, prefix_tokens=text[0],
                                 suffix_tokens=text[1])
    full = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    rows = list(range(text[0])) + list(range(q.shape[2] - text[1], q.shape[2]))
    torch.testing.assert_close(out[:, :, rows], full[:, :, rows], atol=1e-5, rtol=1e-5)


@given(st.integers(0, 2**31 - 1), TEXT, video_shapes(max_tokens=200), configs())
def test_text_tokens_do_not_change_the_video_selection(seed, text, video_shape, config):
    q, k, v = _inputs(seed, video_shape, text)
    video = slice(text[0], q.shape[2] - text[1])
    with torch.enable_grad():
        _, alone = bsa_flex.attention(*[t[:, :, video].clone().requires_grad_() for t in (q, k, v)], video_shape,
                                      config, enable_gqa=True, return_stats=True)
        _, joint = bsa_flex.attention(*[t.clone().requires_grad_() for t in (q, k, v)], video_shape, config,
                                      enable_gqa=True, prefix_tokens=text[0], suffix_tokens=text[1], return_stats=True)
    bs, cols = config.block_size, alone.selection.kv_blocks.shape[-1]
    local = int(alone.selection.local_row[0, 0].sum())  # fill "local": the pruned queries' rows come last
    n_alone, n_joint = alone.selection.kept_token.shape[-1], joint.selection.kept_token.shape[-1]
    for mine, theirs in ((slice(0, n_alone - local), slice(0, n_alone - local)),
                         (slice(n_alone - local, n_alone), slice(n_joint - local, n_joint))):
        assert torch.equal(joint.selection.kept_token[..., theirs],
                           torch.where(alone.selection.kept_valid[..., mine], alone.selection.kept_token[..., mine]
                                       + text[0], 0))
        blocks = [slice(part.start // bs, part.stop // bs) for part in (mine, theirs)]
        assert torch.equal(joint.selection.kv_blocks[:, :, blocks[1], :cols], alone.selection.kv_blocks[:, :, blocks[0]])


@given(TEXT, video_shapes(), configs())
def test_text_slots_follow_the_video_in_sequence_order_in_blocks_of_their_own(text, video_shape, config):
    layout = tile_layout(video_shape, config.tile, config.window, config.block_size, CPU, text)
    S = math.prod(video_shape)
    text_tokens = torch.cat([torch.arange(text[0]), text[0] + S + torch.arange(text[1])])
    assert layout.text_slot_start % config.block_size == 0
    assert torch.equal(layout.slot_token[layout.text_slot_start:][:text_tokens.numel()], text_tokens)
    assert torch.equal(layout.slot_token[layout.token_slot], torch.arange(layout.num_tokens))
    assert int(layout.kv_block_text.sum()) == -(-text_tokens.numel() // config.block_size)
    assert not bool((layout.kv_block_text & layout.kv_block_video).any())


def test_sparsity_counts_every_pair_of_the_joint_sequence():
    q, k, v = _inputs(3, CASE["video_shape"], CASE["text"])
    config = BSAConfig(**{**CASE["config"].__dict__, "kv_threshold": 0.3})
    with torch.enable_grad():
        _, stats = bsa_flex.attention(*[t.requires_grad_() for t in (q, k, v)], CASE["video_shape"], config,
                                      enable_gqa=True, prefix_tokens=13, suffix_tokens=7, return_stats=True)
    layout = tile_layout(CASE["video_shape"], config.tile, config.window, config.block_size, CPU, (13, 7))
    computed = token_mask(stats.selection, layout).double().sum((-1, -2))
    expected = 1.0 - computed / float(q.shape[2]) ** 2
    torch.testing.assert_close(stats.sparsity_per_head.double(), expected)
    assert 0.0 < float(stats.sparsity) < 1.0


@pytest.mark.parametrize("kwargs, error, match", [
    ({"prefix_tokens": -1}, ValueError, "prefix_tokens must be >= 0"),
    ({"suffix_tokens": 1.5}, TypeError, "suffix_tokens must be an int"),
    ({"prefix_tokens": 3}, ValueError, "plus 3 prefix and 0 suffix tokens"),
])
def test_bad_text_token_counts_are_refused_naming_the_argument(kwargs, error, match):
    q = torch.randn(1, 2, 4 * 4 * 4, 16)
    with pytest.raises(error, match=match):
        bsa_flex.attention(q, q, q, (4, 4, 4), BSAConfig(block_size=16), **kwargs)


@settings(max_examples=30)
@given(attention_inputs(requires_grad=True, max_text_tokens=24), configs())
def test_score_mod_sees_sequence_positions_with_text(inputs, config):
    from .cases import relative_position_bias
    assert_matches_oracle(*inputs.qkv, inputs.video_shape, config, enable_gqa=inputs.enable_gqa,
                          text_tokens=inputs.text_tokens, score_mod=relative_position_bias, check_grads=True)


@settings(max_examples=30)
@given(st.integers(0, 2**31 - 1), TEXT, video_shapes(max_tokens=200), configs())
def test_dense_config_with_text_equals_sdpa(seed, text, video_shape, config):
    q, k, v = _inputs(seed, video_shape, text)
    dense = BSAConfig.dense(tile=config.tile, window=config.window, block_size=config.block_size)
    with torch.enable_grad():
        out = bsa_flex.attention(*[t.clone().requires_grad_() for t in (q, k, v)], video_shape, dense,
                                 enable_gqa=True, prefix_tokens=text[0], suffix_tokens=text[1])
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, enable_gqa=True), atol=1e-5, rtol=1e-5)
