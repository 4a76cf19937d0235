"""BlockMask construction: block lists, full/partial split, and the mask_mod that mirrors them."""
import torch
from hypothesis import given, settings, strategies as st
from torch.nn.attention.flex_attention import BlockMask, create_mask

from bsa_flex.testing import configs, video_shapes
from masks import build_block_mask, ordered_kv_blocks, padding_mask_mod, slot_is_real, tile_layout
from masks.ordering import selected_first, stable_argsort, stable_ranks

CPU = torch.device("cpu")


@st.composite
def layouts_and_blocks(draw):
    config = draw(configs())
    layout = tile_layout(draw(video_shapes()), config.tile, config.window, config.block_size, CPU)
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 5)), layout.num_kv_blocks)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kv_blocks = (torch.rand(shape, generator=g) < draw(st.floats(0.0, 1.0))) & layout.kv_block_valid
    return layout, kv_blocks


@given(layouts_and_blocks())
def test_densified_block_mask_equals_the_block_matrix(lb):
    layout, kv_blocks = lb
    dense = build_block_mask(kv_blocks, layout).to_dense()
    assert torch.equal(dense.bool(), kv_blocks)


@given(layouts_and_blocks())
def test_only_blocks_with_padding_are_partial(lb):
    layout, kv_blocks = lb
    mask = build_block_mask(kv_blocks, layout)
    partial = torch.zeros_like(kv_blocks)
    n, idx = mask.kv_num_blocks, mask.kv_indices
    in_list = torch.arange(idx.shape[-1]) < n[..., None].long()
    partial.scatter_(-1, idx.long(), in_list)
    assert torch.equal(partial, kv_blocks & layout.kv_block_partial)


@given(layouts_and_blocks())
def test_mask_mod_is_the_block_matrix_times_real_keys(lb):
    layout, kv_blocks = lb
    mask = build_block_mask(kv_blocks, layout)
    B, H, nq, _ = kv_blocks.shape
    bs = layout.block_size
    elementwise = create_mask(mask.mask_mod, B, H, nq * bs, layout.num_slots, device="cpu")
    expected = kv_blocks.repeat_interleave(bs, 2).repeat_interleave(bs, 3) & layout.slot_valid
    assert torch.equal(elementwise, expected)


@given(layouts_and_blocks())
def test_block_lists_list_selected_blocks_first_then_the_rest_in_index_order(lb):
    _, kv_blocks = lb
    num, indices = ordered_kv_blocks(kv_blocks)
    assert torch.equal(num, kv_blocks.sum(-1).int())
    assert torch.equal(indices.long(), torch.argsort(kv_blocks.int(), dim=-1, descending=True, stable=True))


def _densify(num: torch.Tensor, indices: torch.Tensor, num_cols: int) -> torch.Tensor:
    in_list = torch.arange(indices.shape[-1]) < num[..., None].long()
    dense = torch.zeros(*indices.shape[:-1], num_cols, dtype=torch.bool)
    return dense.scatter_(-1, indices.long(), in_list)


@given(layouts_and_blocks())
def test_query_lists_are_the_transposed_kv_lists(lb):
    layout, kv_blocks = lb
    mask = build_block_mask(kv_blocks, layout)
    nq = kv_blocks.shape[-2]
    for kv_num, kv_idx, q_num, q_idx in [(mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks, mask.q_indices),
                                         (mask.full_kv_num_blocks, mask.full_kv_indices,
                                          mask.full_q_num_blocks, mask.full_q_indices)]:
        by_kv = _densify(kv_num, kv_idx, layout.num_kv_blocks)
        assert torch.equal(_densify(q_num, q_idx, nq), by_kv.transpose(-1, -2))


@given(layouts_and_blocks())
def test_every_block_list_is_exactly_the_one_flex_would_build(lb):
    """Our query lists replace Flex's internal transpose; the kernels must see identical tensors."""
    layout, kv_blocks = lb
    ours = build_block_mask(kv_blocks, layout)
    assert_lists_are_flex_ones(ours)


def assert_lists_are_flex_ones(ours: BlockMask) -> None:
    """Every list of ``ours`` (an int32 contiguous tensor) equals what Flex builds from its KV lists."""
    flex = BlockMask.from_kv_blocks(ours.kv_num_blocks, ours.kv_indices, ours.full_kv_num_blocks,
                                    ours.full_kv_indices, BLOCK_SIZE=ours.BLOCK_SIZE, seq_lengths=ours.seq_lengths)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        mine, theirs = getattr(ours, name), getattr(flex, name)
        assert mine.dtype == theirs.dtype == torch.int32 and mine.is_contiguous(), name
        assert torch.equal(mine, theirs), name
    assert ours.seq_lengths == flex.seq_lengths and ours.BLOCK_SIZE == flex.BLOCK_SIZE


@given(st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_a_video_of_whole_tiles_and_blocks_gets_flex_lists_with_empty_partial_lists(density, seed):
    """Without padding the partial lists are known statically (no compaction runs for them)."""
    layout = tile_layout((8, 8, 12), (4, 4, 4), (2, 2, 2), 64, CPU)
    assert not layout.has_partial_kv_blocks
    kv_blocks = torch.rand(2, 3, 12, layout.num_kv_blocks, generator=torch.Generator().manual_seed(seed)) < density
    ours = build_block_mask(kv_blocks, layout)
    assert not bool(ours.kv_num_blocks.any())
    assert_lists_are_flex_ones(ours)
    assert torch.equal(ours.to_dense().bool(), kv_blocks)


@given(st.integers(1, 300), st.integers(1, 6), st.booleans(), st.integers(0, 2**31 - 1))
def test_stable_argsort_orders_like_a_stable_sort_and_keeps_ties_in_place(n, distinct, descending, seed):
    x = torch.randint(0, distinct, (3, n), generator=torch.Generator().manual_seed(seed))  # many ties
    assert torch.equal(stable_argsort(x, descending), torch.argsort(x, dim=-1, descending=descending, stable=True))


def test_stable_argsort_inside_a_compiled_graph_equals_the_eager_sort():
    x = torch.randint(0, 4, (5, 128), generator=torch.Generator().manual_seed(0)).float()
    for descending in (False, True):
        compiled = torch.compile(lambda t: stable_argsort(t * 2.0, descending), fullgraph=True, dynamic=False)
        assert torch.equal(compiled(x), torch.argsort(x, dim=-1, descending=descending, stable=True))


@given(st.integers(1, 300), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_selected_first_equals_a_stable_descending_sort_of_the_selection(n, density, seed):
    """The block lists' stream compaction gives exactly the order of the sort it replaces."""
    x = torch.rand(4, n, generator=torch.Generator().manual_seed(seed)) < density
    x[0], x[1] = True, False  # rows all selected and none selected
    count, order = selected_first(x)
    assert torch.equal(order.long(), torch.argsort(x.int(), dim=-1, descending=True, stable=True))
    assert torch.equal(count, x.sum(-1, dtype=torch.int32)) and order.dtype == torch.int32


@given(st.integers(1, 12), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_stable_ranks_order_like_a_stable_sort_with_ties_infinities_and_nan(n, distinct, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, distinct, (64, n), generator=g).float()  # many ties
    specials = torch.tensor([float("inf"), float("-inf"), float("nan")])
    where = torch.rand(x.shape, generator=g) < 0.2
    x = torch.where(where, specials[torch.randint(0, 3, x.shape, generator=g)], x)
    assert torch.equal(stable_ranks(x).argsort(-1), torch.argsort(x, dim=-1, stable=True))


def test_compaction_and_ranks_inside_a_compiled_graph_equal_the_eager_sorts():
    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(3, 5, 37, generator=g) < 0.3
    scores = torch.randint(0, 3, (3, 50, 8), generator=g).float()
    compiled = torch.compile(lambda b, x: (selected_first(b.transpose(-1, -2)), stable_ranks(x * 1.0)),
                             fullgraph=True, dynamic=False)
    (count, order), ranks = compiled(blocks, scores)
    assert torch.equal(order.long(), torch.argsort(blocks.transpose(-1, -2).int(), dim=-1, descending=True, stable=True))
    assert torch.equal(count, blocks.transpose(-1, -2).sum(-1, dtype=torch.int32))
    assert torch.equal(ranks.argsort(-1), torch.argsort(scores, dim=-1, stable=True))


@given(configs(), video_shapes(), st.integers(0, 40), st.integers(0, 40))
def test_slot_arithmetic_of_the_compiled_mask_mod_equals_slot_validity(config, video_shape, prefix, suffix):
    """The compiled kernels' mask_mod computes padding from the slot index alone (no captured
    buffer, which FLASH needs); it must agree with the layout on every slot."""
    layout = tile_layout(video_shape, config.tile, config.window, config.block_size, CPU, (prefix, suffix))
    slots = torch.arange(layout.num_slots)
    assert torch.equal(slot_is_real(slots, layout), layout.slot_valid)
    mask_mod = padding_mask_mod(layout)
    assert torch.equal(mask_mod(0, 0, 0, slots), layout.slot_valid)


@settings(max_examples=20)
@given(configs(), video_shapes())
def test_the_compiled_mask_mod_is_never_the_trivial_one_flash_would_skip(config, video_shape):
    """FLASH ignores the block lists under a mask_mod whose graph is a constant full()
    (pytorch#188322): even without padding ours must compute something from kv_idx."""
    from torch.fx.experimental.proxy_tensor import make_fx
    layout = tile_layout(video_shape, config.tile, config.window, config.block_size, CPU)
    index = torch.zeros((), dtype=torch.int32)
    graph = make_fx(padding_mask_mod(layout))(index, index, index, index).graph
    output = next(node for node in graph.nodes if node.op == "output").args[0]
    assert output.target is not torch.ops.aten.full.default
