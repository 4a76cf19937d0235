"""bsa_flex.viz: the kept-query map is the selection; plots reject indices that do not exist."""
import pytest
import torch

import bsa_flex
from bsa_flex.synthetic import video_qkv
from bsa_flex.viz import kept_query_map, plot_kv_blocks

VIDEO = (4, 8, 8)


@pytest.fixture(scope="module")
def stats():
    q, k, v = video_qkv(1, 2, 2, VIDEO, 16, seed=0)
    with torch.no_grad():
        return bsa_flex.attention(q, k, v, VIDEO, bsa_flex.BSAConfig(block_size=16), return_stats=True)[1]


def test_kept_query_map_marks_exactly_the_kept_tokens(stats):
    for head in range(2):
        kept = kept_query_map(stats, VIDEO, head=head).flatten()
        selection = stats.selection
        tokens = selection.kept_token[0, head][selection.kept_valid[0, head]]
        assert kept.sum() == tokens.numel() == tokens.unique().numel()
        assert kept[tokens].all()
        source_token = selection.kept_token[0, head].gather(0, selection.fill_source[0, head])
        assert torch.equal(kept, source_token == torch.arange(kept.numel()))  # kept tokens copy themselves


@pytest.mark.parametrize("kwargs, match", [({"head": 2}, "head"), ({"batch": 1}, "batch"), ({"head": -1}, "head")])
def test_indices_outside_the_stats_are_refused(stats, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kept_query_map(stats, VIDEO, **kwargs)


def test_a_video_shape_that_does_not_match_is_refused(stats):
    with pytest.raises(ValueError, match="video_shape"):
        kept_query_map(stats, (4, 8, 4))


def test_plots_need_stats_or_a_selection(tmp_path):
    with pytest.raises(TypeError, match="BSAStats or a Selection"):
        plot_kv_blocks(torch.zeros(3), str(tmp_path / "x.png"))
