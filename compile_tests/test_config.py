"""BSAConfig: defaults, derived values and validation of every field."""
import math

import pytest
import torch

from bsa_flex import BSAConfig


def test_default_config_keeps_every_query_and_prunes_key_value_blocks():
    """The split that trained to parity (docs/training.md): the KV side alone."""
    config = BSAConfig()
    assert config.query_keep_ratio == 1.0 and config.keep_per_window == 8 and config.kv_threshold < 1.0


def test_dense_config_keeps_everything():
    config = BSAConfig.dense(tile=(2, 2, 2))
    assert (config.query_keep_ratio, config.kv_threshold, config.tile) == (1.0, 1.0, (2, 2, 2))


@pytest.mark.parametrize("ratio,window,expected", [
    (0.5, (2, 2, 2), 4), (1.0, (2, 2, 2), 8), (0.3, (2, 2, 2), 3), (0.01, (2, 2, 2), 1), (0.5, (1, 1, 1), 1),
    (0.75, (1, 2, 2), 3),
])
def test_keep_per_window_is_ceil_of_ratio_times_window(ratio, window, expected):
    assert BSAConfig(query_keep_ratio=ratio, window=window, tile=(4, 4, 4)).keep_per_window == expected


def test_lists_are_normalised_to_tuples():
    config = BSAConfig(tile=[4, 4, 4], window=[2, 2, 2])
    assert config.tile == (4, 4, 4) and config.window == (2, 2, 2)
    hash(config)


@pytest.mark.parametrize("field,value,error", [
    ("query_keep_ratio", 0.0, ValueError), ("query_keep_ratio", 1.5, ValueError),
    ("query_keep_ratio", math.nan, ValueError), ("query_keep_ratio", "0.5", TypeError),
    ("query_keep_ratio", True, TypeError),
    ("kv_threshold", 0.0, ValueError), ("kv_threshold", 1.01, ValueError), ("kv_threshold", math.inf, ValueError),
    ("kv_threshold", None, TypeError), ("kv_threshold", torch.ones(2), TypeError),
    ("kv_threshold", torch.tensor(2.0), ValueError), ("kv_threshold", torch.tensor(1), TypeError),
    ("kv_zscore", math.nan, ValueError), ("kv_zscore", "1", TypeError),
    ("tile", (4, 4), TypeError), ("tile", (4, 0, 4), ValueError), ("tile", (4.0, 4, 4), TypeError),
    ("window", (3, 2, 2), ValueError), ("window", 2, TypeError),
    ("min_kv_blocks", -1, ValueError), ("min_kv_blocks", 1.0, TypeError),
    ("max_kv_blocks", 0, ValueError), ("max_kv_blocks", "4", TypeError),
    ("kv_budget", 0.0, ValueError), ("kv_budget", 1.5, ValueError), ("kv_budget", "0.1", TypeError),
    ("kv_rule", "topk", ValueError), ("fill", "zero", ValueError), ("force_own_kv_blocks", 1, TypeError),
    ("local_extra_kv_blocks", -1, ValueError), ("local_extra_kv_blocks", 1.0, TypeError),
    ("block_size", 96, ValueError), ("block_size", 8, ValueError), ("block_size", 128.0, TypeError),
])
def test_invalid_field_raises_naming_the_field(field, value, error):
    with pytest.raises(error, match=field):
        BSAConfig(**{field: value})


def test_unforced_own_blocks_need_at_least_one_kv_block_per_query_block():
    with pytest.raises(ValueError, match="force_own_kv_blocks=False needs min_kv_blocks >= 1"):
        BSAConfig(force_own_kv_blocks=False, min_kv_blocks=0)


@pytest.mark.parametrize("fill", ["most_similar", "anchor", "nearest", "none"])
def test_extra_kv_blocks_for_local_rows_are_refused_without_the_local_fill(fill):
    with pytest.raises(ValueError, match="local_extra_kv_blocks.*fill='local' only"):
        BSAConfig(query_keep_ratio=0.5, fill=fill, local_extra_kv_blocks=2)


def test_a_kv_budget_and_a_block_cap_together_are_refused():
    with pytest.raises(ValueError, match="kv_budget.*max_kv_blocks.*at most one"):
        BSAConfig(kv_budget=0.1, max_kv_blocks=4)


@pytest.mark.parametrize("budget, blocks, cap", [(0.1, 64, 7), (0.1, 60, 6), (0.07, 64, 5), (0.001, 64, 1),
                                                 (1.0, 64, 64)])
def test_the_kv_budget_caps_its_share_of_the_video_kv_blocks_rounded_up(budget, blocks, cap):
    assert BSAConfig(kv_budget=budget).kv_block_cap(blocks) == cap
    assert BSAConfig(max_kv_blocks=3).kv_block_cap(blocks) == 3 and BSAConfig().kv_block_cap(blocks) is None


def test_tensor_thresholds_are_accepted():
    config = BSAConfig(kv_threshold=torch.tensor(0.8), kv_zscore=torch.tensor(0.5))
    assert float(config.kv_rule_threshold) == pytest.approx(0.8)


def test_rule_threshold_follows_the_rule():
    assert BSAConfig(kv_rule="zscore", kv_zscore=1.5).kv_rule_threshold == 1.5
    assert BSAConfig(kv_rule="cumulative", kv_threshold=0.7).kv_rule_threshold == 0.7
