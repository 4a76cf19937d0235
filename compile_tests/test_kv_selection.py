"""KV sparsity: block scores, the statistical threshold, and what is always / never kept."""
import dataclasses
import math

import torch
from hypothesis import given, strategies as st

from bsa_flex.testing import attention_inputs, configs
from masks import (gather_tokens, kv_block_probs, own_kv_blocks, pool_blocks, select_kv_blocks,
                   select_queries, tile_layout, to_tile_major, video_query_rows)

CPU = torch.device("cpu")


@st.composite
def block_probs(draw, max_q_blocks=6, max_kv_blocks=12):
    """Random softmax rows [B, H, nq, nkv] (with ties) and a validity vector over KV blocks."""
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, max_q_blocks)),
             draw(st.integers(1, max_kv_blocks)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = torch.randn(shape, generator=g) * draw(st.floats(0.0, 6.0))
    if draw(st.booleans()):
        logits = logits.round()  # ties
    valid = torch.rand(shape[-1], generator=g) < 0.8
    valid[draw(st.integers(0, shape[-1] - 1))] = True
    return logits.masked_fill(~valid, float("-inf")).softmax(-1), valid


def rule_only(probs, valid, threshold, rule="cumulative", min_blocks=0, max_blocks=None):
    own = torch.zeros(probs.shape[-2:], dtype=torch.bool)
    return select_kv_blocks(probs, own, valid, torch.tensor(threshold), rule, min_blocks=min_blocks,
                            max_blocks=max_blocks)


@given(block_probs(), st.floats(0.01, 0.999))
def test_cumulative_rule_reaches_the_target_mass(pv, p):
    probs, valid = pv
    kept = rule_only(probs, valid, p)
    assert bool(((probs * kept).sum(-1) >= p - 1e-5).all())


@given(block_probs(), st.floats(0.01, 0.999))
def test_cumulative_rule_keeps_the_fewest_blocks(pv, p):
    probs, valid = pv
    kept = rule_only(probs, valid, p)
    smallest_kept = probs.masked_fill(~kept, float("inf")).min(-1).values
    assert bool(((probs * kept).sum(-1) - smallest_kept < p + 1e-5).all())


@given(block_probs(), st.floats(0.01, 0.999))
def test_cumulative_rule_keeps_the_most_probable_blocks(pv, p):
    probs, valid = pv
    kept = rule_only(probs, valid, p)
    smallest_kept = probs.masked_fill(~kept, float("inf")).min(-1).values
    largest_dropped = probs.masked_fill(kept | ~valid, -1.0).max(-1).values
    assert bool((largest_dropped <= smallest_kept).all())


@given(block_probs())
def test_threshold_one_keeps_every_real_block(pv):
    probs, valid = pv
    assert torch.equal(rule_only(probs, valid, 1.0), valid.expand_as(probs))


@given(block_probs(), st.floats(-1.0, 3.0))
def test_zscore_rule_keeps_blocks_above_mean_plus_z_std(pv, z):
    probs, valid = pv
    kept = rule_only(probs, valid, z, rule="zscore")
    n = valid.sum()
    mean = 1.0 / n
    std = (((probs - mean) ** 2) * valid).sum(-1, keepdim=True).div(n).sqrt()
    expected = (probs >= mean + z * std) & valid
    margin = (probs - (mean + z * std)).abs() > 1e-6  # ignore float ties at the cut
    assert torch.equal(kept[margin.expand_as(kept)], expected[margin.expand_as(kept)])


@given(block_probs(), st.integers(0, 5))
def test_min_blocks_are_the_most_probable_real_blocks(pv, m):
    probs, valid = pv
    kept = rule_only(probs, valid, 0.01, min_blocks=m)
    expected = torch.minimum(torch.tensor(max(m, 1)), valid.sum())
    assert bool((kept.sum(-1) >= expected).all())


@given(block_probs(), st.integers(1, 4))
def test_max_blocks_caps_what_the_rule_adds(pv, cap):
    probs, valid = pv
    kept = rule_only(probs, valid, 1.0, max_blocks=cap)
    assert bool((kept.sum(-1) <= cap).all())


@given(block_probs(), st.floats(0.01, 1.0), st.data())
def test_own_blocks_are_always_kept_and_padding_blocks_never(pv, p, data):
    probs, valid = pv
    own = torch.rand(probs.shape[-2:], generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99)))) < 0.3
    kept = select_kv_blocks(probs, own, valid, torch.tensor(p), "cumulative", min_blocks=0, max_blocks=1)
    assert bool(kept[..., own & valid].all())
    assert not bool(kept[..., ~valid].any())


@given(block_probs())
def test_equal_probabilities_resolve_to_the_lowest_block_index(pv):
    probs, valid = pv
    flat = valid.float().expand_as(probs) / valid.sum()
    kept = rule_only(flat, valid, 1e-3)  # the rule needs one block: the first real one
    first_real = int(valid.nonzero()[0])
    assert bool(kept[..., first_real].all()) and bool((kept.sum(-1) == 1).all())


def _pooled_inputs(inputs, config):
    """The layout, the kept video queries' rows (what the KV rule scores: not the local rows of fill "local"),
    their compact q and the tile-major k."""
    q, k, _ = inputs.qkv
    layout = tile_layout(inputs.video_shape, config.tile, config.window, config.block_size, CPU)
    kept = select_queries(q, layout, config.keep_per_window, config.fill)
    rows = video_query_rows(layout, config.keep_per_window)
    kept = kept._replace(kept_token=kept.kept_token[..., :rows], kept_valid=kept.kept_valid[..., :rows],
                         local_row=kept.local_row[..., :rows])
    return layout, kept, gather_tokens(q, kept.kept_token), to_tile_major(k, layout)


@given(attention_inputs(), configs())
def test_block_probs_are_the_softmax_of_pooled_scores(inputs, config):
    layout, kept, q_kept, k_slots = _pooled_inputs(inputs, config)
    bs = config.block_size
    scale = q_kept.shape[-1] ** -0.5
    probs = kv_block_probs(pool_blocks(q_kept, kept.kept_valid, bs), pool_blocks(k_slots, layout.slot_valid, bs),
                           layout.kv_block_valid, scale)
    # brute force in float64: mean of real rows, GQA head mapping h -> h // group
    group = q_kept.shape[1] // k_slots.shape[1]
    qb = q_kept.double().unflatten(2, (-1, bs))
    qv = kept.kept_valid.unflatten(2, (-1, bs))[..., None]
    kb = k_slots.double().repeat_interleave(group, 1).unflatten(2, (-1, bs))
    kv = layout.slot_valid.view(-1, bs)[..., None]
    pq = (qb * qv).sum(-2) / qv.sum(-2).clamp_min(1)
    pk = (kb * kv).sum(-2) / kv.sum(-2).clamp_min(1)
    expected = (pq @ pk.transpose(-1, -2) * scale).masked_fill(~layout.kv_block_valid, float("-inf")).softmax(-1)
    torch.testing.assert_close(probs.double(), expected, atol=1e-5, rtol=1e-4)


@given(attention_inputs(), configs())
def test_pooling_ignores_whatever_padding_slots_hold(inputs, config):
    layout, _, _, k_slots = _pooled_inputs(inputs, config)
    garbage = k_slots.clone()
    garbage[:, :, ~layout.slot_valid] = float("nan")
    bs = config.block_size
    torch.testing.assert_close(pool_blocks(garbage, layout.slot_valid, bs), pool_blocks(k_slots, layout.slot_valid, bs))


@given(attention_inputs(), configs())
def test_own_blocks_cover_the_tiles_whose_queries_fill_the_query_block(inputs, config):
    layout, kept, _, _ = _pooled_inputs(inputs, config)
    bs = config.block_size
    n_q_blocks = kept.kept_token.shape[-1] // bs
    own = own_kv_blocks(layout, config.keep_per_window, n_q_blocks)
    # brute force: tiles of the (real or padding-of-a-window) kept rows, then the blocks of their slots
    n_kept = layout.num_windows * config.keep_per_window
    row_tile = torch.arange(n_kept) // (layout.windows_per_tile * config.keep_per_window)
    expected = torch.zeros(n_q_blocks, layout.num_kv_blocks, dtype=torch.bool)
    for row, tile in enumerate(row_tile.tolist()):
        slots = torch.arange(tile * layout.tile_tokens, (tile + 1) * layout.tile_tokens)
        expected[row // bs, slots // bs] = True
    expected[:, ~layout.kv_block_valid] = False
    assert torch.equal(own, expected)


@given(block_probs(), st.sampled_from([0.0, -1.0, 2.0, float("nan"), float("inf"), float("-inf")]))
def test_a_cumulative_threshold_outside_its_range_acts_as_the_nearest_valid_value(pv, bad):
    """p <= 0 acts as the smallest positive p (the most probable block), p > 1 and NaN as 1.0
    (every block): a bad value never makes attention sparser than a valid one would."""
    probs, valid = pv
    nearest = 1.0 if not bad <= 0.0 else torch.finfo(torch.float32).tiny
    assert torch.equal(rule_only(probs, valid, bad), rule_only(probs, valid, nearest))


@given(block_probs(), st.sampled_from([float("nan"), float("inf"), float("-inf"), 3e6, -3e6]))
def test_a_zscore_threshold_outside_its_range_acts_as_the_nearest_valid_value(pv, bad):
    probs, valid = pv
    nearest = -1e6 if bad != bad or bad < 0 else 1e6  # NaN: the densest
    assert torch.equal(rule_only(probs, valid, bad, rule="zscore"), rule_only(probs, valid, nearest, rule="zscore"))


def test_a_threshold_tensor_set_out_of_range_in_place_runs_as_the_nearest_valid_value():
    import bsa_flex
    from bsa_flex import BSAConfig
    from bsa_flex.synthetic import video_qkv
    q, k, v = video_qkv(1, 2, 2, (4, 8, 8), 16, seed=3, sharpness=4.0)
    threshold = torch.tensor(0.5)
    config = BSAConfig(kv_threshold=threshold, block_size=32)
    threshold.fill_(float("nan"))
    _, stats = bsa_flex.attention(q, k, v, (4, 8, 8), config, return_stats=True)
    _, dense_kv = bsa_flex.attention(q, k, v, (4, 8, 8), BSAConfig(kv_threshold=1.0, block_size=32), return_stats=True)
    assert torch.equal(stats.selection.kv_blocks, dense_kv.selection.kv_blocks)


@given(attention_inputs(), configs())
def test_unforced_own_blocks_leave_the_choice_to_the_rule(inputs, config):
    """force_own_kv_blocks=False: the selection is the rule's (and min_kv_blocks') alone."""
    import bsa_flex
    config = dataclasses.replace(config, force_own_kv_blocks=False, min_kv_blocks=max(1, config.min_kv_blocks))
    layout, kept, q_kept, k_slots = _pooled_inputs(inputs, config)
    bs = config.block_size
    probs = kv_block_probs(pool_blocks(q_kept, kept.kept_valid, bs), pool_blocks(k_slots, layout.slot_valid, bs),
                           layout.kv_block_valid, q_kept.shape[-1] ** -0.5)
    threshold = config.kv_rule_threshold
    expected = select_kv_blocks(probs, None, layout.kv_block_valid, torch.tensor(threshold), config.kv_rule,
                                min_blocks=config.min_kv_blocks,
                                max_blocks=config.kv_block_cap(layout.text_slot_start // bs))
    q, k, v = (t.detach().requires_grad_() for t in inputs.qkv)  # the eager (blockwise) path: no compile
    _, stats = bsa_flex.attention(q, k, v, inputs.video_shape, config, enable_gqa=inputs.enable_gqa, return_stats=True)
    assert torch.equal(stats.selection.kv_blocks[:, :, :probs.shape[-2]], expected)


@given(attention_inputs(), configs(), st.floats(0.05, 1.0))
def test_a_kv_budget_selects_as_the_block_cap_it_stands_for(inputs, config, budget):
    """kv_budget=f is max_kv_blocks=ceil(f * the video's KV blocks) at every sequence length."""
    import bsa_flex
    layout = tile_layout(inputs.video_shape, config.tile, config.window, config.block_size, CPU)
    cap = max(1, math.ceil(budget * (layout.text_slot_start // config.block_size) - 1e-9))
    selections = []
    for capped in (dataclasses.replace(config, max_kv_blocks=None, kv_budget=budget),
                   dataclasses.replace(config, max_kv_blocks=cap, kv_budget=None)):
        q, k, v = (t.detach().requires_grad_() for t in inputs.qkv)  # the eager (blockwise) path: no compile
        _, stats = bsa_flex.attention(q, k, v, inputs.video_shape, capped, enable_gqa=inputs.enable_gqa,
                                      return_stats=True)
        selections.append(stats.selection.kv_blocks)
    assert torch.equal(*selections)
