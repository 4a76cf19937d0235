"""The tile order: q, k, v kept in BSA's tile order give exactly the raster API's results, permuted."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

import bsa_flex
from bsa_flex import BSAConfig
from bsa_flex.testing import attention_inputs, configs, video_shapes
from masks import tile_layout, to_tile_major

CPU = torch.device("cpu")


def _run(inputs, config, order, token_order, grad):
    """attention in one token order: (out and grads in sequence order, selection)."""
    q, k, v = inputs.qkv
    to_tile, to_raster = order
    if token_order == "tile":
        q, k, v = (t[:, :, to_tile] for t in (q, k, v))
    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    prefix, suffix = inputs.text_tokens
    out, stats = bsa_flex.attention(*leaves, inputs.video_shape, config, enable_gqa=inputs.enable_gqa,
                                    prefix_tokens=prefix, suffix_tokens=suffix, token_order=token_order,
                                    return_stats=True)
    if grad:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
        out.backward(g[:, :, to_tile] if token_order == "tile" else g)
    back = (lambda t: t[:, :, to_raster]) if token_order == "tile" else (lambda t: t)
    grads = [back(t.grad) for t in leaves] if grad else []
    return back(out.detach()), grads, stats.selection


@given(video_shapes(), configs(), st.integers(0, 9), st.integers(0, 9))
def test_tile_order_and_its_inverse_are_permutations_of_the_sequence(video_shape, config, prefix, suffix):
    to_tile, to_raster = bsa_flex.tile_order(video_shape, config, prefix_tokens=prefix, suffix_tokens=suffix)
    n = video_shape[0] * video_shape[1] * video_shape[2] + prefix + suffix
    assert torch.equal(to_tile.sort().values, torch.arange(n)) and torch.equal(to_tile[to_raster], torch.arange(n))
    layout = tile_layout(video_shape, config.tile, config.window, config.block_size, CPU, (prefix, suffix))
    assert torch.equal(to_tile, layout.slot_token[layout.slot_valid])  # the slot order, padding dropped


@settings(max_examples=60)
@given(attention_inputs(requires_grad=True, max_text_tokens=12), configs())
def test_tile_order_gives_the_raster_outputs_bit_for_bit_and_their_gradients_to_rounding(inputs, config):
    """The blockwise (CPU training) path on odd shapes with padding and text: outputs and selection
    bit-identical; q/k/v gradients to float32 rounding (CPU matmul kernels may block a permuted
    operand differently in the backward)."""
    order = bsa_flex.tile_order(inputs.video_shape, config, prefix_tokens=inputs.text_tokens[0],
                                suffix_tokens=inputs.text_tokens[1])
    raster, tile = (_run(inputs, config, order, token_order, grad=True) for token_order in ("raster", "tile"))
    assert torch.equal(raster[0], tile[0])
    for a, b in zip(raster[1], tile[1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(raster[2], tile[2]))


@pytest.mark.parametrize("video_shape,text,fill", [((5, 7, 9), (3, 2), "most_similar"), ((4, 8, 8), (0, 0), "none")])
def test_tile_order_gives_the_raster_results_bit_for_bit_on_the_compiled_path(video_shape, text, fill):
    config = BSAConfig(block_size=16, kv_threshold=0.7, fill=fill)
    S = video_shape[0] * video_shape[1] * video_shape[2] + sum(text)
    g = torch.Generator().manual_seed(3)
    qkv = (torch.randn(2, 4, S, 16, generator=g), torch.randn(2, 2, S, 16, generator=g), torch.randn(2, 2, S, 16, generator=g))
    inputs = bsa_flex.testing.AttentionInputs(qkv, video_shape, True, text)
    order = bsa_flex.tile_order(video_shape, config, prefix_tokens=text[0], suffix_tokens=text[1])
    raster, tile = (_run(inputs, config, order, token_order, grad=False) for token_order in ("raster", "tile"))
    assert torch.equal(raster[0], tile[0])
    assert all(torch.equal(a, b) for a, b in zip(raster[2], tile[2]))


def test_keys_in_tile_order_without_tile_padding_are_used_as_they_are():
    layout = tile_layout((4, 8, 8), (4, 4, 4), (2, 2, 2), 16, CPU)
    k = torch.randn(1, 2, 256, 16)
    assert to_tile_major(k, layout, in_tile_order=True) is k


def test_an_unknown_token_order_is_refused_naming_it():
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(ValueError, match="token_order"):
        bsa_flex.attention(q, q, q, (4, 4, 4), dataclasses.replace(BSAConfig(), block_size=16), token_order="tiles")


def _module_pair(video_shape, config, seed=0):
    """A raster and a tile-order BSAttention with the same weights (GQA, q/k norm, rope_3d)."""
    layers = []
    for token_order in ("raster", "tile"):
        torch.manual_seed(seed)
        layers.append(bsa_flex.BSAttention(64, 4, kv_heads=2, bsa=config, rope=bsa_flex.rope_3d,
                                           token_order=token_order))
    return layers


def test_rope_3d_at_tile_positions_is_the_raster_rope_permuted():
    video_shape = (3, 6, 10)
    to_tile, _ = bsa_flex.tile_order(video_shape, BSAConfig(block_size=16))
    q, k = torch.randn(2, 1, 2, 180, 12).unbind(0)
    raster = bsa_flex.rope_3d(q, k, video_shape)
    tile = bsa_flex.rope_3d(q[:, :, to_tile], k[:, :, to_tile], video_shape, positions=to_tile)
    assert all(torch.equal(a[:, :, to_tile], b) for a, b in zip(raster, tile))


@pytest.mark.parametrize("video_shape, text", [((5, 7, 9), (0, 0)), ((4, 8, 8), (0, 0)), ((5, 7, 9), (5, 3))])
def test_bsattention_in_tile_order_gives_the_raster_layer_results_and_gradients(video_shape, text):
    """Padding (5, 7, 9) and none (4, 8, 8), with and without text tokens, keep 0.5 with fills, on the
    CPU training path: output equal to the raster layer's permuted output, parameter gradients to float32
    rounding."""
    config = BSAConfig(block_size=16, kv_threshold=0.8, query_keep_ratio=0.5)
    raster, tile = _module_pair(video_shape, config)
    to_tile, to_raster = bsa_flex.tile_order(video_shape, config, prefix_tokens=text[0], suffix_tokens=text[1])
    x = torch.randn(2, to_tile.numel(), 64, generator=torch.Generator().manual_seed(1))
    kwargs = dict(prefix_tokens=text[0], suffix_tokens=text[1])
    out_raster, out_tile = raster(x, video_shape, **kwargs), tile(x[:, to_tile], video_shape, **kwargs)[:, to_raster]
    torch.testing.assert_close(out_tile, out_raster, rtol=1e-5, atol=1e-6)
    g = torch.randn(out_raster.shape, generator=torch.Generator().manual_seed(2))
    (out_raster * g).sum().backward()
    (out_tile * g).sum().backward()
    for a, b in zip(raster.parameters(), tile.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5)


def test_bsattention_in_tile_order_needs_a_config_and_keeps_its_window():
    with pytest.raises(ValueError, match="token_order='tile' needs bsa"):
        bsa_flex.BSAttention(64, 4, token_order="tile")
    with pytest.raises(ValueError, match="token_order"):
        bsa_flex.BSAttention(64, 4, bsa=BSAConfig(), token_order="sequence")
    layer = bsa_flex.BSAttention(64, 4, bsa=BSAConfig(block_size=16), token_order="tile")
    layer.set_sparsity(bsa_flex.LayerSparsity(False, 0.5, 0.9, (2, 2, 2)))  # its own window: allowed
    with pytest.raises(ValueError, match="tile order of window"):
        layer.set_sparsity(bsa_flex.LayerSparsity(False, 0.5, 0.9, (1, 2, 2)))


def test_a_compiled_bsattention_in_tile_order_gives_its_eager_output():
    """The rope's tile positions are a constant to torch.compile (the layout is not traced)."""
    video_shape, config = (4, 8, 8), BSAConfig(block_size=16, kv_threshold=0.8, query_keep_ratio=0.5)
    _, layer = _module_pair(video_shape, config)
    x = torch.randn(1, 256, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x, video_shape), layer(x, video_shape),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", [torch.arange(10), torch.arange(180.0), [0, 1]])
def test_rope_positions_that_are_not_one_integer_index_per_token_are_refused_naming_them(positions):
    q = torch.randn(1, 1, 180, 12)
    with pytest.raises(ValueError, match="positions"):
        bsa_flex.rope_3d(q, q, (3, 6, 10), positions=positions)
