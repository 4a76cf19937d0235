"""Query sparsity: which queries each window keeps, and whose output each pruned query takes."""
import dataclasses

import torch
from hypothesis import given, settings, strategies as st

import bsa_flex
from bsa_flex import BSAConfig
from bsa_flex.testing import attention_inputs, configs, video_shapes
from masks import (compact_queries, fill_from_kept, gather_tokens, kv_block_probs, local_query_rows, pool_blocks,
                   select_queries, static_selection, tile_layout)

CPU = torch.device("cpu")


def select(inputs, config, fill=None):
    q = inputs.qkv[0]
    layout = tile_layout(inputs.video_shape, config.tile, config.window, config.block_size, CPU)
    return layout, select_queries(q, layout, config.keep_per_window, fill or config.fill)


def window_of(layout, tokens):
    return layout.token_slot[tokens] // layout.window_tokens


def kept_mask(kept, num_tokens):
    """[B, H, S] bool: the token is a real kept query (padding rows point at token 0; skip them)."""
    target = torch.where(kept.kept_valid & ~kept.local_row, kept.kept_token, num_tokens)
    mask = torch.zeros(*target.shape[:2], num_tokens + 1, dtype=torch.bool)
    return mask.scatter_(2, target, True)[..., :num_tokens]


def unit(q):
    return torch.nn.functional.normalize(q.float(), dim=-1, eps=1e-12)


@given(attention_inputs(), configs())
def test_kept_count_per_window_is_min_of_keep_and_real_tokens(inputs, config):
    layout, kept = select(inputs, config)
    B, H, _ = kept.kept_token.shape
    counts = torch.zeros(B, H, layout.num_windows, dtype=torch.long)
    counts.scatter_add_(2, window_of(layout, kept.kept_token), (kept.kept_valid & ~kept.local_row).long())
    real = torch.bincount(layout.token_slot // layout.window_tokens, minlength=layout.num_windows)
    assert torch.equal(counts, real.clamp_max(config.keep_per_window).expand_as(counts))


@given(attention_inputs(), configs())
def test_compact_length_is_whole_query_blocks_with_padding_rows_last(inputs, config):
    layout, kept = select(inputs, config)
    n_kept = layout.num_windows * config.keep_per_window
    Nq = kept.kept_token.shape[-1] - local_query_rows(layout, config.keep_per_window, config.fill)
    assert Nq % config.block_size == 0 and 0 <= Nq - n_kept < config.block_size
    assert not bool(kept.kept_valid[..., n_kept:Nq].any())


@given(attention_inputs(), configs())
def test_window_centre_is_always_kept(inputs, config):
    layout, kept = select(inputs, config)
    anchor_slot = torch.arange(layout.num_windows) * layout.window_tokens + layout.window_anchor
    anchor_token = layout.slot_token[anchor_slot][layout.slot_valid[anchor_slot]]
    is_kept = kept_mask(kept, layout.num_tokens)
    assert bool(is_kept[..., anchor_token].all())


@given(attention_inputs(), configs())
def test_kept_queries_are_the_least_similar_to_their_window_centre(inputs, config):
    layout, kept = select(inputs, config)
    q = unit(inputs.qkv[0])
    anchor_token = layout.slot_token[torch.arange(layout.num_windows) * layout.window_tokens + layout.window_anchor]
    window = layout.token_slot // layout.window_tokens  # [S]
    similarity = (q * q[:, :, anchor_token[window]]).sum(-1)  # [B, H, S] to own window's centre
    is_kept = kept_mask(kept, layout.num_tokens)
    is_anchor = anchor_token[window] == torch.arange(layout.num_tokens)  # [S]
    inf = torch.tensor(float("inf"))
    most_similar_kept = torch.full((*similarity.shape[:2], layout.num_windows), -inf)
    most_similar_kept.scatter_reduce_(2, window.expand_as(similarity),
                                      torch.where(is_kept & ~is_anchor, similarity, -inf), "amax")
    least_similar_pruned = torch.full_like(most_similar_kept, inf)
    least_similar_pruned.scatter_reduce_(2, window.expand_as(similarity),
                                         torch.where(~is_kept, similarity, inf), "amin")
    assert bool((most_similar_kept <= least_similar_pruned + 1e-6).all())


@given(attention_inputs(), configs())
def test_kept_tokens_take_their_own_output(inputs, config):
    layout, kept = select(inputs, config)
    source = kept.kept_token.gather(2, kept.fill_source)
    is_kept = kept_mask(kept, layout.num_tokens)
    token = torch.arange(layout.num_tokens).expand_as(source)
    assert torch.equal(source[is_kept], token[is_kept])


@given(attention_inputs(), configs())
def test_pruned_tokens_copy_the_most_similar_kept_query_of_their_window(inputs, config):
    layout, kept = select(inputs, config, fill="most_similar")
    q = unit(inputs.qkv[0])
    source = kept.kept_token.gather(2, kept.fill_source)  # [B, H, S]
    assert torch.equal(window_of(layout, source), (layout.token_slot // layout.window_tokens).expand_as(source))
    chosen = (q * q.gather(2, source[..., None].expand_as(q))).sum(-1)
    # best similarity to any real kept query of the same window
    kept_q = q.gather(2, kept.kept_token[..., None].expand(-1, -1, -1, q.shape[-1]))
    sim = q @ kept_q.transpose(-1, -2)  # [B, H, S, Nq]
    same_window = window_of(layout, kept.kept_token)[..., None, :] == (layout.token_slot // layout.window_tokens)[:, None]
    best = sim.masked_fill(~(same_window & kept.kept_valid[..., None, :]), -2).max(-1).values
    is_kept = kept_mask(kept, layout.num_tokens)
    assert bool((chosen[~is_kept] >= best[~is_kept] - 1e-5).all())


@given(attention_inputs(), configs())
def test_pruned_tokens_copy_the_window_centre_under_anchor_fill(inputs, config):
    layout, kept = select(inputs, config, fill="anchor")
    source = kept.kept_token.gather(2, kept.fill_source)
    anchor_token = layout.slot_token[torch.arange(layout.num_windows) * layout.window_tokens + layout.window_anchor]
    centre = anchor_token[layout.token_slot // layout.window_tokens]
    is_kept = kept_mask(kept, layout.num_tokens)
    assert torch.equal(source[~is_kept], centre.expand_as(source)[~is_kept])


@given(attention_inputs(), configs())
def test_pruned_tokens_copy_the_nearest_kept_query_of_their_window_under_nearest_fill(inputs, config):
    layout, kept = select(inputs, config, fill="nearest")
    T, H, W = inputs.video_shape
    source = kept.kept_token.gather(2, kept.fill_source) - layout.num_prefix  # video token indices
    token = torch.arange(layout.num_tokens) - layout.num_prefix
    is_video = (token >= 0) & (token < T * H * W)

    def coords(t):
        return torch.stack([t // (H * W), t // W % H, t % W], -1).float()
    distance = (coords(source) - coords(token)).square().sum(-1)  # [B, H, S]
    # brute force: the smallest distance to any real kept query of the same window
    window = layout.token_slot // layout.window_tokens
    kept_tokens = kept.kept_token - layout.num_prefix
    same_window = (window[kept.kept_token][..., None, :] == window[:, None]) & kept.kept_valid[..., None, :]
    all_distances = (coords(kept_tokens)[..., None, :, :] - coords(token)[:, None]).square().sum(-1)
    nearest = all_distances.masked_fill(~same_window, float("inf")).min(-1).values
    assert torch.equal(distance[..., is_video], nearest[..., is_video])


@given(attention_inputs(requires_grad=True), configs())
def test_none_fill_gives_pruned_tokens_output_zero_and_no_gradient(inputs, config):
    config = dataclasses.replace(config, fill="none", local_extra_kv_blocks=0)
    q, k, v = inputs.qkv
    out, stats = bsa_flex.attention(q, k, v, inputs.video_shape, config, enable_gqa=inputs.enable_gqa,
                                    return_stats=True)
    pruned = ~kept_mask(select(inputs, config)[1], out.shape[2])
    assert not bool(out[pruned].any())
    out.sum().backward()
    assert not bool(q.grad[pruned].any())  # a pruned query reaches only the (detached) selection


@given(attention_inputs(max_text_tokens=20), configs())
def test_local_fill_gives_each_pruned_token_a_row_of_its_own_after_the_kept_and_non_video_rows(inputs, config):
    config = dataclasses.replace(config, fill="local")
    layout, kept = _kept_with_text(inputs, config)
    local_rows = local_query_rows(layout, config.keep_per_window, "local")
    Nq = kept.kept_token.shape[-1]
    takes_local = kept.local_row.gather(2, kept.fill_source)
    pruned = ~kept_mask(kept, layout.num_tokens)
    assert torch.equal(takes_local, pruned)
    assert torch.equal(kept.kept_token.gather(2, kept.fill_source)[pruned],
                       torch.arange(layout.num_tokens).expand_as(pruned)[pruned])
    assert bool((kept.fill_source[pruned] >= Nq - local_rows).all())
    assert int(kept.kept_valid[..., Nq - local_rows:].sum(-1).min()) == int(pruned.sum(-1).min())


@given(attention_inputs(max_text_tokens=20), configs(), st.integers(1, 4))
def test_local_rows_extra_kv_blocks_are_the_most_probable_outside_their_own_tiles(inputs, config, extra):
    """Each block of local rows attends, beyond its tiles' and the non-video KV blocks, the ``extra`` video KV
    blocks of highest pooled probability for its own queries (ties to the lower block index)."""
    from bsa_flex.attention import select_sparse
    from bsa_flex.runtime import make_plan, threshold_tensor
    config = dataclasses.replace(config, fill="local", local_extra_kv_blocks=extra)
    q, k, v = inputs.qkv
    plan = make_plan(q, k, v, inputs.video_shape, config, text_tokens=inputs.text_tokens)
    ops = select_sparse(q, k, v, threshold_tensor(config.kv_rule_threshold, q.device), plan)
    layout, bs, local = plan.layout, config.block_size, plan.static.local_kv_blocks
    first = ops.q_kept.shape[2] - local.shape[0] * bs
    probs = kv_block_probs(pool_blocks(ops.q_kept[:, :, first:], ops.kept.kept_valid[..., first:], bs),
                           pool_blocks(ops.k_slots, layout.slot_valid, bs), layout.kv_block_video, plan.scale)
    allowed = layout.kv_block_video & ~local
    order = torch.argsort(probs.masked_fill(~allowed, -1.0), dim=-1, descending=True, stable=True)
    expected = torch.zeros_like(allowed.expand_as(probs)).scatter(
        -1, order[..., :extra], allowed.expand_as(probs).gather(-1, order[..., :extra]))
    assert torch.equal(ops.kv_blocks[:, :, first // bs:], local | expected)


@settings(max_examples=30)
@given(attention_inputs(shapes=video_shapes().filter(lambda shape: min(shape) >= 2), max_text_tokens=6,
                        requires_grad=True), st.sampled_from([0.25, 0.5, 0.75]))
def test_local_fill_gives_a_pruned_query_attention_over_its_own_tiles_kv_blocks_and_the_text(inputs, keep):
    """16-token blocks, 4x4x4 tiles, 2x2x2 windows: a tile's pruned queries fill whole query blocks, so each
    pruned query attends to exactly the KV blocks of its own tile (and the non-video keys), in float64 here."""
    config = BSAConfig(tile=(4, 4, 4), window=(2, 2, 2), block_size=16, query_keep_ratio=keep, fill="local")
    q, k, v = inputs.qkv
    out, stats = bsa_flex.attention(q, k, v, inputs.video_shape, config, enable_gqa=inputs.enable_gqa,
                                    prefix_tokens=inputs.text_tokens[0], suffix_tokens=inputs.text_tokens[1],
                                    return_stats=True)
    layout = stats.layout
    tile_start = layout.token_slot // layout.tile_tokens * layout.tile_tokens
    block = layout.token_slot // layout.block_size
    is_video = layout.token_slot < layout.num_video_slots
    first, last = tile_start // layout.block_size, (tile_start + layout.tile_tokens - 1) // layout.block_size
    in_tile = (block[None, :] >= first[:, None]) & (block[None, :] <= last[:, None]) & is_video[:, None]
    allowed = in_tile | ~is_video[None, :]  # [S query, S key]
    group = q.shape[1] // k.shape[1]
    k64, v64 = (x.detach().double().repeat_interleave(group, 1) for x in (k, v))
    scores = (q.detach().double() @ k64.transpose(-1, -2)) * q.shape[-1] ** -0.5
    want = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v64
    pruned = stats.selection.local_row.gather(2, stats.selection.fill_source)
    assert bool(pruned.any())  # every side >= 2: the first window holds 8 real tokens and keeps 2, 4 or 6
    torch.testing.assert_close(out.detach().double()[pruned], want[pruned], atol=1e-4, rtol=1e-4)
    out.sum().backward()
    assert bool(q.grad[pruned].any())  # a pruned query's own attention trains it


@given(attention_inputs(), configs())
def test_keep_ratio_one_keeps_every_token(inputs, config):
    from dataclasses import replace
    config = replace(config, query_keep_ratio=1.0)
    layout, kept = select(inputs, config)
    assert int(kept.kept_valid.sum(-1).min()) == layout.num_tokens
    assert torch.equal(kept.kept_token.gather(2, kept.fill_source),
                       torch.arange(layout.num_tokens).expand(*kept.fill_source.shape))


@given(attention_inputs(), configs(), st.data())
def test_zero_and_duplicate_queries_give_finite_repeatable_selection(inputs, config, data):
    q = inputs.qkv[0].clone()
    S = q.shape[2]
    zero = data.draw(st.lists(st.integers(0, S - 1), max_size=S))
    q[:, :, zero] = 0.0
    q[:, :, S // 2:] = q[:, :, :1]  # many identical queries
    layout = tile_layout(inputs.video_shape, config.tile, config.window, config.block_size, CPU)
    first = select_queries(q, layout, config.keep_per_window, config.fill)
    second = select_queries(q.clone(), layout, config.keep_per_window, config.fill)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@given(attention_inputs(), configs())
def test_selection_of_an_item_does_not_depend_on_the_rest_of_the_batch(inputs, config):
    layout, kept = select(inputs, config)
    q = inputs.qkv[0]
    alone = select_queries(q[-1:], layout, config.keep_per_window, config.fill)
    for together, single in zip(kept, alone):
        assert torch.equal(together[-1:], single)


def _kept_with_text(inputs, config):
    layout = tile_layout(inputs.video_shape, config.tile, config.window, config.block_size, CPU, inputs.text_tokens)
    return layout, select_queries(inputs.qkv[0], layout, config.keep_per_window, config.fill)


@given(attention_inputs(max_text_tokens=20), configs())
def test_fill_backward_sums_exactly_the_gradients_of_the_tokens_that_copy_each_row(inputs, config):
    layout, kept = _kept_with_text(inputs, config)
    B, H, rows = kept.kept_token.shape
    g = torch.Generator().manual_seed(0)
    out_kept = torch.randn(B, H, rows, 3, dtype=torch.float64, generator=g, requires_grad=True)
    grad = torch.randn(B, H, layout.num_tokens, 3, dtype=torch.float64, generator=g)
    static = static_selection(layout, config.keep_per_window, config.fill)
    out = fill_from_kept(out_kept, kept.fill_source, static.fill_candidates, static.fill_candidate_valid)
    out.backward(grad)
    assert torch.equal(out, gather_tokens(out_kept, kept.fill_source))
    expected = torch.zeros_like(out_kept).scatter_add(2, kept.fill_source[..., None].expand(-1, -1, -1, 3), grad)
    torch.testing.assert_close(out_kept.grad, expected, rtol=1e-12, atol=1e-12)


@given(attention_inputs(max_text_tokens=20), configs(), st.booleans())
def test_compact_queries_gradient_is_each_kept_tokens_row_and_zero_for_pruned_tokens(inputs, config, in_tile_order):
    """The gather's backward reads each token's own compact row: what a scatter-add of the real rows gives."""
    layout, kept = _kept_with_text(inputs, config)
    B, H, rows = kept.kept_token.shape
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, layout.num_tokens, 3, dtype=torch.float64, generator=g)
    if in_tile_order:
        q = q[:, :, layout.tile_order]
    q.requires_grad_()
    grad = torch.randn(B, H, rows, 3, dtype=torch.float64, generator=g) * kept.kept_valid[..., None]
    index = layout.tile_position[kept.kept_token] if in_tile_order else kept.kept_token
    out = compact_queries(q, kept, layout, in_tile_order)
    out.backward(grad)
    assert torch.equal(out, gather_tokens(q.detach(), index))
    expected = torch.zeros_like(q).scatter_add(2, index[..., None].expand(-1, -1, -1, 3), grad)
    assert torch.equal(q.grad, expected)


@settings(max_examples=40)
@given(attention_inputs(), configs(), st.integers(1, 4))
def test_kept_queries_are_the_first_of_a_stable_sort_of_the_keep_order(inputs, config, levels):
    """The closed form (ranks by pairwise comparison) keeps exactly what a stable sort of the
    keep order would keep, ties included (queries quantised to a few levels make many)."""
    from masks.query_selection import _keep_order_score, _window_queries
    q = (inputs.qkv[0] * levels).round() / levels
    layout = tile_layout(inputs.video_shape, config.tile, config.window, config.block_size, CPU)
    k, w, n = config.keep_per_window, layout.window_tokens, layout.num_windows
    kept = select_queries(q, layout, k, config.fill)
    if k < w:
        score = _keep_order_score(_window_queries(q, layout, in_tile_order=False), layout)
        first_k = torch.argsort(score, dim=-1, stable=True)[..., :k]
        local = first_k.sort(-1).values
    else:
        local = torch.arange(w).expand(*q.shape[:2], n, w)
    want = layout.slot_token[(torch.arange(n)[:, None] * w + local).flatten(2)]
    assert torch.equal(kept.kept_token[..., :n * k], want)
