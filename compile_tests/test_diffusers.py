"""BSA inside diffusers' WanTransformer3DModel (a small random model; no weights are downloaded)."""
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed")

import bsa_flex  # noqa: E402
from bsa_flex import BSAConfig, SparsitySchedule  # noqa: E402
from bsa_flex.integrations.diffusers import apply_bsa, remove_bsa  # noqa: E402
from masks import reference_attention, tile_layout  # noqa: E402

LATENTS = (4, 16, 16)  # frames, height, width -> (4, 8, 8) = 256 tokens after 1x2x2 patches
SPARSE = BSAConfig(block_size=16, kv_threshold=0.7)


def _model(seed=0):
    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64).eval()


def _inputs(seed=1, latents=LATENTS):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 4, *latents, generator=g), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 12, 32, generator=g), return_dict=False)


def _run(model, **kwargs):
    return model(**{**_inputs(), **kwargs})[0]


def _oracle_attend(processor):
    """The processor's attention replaced by the float64 oracle fed BSA's own selection."""
    def attend(q, k, v, video_shape):
        config = processor.control.config
        _, stats = bsa_flex.attention(q, k, v, video_shape, config, return_stats=True)
        layout = tile_layout(video_shape, config.tile, config.window, config.block_size, q.device)
        out, _ = reference_attention(q, k, v, stats.selection, layout, scale=q.shape[-1] ** -0.5)
        return out.to(q.dtype)
    return attend


@torch.no_grad()
def test_dense_config_reproduces_the_original_model():
    model = _model()
    expected = _run(model)
    apply_bsa(model, BSAConfig.dense(block_size=16))
    torch.testing.assert_close(_run(model), expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_sparse_model_reports_sparsity_and_equals_the_model_run_with_the_oracle():
    model = _model()
    handle = apply_bsa(model, SPARSE)
    out = _run(model)
    stats = handle.stats()
    assert len(stats) == 2 and all(0.0 < row["sparsity"] < 1.0 for row in stats)
    for processor in handle.processors:
        processor.attention = _oracle_attend(processor)
    torch.testing.assert_close(out, _run(model), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, _run(_model()), atol=1e-3)  # and it is not the dense model


@torch.no_grad()
def test_compiled_transformer_with_bsa_equals_eager_and_does_not_recompile_for_new_latents():
    model = _model()
    apply_bsa(model, SPARSE)
    compiled = torch.compile(model, dynamic=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bsa_flex.BSARecompileWarning)
        compiled(**_inputs(seed=2))
        from torch._dynamo.utils import counters
        before = counters["stats"]["unique_graphs"]
        got = compiled(**_inputs(seed=3))[0]
        assert counters["stats"]["unique_graphs"] == before
        torch.testing.assert_close(got, model(**_inputs(seed=3))[0], atol=1e-4, rtol=1e-4)


def test_dense_config_trains_like_the_original_model_on_cpu():
    """With gradients on CPU the blockwise path runs; parameter gradients equal the original model's."""
    reference, patched = _model(), _model()
    apply_bsa(patched, BSAConfig.dense(block_size=16))
    for model in (reference, patched):
        _run(model).square().mean().backward()
    for (name, a), b in zip(reference.named_parameters(), patched.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


@torch.no_grad()
def test_cross_attention_stays_dense_and_remove_bsa_restores_the_model():
    model = _model()
    expected = _run(model)
    cross = [type(block.attn2.processor) for block in model.blocks]
    apply_bsa(model, SPARSE)
    assert [type(block.attn2.processor) for block in model.blocks] == cross
    assert not torch.allclose(_run(model), expected, atol=1e-3)
    remove_bsa(model)
    torch.testing.assert_close(_run(model), expected)


@torch.no_grad()
def test_a_schedule_steps_every_layer_through_the_handle():
    model = _model()
    handle = apply_bsa(model, SPARSE, SparsitySchedule(dense_steps=1, final_kv_threshold=0.7))
    handle.step(0)
    _run(model)
    assert all(row["dense"] for row in handle.stats())
    handle.step(1)
    _run(model)
    assert all(not row["dense"] and row["sparsity"] > 0 for row in handle.stats())


def test_latents_the_patch_does_not_tile_are_refused_with_a_clear_error():
    model = _model()
    apply_bsa(model, SPARSE)
    with pytest.raises(ValueError, match=r"not divisible by the patch size \(1, 2, 2\)"):
        model(**_inputs(latents=(4, 15, 16)))


def test_misuse_is_refused():
    model = _model()
    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        apply_bsa(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="config"):
        apply_bsa(model, {"block_size": 16})
    handle = apply_bsa(model, SPARSE)
    with pytest.raises(ValueError, match="already applied"):
        apply_bsa(model, SPARSE)
    with pytest.raises(ValueError, match="without a schedule"):
        handle.step(0)
    remove_bsa(model)
    with pytest.raises(ValueError, match="not applied"):
        remove_bsa(model)


@torch.no_grad()
def test_norms_that_upcast_still_give_one_dtype_to_the_attention():
    """CUDA autocast may return the q/k norms in float32 while v stays bfloat16."""
    class Upcast(torch.nn.Module):
        def forward(self, x):
            return x.float()

    model = _model().to(torch.bfloat16)
    for block in model.blocks:
        block.attn1.norm_q, block.attn1.norm_k = Upcast(), Upcast()
    apply_bsa(model, SPARSE)
    inputs = {key: value.to(torch.bfloat16) if key != "timestep" and torch.is_tensor(value) else value
              for key, value in _inputs().items()}
    assert torch.isfinite(model(**inputs)[0].float()).all()
