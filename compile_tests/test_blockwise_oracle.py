"""The CPU autograd (blockwise) path against the float64 oracle, fuzzed widely: it is cheap."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import bsa_flex
from bsa_flex import BSAConfig
from bsa_flex.synthetic import video_qkv
from bsa_flex.testing import assert_matches_oracle, attention_inputs, check_selection, configs
from masks import Selection, reference_attention, tile_layout, tokens_with_same_selection

from .cases import relative_position_bias


@settings(max_examples=150)
@given(attention_inputs(requires_grad=True), configs())
def test_blockwise_path_matches_oracle_forward_and_gradients(inputs, config):
    stats = assert_matches_oracle(*inputs.qkv, inputs.video_shape, config, enable_gqa=inputs.enable_gqa,
                                  check_grads=True)
    assert stats.path == "blockwise"


@settings(max_examples=40)
@given(attention_inputs(requires_grad=True, dtypes=(torch.bfloat16, torch.float16)), configs())
def test_blockwise_path_matches_oracle_in_half_precision(inputs, config):
    assert_matches_oracle(*inputs.qkv, inputs.video_shape, config, enable_gqa=inputs.enable_gqa, check_grads=True)


@settings(max_examples=40)
@given(attention_inputs(requires_grad=True), configs())
def test_score_mod_sees_raster_positions_on_the_blockwise_path(inputs, config):
    assert_matches_oracle(*inputs.qkv, inputs.video_shape, config, enable_gqa=inputs.enable_gqa,
                          score_mod=relative_position_bias, check_grads=True)


@settings(max_examples=40)
@given(attention_inputs(requires_grad=True), configs())
def test_dense_config_equals_sdpa_with_gradients(inputs, config):
    config = replace(config, query_keep_ratio=1.0, kv_threshold=1.0, kv_rule="cumulative", max_kv_blocks=None,
                     kv_budget=None)
    q, k, v = inputs.qkv
    out = bsa_flex.attention(q, k, v, inputs.video_shape, config, enable_gqa=inputs.enable_gqa)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*leaves, enable_gqa=inputs.enable_gqa)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    for got, want in zip((q, k, v), leaves):  # both float32: 1e-3 relative, above an RMS floor of float32 rounding
        error, scale = (got.grad - want.grad).double().norm(), want.grad.double().norm()  # (one key: dq is noise)
        assert error <= 1e-3 * scale + 1e-5 * want.grad.numel() ** 0.5


@given(attention_inputs(), configs())
def test_sparsity_counts_the_token_pairs_not_computed(inputs, config):
    from masks import token_mask
    q, k, v = (t.detach().requires_grad_() for t in inputs.qkv)
    _, stats = bsa_flex.attention(q, k, v, inputs.video_shape, config, enable_gqa=inputs.enable_gqa,
                                  return_stats=True)
    layout = tile_layout(inputs.video_shape, config.tile, config.window, config.block_size, torch.device("cpu"))
    computed = token_mask(stats.selection, layout).double().mean((-1, -2))
    torch.testing.assert_close(stats.sparsity_per_head.double(), 1 - computed, atol=1e-6, rtol=0)
    assert 0.0 <= float(stats.kv_density.min()) and float(stats.kv_density.max()) <= 1.0


@given(attention_inputs(), configs())
def test_local_fill_keeps_the_copy_rules_selection_and_kept_fraction_and_pays_its_rows_in_the_sparsity(inputs,
                                                                                                      config):
    q, k, v = (t.detach().requires_grad_() for t in inputs.qkv)
    copy_config = replace(config, fill="most_similar", local_extra_kv_blocks=0)
    runs = [bsa_flex.attention(q, k, v, inputs.video_shape, c, enable_gqa=inputs.enable_gqa, return_stats=True)[1]
            for c in (copy_config, replace(config, fill="local"))]
    copy, local = runs
    kept_rows = copy.selection.kept_token.shape[-1]
    assert torch.equal(local.selection.kept_token[..., :kept_rows], copy.selection.kept_token)
    bs = config.block_size
    assert torch.equal(local.selection.kv_blocks[:, :, :kept_rows // bs], copy.selection.kv_blocks)
    assert float(local.kept_query_fraction) == float(copy.kept_query_fraction)
    assert bool((local.sparsity_per_head <= copy.sparsity_per_head).all())
    has_local_rows = bool((local.selection.local_row & local.selection.kept_valid).any())  # real pruned queries
    assert has_local_rows == bool((local.sparsity_per_head < copy.sparsity_per_head).any())


@given(attention_inputs(), configs())
def test_dense_config_reports_zero_sparsity(inputs, config):
    config = replace(config, query_keep_ratio=1.0, kv_threshold=1.0, kv_rule="cumulative", max_kv_blocks=None,
                     kv_budget=None)
    _, stats = bsa_flex.attention(*(t.requires_grad_() for t in inputs.qkv), inputs.video_shape, config,
                                  enable_gqa=inputs.enable_gqa, return_stats=True)
    assert float(stats.sparsity) == pytest.approx(0.0, abs=1e-6)
    assert float(stats.kept_query_fraction) == pytest.approx(1.0)


@given(attention_inputs(requires_grad=True), configs())
def test_batch_equals_its_items_run_one_by_one(inputs, config):
    q, k, v = inputs.qkv
    together = bsa_flex.attention(q, k, v, inputs.video_shape, config, enable_gqa=inputs.enable_gqa)
    for i in range(q.shape[0]):
        alone = bsa_flex.attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], inputs.video_shape, config,
                                   enable_gqa=inputs.enable_gqa)
        torch.testing.assert_close(together[i:i + 1], alone, atol=1e-6, rtol=1e-6)


# The checks must be able to fail: feed them wrong selections and wrong outputs.

def _stats(inputs, config):
    q, k, v = (t.detach().requires_grad_() for t in inputs.qkv)
    layout = tile_layout(inputs.video_shape, config.tile, config.window, config.block_size, torch.device("cpu"))
    return bsa_flex.attention(q, k, v, inputs.video_shape, config, enable_gqa=inputs.enable_gqa,
                              return_stats=True), layout


CORRUPTIONS = ["drop_all_kv_blocks", "select_padding_block", "copy_from_another_window", "unkeep_a_query"]


@given(attention_inputs(shapes=st.just((3, 5, 7))), st.sampled_from(CORRUPTIONS))
def test_check_selection_rejects_corrupted_selections(inputs, corruption):
    config = BSAConfig(tile=(4, 4, 4), window=(2, 2, 2), block_size=16, query_keep_ratio=0.5)
    (_, stats), layout = _stats(inputs, config)
    padding_blocks = (~layout.kv_block_valid).nonzero()[:, 0]
    assert len(padding_blocks) > 0  # (3, 5, 7) in 4x4x4 tiles has 16-slot blocks of padding only
    kept_token, kept_valid, fill_source, kv_blocks, local_row = (t.clone() for t in stats.selection)
    if corruption == "drop_all_kv_blocks":
        kv_blocks[..., 0, :] = False
    elif corruption == "select_padding_block":
        kv_blocks[..., padding_blocks[0]] = True
    elif corruption == "copy_from_another_window":
        fill_source[..., 0] = kept_token.shape[-1] - 1  # token 0 lies in the first window, that row in the last
    else:
        kept_valid[..., 0] = False
    with pytest.raises(AssertionError):
        check_selection(Selection(kept_token, kept_valid, fill_source, kv_blocks, local_row), layout, config)


@given(attention_inputs(shapes=st.just((3, 5, 7))))
def test_oracle_tells_apart_a_different_kv_selection(inputs):
    config = BSAConfig(tile=(2, 2, 2), window=(1, 2, 2), block_size=16, kv_threshold=0.3, min_kv_blocks=1)
    (out, stats), layout = _stats(inputs, config)
    kv_blocks = stats.selection.kv_blocks.clone()
    kv_blocks[..., 0, :] = ~kv_blocks[..., 0, :] & layout.kv_block_valid
    if not bool(kv_blocks[..., 0, :].any(-1).all()):
        kv_blocks[..., 0, 0] = True
    other = stats.selection._replace(kv_blocks=kv_blocks)
    ref, _ = reference_attention(*inputs.qkv, other, layout, scale=inputs.qkv[0].shape[-1] ** -0.5)
    assert not torch.allclose(out.double(), ref, atol=1e-4)


@given(attention_inputs(shapes=st.just((3, 5, 7))), st.data())
def test_tokens_with_same_selection_are_exactly_those_whose_query_and_kv_blocks_did_not_change(inputs, data):
    config = BSAConfig(tile=(2, 2, 2), window=(1, 2, 2), block_size=16, kv_threshold=0.5, query_keep_ratio=0.5)
    (_, stats), layout = _stats(inputs, config)
    a, bs = stats.selection, layout.block_size
    row = data.draw(st.integers(0, a.kept_token.shape[-1] - 2))  # swap the queries of rows row and row+1
    block = data.draw(st.integers(0, a.kv_blocks.shape[-2] - 1))  # this query block gains every valid KV block
    kept_token, kv_blocks = a.kept_token.clone(), a.kv_blocks.clone()
    kept_token[..., [row, row + 1]] = a.kept_token[..., [row + 1, row]]
    kv_blocks[..., block, :] = layout.kv_block_valid
    b = a._replace(kept_token=kept_token, kv_blocks=kv_blocks)
    query_moved = (a.kept_token != kept_token).gather(2, a.fill_source)
    blocks_changed = (a.kv_blocks != kv_blocks).any(-1).gather(2, a.fill_source // bs)
    assert torch.equal(tokens_with_same_selection(a, b, bs), ~(query_moved | blocks_changed))
    assert bool(tokens_with_same_selection(a, a, bs).all())


def test_outputs_of_two_selections_agree_on_tokens_with_same_selection():
    q, k, v = video_qkv(1, 2, 2, (4, 4, 8), 16, seed=3)
    config = BSAConfig(tile=(2, 2, 4), window=(1, 2, 2), block_size=16, kv_threshold=0.5, query_keep_ratio=0.5)
    layout = tile_layout((4, 4, 8), config.tile, config.window, config.block_size, torch.device("cpu"))
    _, stats = bsa_flex.attention(q, k, v, (4, 4, 8), config, return_stats=True)
    a = stats.selection
    kv_blocks = a.kv_blocks.clone()
    kv_blocks[..., 1, :] = layout.kv_block_valid  # a second run that chose differently for query block 1
    b = a._replace(kv_blocks=kv_blocks)
    same = tokens_with_same_selection(a, b, layout.block_size)
    out_a, _ = reference_attention(q, k, v, a, layout, scale=0.25)
    out_b, _ = reference_attention(q, k, v, b, layout, scale=0.25)
    assert 0 < int((~same).sum()) < same.numel()
    torch.testing.assert_close(out_a[same], out_b[same], rtol=0, atol=1e-12)
    assert not torch.allclose(out_a[~same], out_b[~same], atol=1e-6)


def test_cpu_training_inside_a_compiled_model_warns_and_equals_eager():
    """Under a user's torch.compile the CPU training path is one announced graph break."""
    video_shape, config = (2, 4, 8), BSAConfig(tile=(2, 2, 2), window=(1, 2, 2), block_size=16)
    q, k, v = (t.requires_grad_() for t in video_qkv(1, 2, 2, video_shape, 16, seed=5))
    model = torch.compile(lambda q, k, v: bsa_flex.attention(q, k, v, video_shape, config) * 2.0)
    with pytest.warns(bsa_flex.BSAEagerWarning, match="graph break"):
        out = model(q, k, v)
    out.sum().backward()
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    expected = bsa_flex.attention(*leaves, video_shape, config) * 2.0
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for got, want in zip((q, k, v), leaves):
        torch.testing.assert_close(got.grad, want.grad)


def test_cpu_training_never_holds_more_than_one_chunk_of_gathered_blocks(monkeypatch):
    """The blockwise path attends chunks of query blocks and heads, each recomputed in the backward:
    no tensor of its forward or backward grows past q, k or v's size (the gathered copies of every
    selected block at once were larger than an S x S score matrix at real sizes)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from bsa_flex import paths

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    LargestTensor.largest = max(LargestTensor.largest, t.numel())
            return out

    monkeypatch.setattr(paths, "BLOCKWISE_CHUNK_BYTES", 2**20)
    q, k, v = video_qkv(1, 4, 4, (8, 16, 16), 32, seed=0, sharpness=2.0, requires_grad=True)
    with LargestTensor():
        out, stats = bsa_flex.attention(q, k, v, (8, 16, 16), BSAConfig(block_size=64), return_stats=True)
        out.sum().backward()
    assert stats.kernel == "blockwise" and float(stats.kv_density.mean()) > 0.3  # many blocks gathered
    assert LargestTensor.largest <= q.numel(), (LargestTensor.largest, q.numel())
