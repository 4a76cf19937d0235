"""BSAttention: the DiT self-attention module, its sparsity switch, stats, rope, and compile behaviour."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch._dynamo.utils import counters

import bsa_flex
from bsa_flex import BSAConfig, BSAttention, LayerSparsity, SparsitySchedule, layer_stats, rope_3d
from bsa_flex.config import keep_count
from masks import reference_attention, tile_layout

VIDEO = (4, 8, 8)
CONFIG = BSAConfig(block_size=16, kv_threshold=0.8)


def _layer(seed=0, **kwargs):
    torch.manual_seed(seed)
    return BSAttention(64, 4, **{"kv_heads": 2, "bsa": CONFIG, "rope": rope_3d, **kwargs})


def _tokens(seed=1, batch=2):
    return torch.randn(batch, 256, 64, generator=torch.Generator().manual_seed(seed))


def _qkv(layer, x):
    """The layer's q, k, v as its forward computes them (projection, norm, rope)."""
    q, k, v = layer.qkv(x).split([4 * 16, 2 * 16, 2 * 16], -1)
    q, k, v = (rearrange(t, "b s (h d) -> b h s d", d=16) for t in (q, k, v))
    return (*layer.rope(layer.q_norm(q), layer.k_norm(k), VIDEO), v)


def test_sparse_layer_output_is_the_oracle_on_its_own_selection():
    layer, x = _layer(), _tokens()
    with torch.no_grad():
        q, k, v = _qkv(layer, x)
        _, stats = bsa_flex.attention(q, k, v, VIDEO, layer.config, enable_gqa=True, return_stats=True)
        expected, _ = reference_attention(q, k, v, stats.selection, tile_layout(VIDEO, CONFIG.tile, CONFIG.window, 16,
                                                                                 torch.device("cpu")), scale=0.25)
        expected = layer.out(rearrange(expected.float(), "b h s d -> b s (h d)"))
        torch.testing.assert_close(layer(x, VIDEO), expected, atol=1e-4, rtol=1e-4)
    assert 0.0 < layer_stats([layer])[0]["sparsity"] < 1.0


@pytest.mark.parametrize("dense", [False, True])
def test_text_tokens_join_the_attention_and_only_the_video_tokens_are_rotated(dense):
    """prefix 5 and suffix 3 non-video tokens: the layer is the functional call (or SDPA when dense) on
    q, k, v whose video part alone went through the rope."""
    layer, text = _layer(), (5, 3)
    if dense:
        layer.set_sparsity(LayerSparsity(dense=True, keep_ratio=1.0, kv_threshold=1.0))
    x = torch.randn(2, 5 + 256 + 3, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        q, k, v = layer.qkv(x).split([4 * 16, 2 * 16, 2 * 16], -1)
        q, k, v = (rearrange(t, "b s (h d) -> b h s d", d=16) for t in (q, k, v))
        q, k = layer.q_norm(q), layer.k_norm(k)
        q_video, k_video = layer.rope(q[:, :, 5:-3], k[:, :, 5:-3], VIDEO)
        q = torch.cat([q[:, :, :5], q_video, q[:, :, -3:]], 2)
        k = torch.cat([k[:, :, :5], k_video, k[:, :, -3:]], 2)
        expected = (F.scaled_dot_product_attention(q, k, v, enable_gqa=True) if dense else
                    bsa_flex.attention(q, k, v, VIDEO, layer.config, enable_gqa=True, prefix_tokens=5, suffix_tokens=3))
        expected = layer.out(rearrange(expected, "b h s d -> b s (h d)"))
        torch.testing.assert_close(layer(x, VIDEO, prefix_tokens=5, suffix_tokens=3), expected)


def test_a_sequence_that_is_not_the_video_and_its_text_tokens_is_refused_naming_x():
    layer = _layer()
    with pytest.raises(ValueError, match=r"T\*H\*W = 256 tokens plus 4 prefix and 0 suffix tokens, but x has S = 256"):
        layer(_tokens(), VIDEO, prefix_tokens=4)
    with pytest.raises(ValueError, match=r"x must be \[B, prefix_tokens \+ T\*H\*W \+ suffix_tokens, dim\]"):
        layer(_tokens()[0], VIDEO)
    with pytest.raises(TypeError, match="prefix_tokens must be an int"):
        layer(_tokens(), VIDEO, prefix_tokens=1.5)


def test_dense_mode_is_sdpa_and_dense_bsa_config_matches_it_with_gradients():
    x = _tokens()
    dense, through_bsa = _layer(seed=3), _layer(seed=3, bsa=BSAConfig.dense(block_size=16))
    dense.set_sparsity(LayerSparsity(dense=True, keep_ratio=1.0, kv_threshold=1.0))
    q, k, v = _qkv(dense, x)
    expected = dense.out(rearrange(F.scaled_dot_product_attention(q, k, v, enable_gqa=True), "b h s d -> b s (h d)"))
    out_dense, out_bsa = dense(x, VIDEO), through_bsa(x, VIDEO)
    torch.testing.assert_close(out_dense, expected)
    torch.testing.assert_close(out_bsa, out_dense, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out_dense)
    out_dense.backward(grad)
    out_bsa.backward(grad)
    for (name, a), b in zip(dense.named_parameters(), through_bsa.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_keep_ratio_is_rounded_to_whole_kept_queries_and_each_count_has_one_config_object():
    layer = _layer()
    layer.set_sparsity(LayerSparsity(False, 0.7, 0.9))  # 2x2x2 windows: ceil(5.6) = 6 of 8
    first = layer.config
    assert first.query_keep_ratio == 0.75 and first.keep_per_window == 6
    layer.set_sparsity(LayerSparsity(False, 0.74, 0.5))
    assert layer.config is first and float(first.kv_threshold) == 0.5


def test_a_window_setting_applies_the_keep_ratio_to_that_window_with_one_config_per_window_and_count():
    layer = _layer()
    layer.set_sparsity(LayerSparsity(False, 0.5, 0.9, window=(1, 2, 2)))  # 2 of 4
    spatial = layer.config
    assert (spatial.window, spatial.keep_per_window) == ((1, 2, 2), 2)
    layer.set_sparsity(LayerSparsity(False, 0.5, 0.9, window=(2, 1, 1)))  # 1 of 2
    assert (layer.config.window, layer.config.keep_per_window) == ((2, 1, 1), 1)
    layer.set_sparsity(LayerSparsity(False, 0.5, 0.7, window=(1, 2, 2)))
    assert layer.config is spatial
    with pytest.raises(ValueError, match="must divide this layer's tile"):
        layer.set_sparsity(LayerSparsity(False, 0.5, 0.9, window=(3, 1, 1)))


def test_threshold_is_one_float32_tensor_updated_in_place_even_after_a_dtype_cast():
    layer = _layer().to(torch.bfloat16)
    tensor = layer.config.kv_threshold
    assert tensor.dtype == torch.float32
    layer.set_sparsity(LayerSparsity(False, 0.5, 0.8125))
    assert layer.config.kv_threshold is tensor and float(tensor) == 0.8125


def test_a_kv_budget_setting_has_one_config_per_value_and_none_keeps_the_layers_own():
    layer = _layer(bsa=BSAConfig(block_size=16, kv_budget=0.5))
    layer.set_sparsity(LayerSparsity(False, 1.0, 0.9, kv_budget=0.25))
    quarter = layer.config
    assert quarter.kv_budget == 0.25
    layer.set_sparsity(LayerSparsity(False, 1.0, 0.9))
    assert layer.config.kv_budget == 0.5
    layer.set_sparsity(LayerSparsity(False, 1.0, 0.7, kv_budget=0.25))
    assert layer.config is quarter and float(quarter.kv_threshold) == pytest.approx(0.7)


def test_a_kv_budget_setting_on_a_layer_capped_by_a_block_count_or_out_of_range_is_refused():
    with pytest.raises(ValueError, match="max_kv_blocks=2"):
        capped = _layer(bsa=BSAConfig(block_size=16, max_kv_blocks=2))
        capped.set_sparsity(LayerSparsity(False, 1.0, 0.9, kv_budget=0.5))
    with pytest.raises(ValueError, match=r"LayerSparsity.kv_budget must be a finite number in \(0.0, 1.0\]"):
        _layer().set_sparsity(LayerSparsity(False, 1.0, 0.9, kv_budget=0.0))
    with pytest.raises(TypeError, match="LayerSparsity.keep_ratio must be a float"):
        _layer().set_sparsity(LayerSparsity(False, "0.5", 0.9))


class _UpcastingNorm(torch.nn.Module):
    """What CUDA autocast does to a norm: the result comes back in float32."""

    def forward(self, x):
        return x.float()


def test_norms_that_upcast_still_give_one_dtype_to_the_attention():
    layer = _layer().to(torch.bfloat16)
    layer.q_norm, layer.k_norm = _UpcastingNorm(), _UpcastingNorm()
    q, k, v = layer.project(_tokens().to(torch.bfloat16), VIDEO)
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16
    with torch.no_grad():
        assert layer(_tokens().to(torch.bfloat16), VIDEO).dtype == torch.bfloat16


def test_dense_layers_report_no_sparsity_and_sparse_layers_report_their_call():
    layers = [_layer(), _layer()]
    layers[0].set_sparsity(LayerSparsity(True, 1.0, 1.0))
    x = _tokens()
    with torch.no_grad():
        for layer in layers:
            layer(x, VIDEO)
        _, stats = bsa_flex.attention(*_qkv(layers[1], x), VIDEO, layers[1].config, enable_gqa=True,
                                      return_stats=True)
    rows = layer_stats(layers)
    assert rows[0] == {"layer": 0, "dense": True, "sparsity": 0.0, "kept_query_fraction": 1.0}
    assert rows[1]["sparsity"] == pytest.approx(float(stats.sparsity))
    assert rows[1]["kept_query_fraction"] == pytest.approx(float(stats.kept_query_fraction))


def test_rope_3d_makes_scores_depend_only_on_the_offset_between_positions():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 24).expand(1, 1, 60, 24), torch.randn(1, 1, 1, 24).expand(1, 1, 60, 24)
    rq, rk = rope_3d(q, k, (3, 4, 5))
    scores = (rq @ rk.transpose(-1, -2))[0, 0]
    pos = torch.stack(torch.meshgrid(*[torch.arange(n) for n in (3, 4, 5)], indexing="ij"), -1).reshape(60, 3)
    i, j = 5, 17  # every other pair (a, b) with the same position offset must give the same score
    offset = pos[j] - pos[i]
    pairs = 0
    for a in range(60):
        match = (pos == pos[a] + offset).all(-1).nonzero()
        if match.numel():
            assert scores[a, match[0, 0]] == pytest.approx(float(scores[i, j]), abs=1e-4)
            pairs += 1
    assert pairs > 1
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"kv_heads": 3}, ValueError, "kv_heads"),
    ({"bsa": "dense"}, TypeError, "bsa must be"),
    ({"rope": 1}, TypeError, "rope"),
    ({"head_dim": None, "heads": 5}, ValueError, "divisible"),
])
def test_invalid_layers_are_rejected_naming_the_argument(kwargs, error, match):
    heads = kwargs.pop("heads", 4)
    with pytest.raises(error, match=match):
        BSAttention(64, heads, **{"kv_heads": kwargs.pop("kv_heads", None), **kwargs})


def test_sparse_setting_on_a_dense_only_layer_or_a_zscore_layer_is_refused():
    with pytest.raises(ValueError, match="bsa=None"):
        BSAttention(64, 4).set_sparsity(LayerSparsity(False, 0.5, 0.9))
    with pytest.raises(ValueError, match="zscore"):
        _layer(bsa=BSAConfig(block_size=16, kv_rule="zscore")).set_sparsity(LayerSparsity(False, 0.5, 0.9))


class _Residual(torch.nn.Module):
    """One attention layer in a residual (one layer: each schedule structure is a C++ compile on CPU)."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.ModuleList([_layer(seed=0)])

    def forward(self, x):
        for layer in self.attn:
            x = x + layer(x, VIDEO)
        return x


def _graphs_per_step(schedule: SparsitySchedule, steps: int) -> tuple[list[int], list]:
    """Run a compiled one-layer model through ``steps`` schedule steps (no grad), each checked against
    eager: the graphs compiled at each step, and the first layer's config at each step."""
    model = _Residual()
    compiled = torch.compile(model, dynamic=False)
    new_graphs, configs = [], []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", bsa_flex.BSARecompileWarning)
        for step in range(steps):
            schedule.apply(model.attn, step)
            x = _tokens(seed=step, batch=1)
            before = counters["stats"]["unique_graphs"]
            got = compiled(x)
            new_graphs.append(counters["stats"]["unique_graphs"] - before)
            configs.append(model.attn[0].config)
            torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)
    return new_graphs, configs


def test_schedule_steps_under_a_compiled_model_recompile_only_when_the_structure_changes():
    """Inference on CPU (the compiled Flex path); the GPU suite checks the same with gradients.

    The structure is the dense flag and the kept queries per window; the threshold moves every step.
    """
    schedule = SparsitySchedule(final_keep_ratio=0.75, start_keep_ratio=0.875, final_kv_threshold=0.6,
                                start_kv_threshold=0.95, dense_steps=1, ramp_steps=8, every=1)
    structure = [(schedule.at(step, 0).dense, keep_count(schedule.at(step, 0).keep_ratio, 8)) for step in range(12)]
    new_graphs, _ = _graphs_per_step(schedule, 12)
    assert len({schedule.at(step, 0).kv_threshold for step in range(1, 12)}) >= 8
    for step in range(1, 12):
        if structure[step] == structure[step - 1]:
            assert new_graphs[step] == 0, f"step {step} recompiled with the structure unchanged"
    assert sum(new_graphs) <= len(set(structure))


def test_a_kv_budget_ramp_under_a_compiled_model_compiles_once_per_stair_and_matches_eager():
    """The budget is a cap on a count (a constant of the graph): each stair compiles once, the threshold
    moving every step between them does not; checked against eager at every step."""
    schedule = SparsitySchedule(final_kv_budget=0.25, final_kv_threshold=0.6, start_kv_threshold=0.95,
                                ramp_steps=4, every=2)
    new_graphs, configs = _graphs_per_step(schedule, 8)
    assert [config.kv_budget for config in configs] == pytest.approx([1.0, 1.0, 0.625, 0.625, 0.25, 0.25, 0.25, 0.25])
    assert [n > 0 for n in new_graphs] == [True, False, True, False, True, False, False, False]


def test_alternating_windows_under_a_compiled_model_compile_once_each_and_are_reused():
    """Spatial-only and full windows in turn, stair by stair, the threshold moving at every step."""
    schedule = SparsitySchedule(final_keep_ratio=0.5, start_keep_ratio=0.5, final_kv_threshold=0.6,
                                start_kv_threshold=0.95, ramp_steps=5, every=1, windows=((1, 2, 2), (2, 2, 2)),
                                alternate="step")
    new_graphs, configs = _graphs_per_step(schedule, 6)
    assert [config.window for config in configs] == [(1, 2, 2), (2, 2, 2)] * 3
    assert new_graphs[2:] == [0, 0, 0, 0]  # both windows revisited with new thresholds: nothing compiles
