"""Bad input at the public boundary: a TypeError/ValueError naming the argument."""
import pytest
import torch

import bsa_flex
from bsa_flex import BSAConfig

VIDEO = (2, 3, 4)


def qkv(B=1, Hq=2, Hkv=2, S=24, D=16, dtype=torch.float32):
    return (torch.randn(B, Hq, S, D, dtype=dtype), torch.randn(B, Hkv, S, D, dtype=dtype),
            torch.randn(B, Hkv, S, D, dtype=dtype))


def call(q, k, v, video_shape=VIDEO, config=None, **kwargs):
    return bsa_flex.attention(q, k, v, video_shape, config, **kwargs)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_wrong_rank_names_the_tensor(name):
    args = dict(zip("qkv", qkv()))
    args[name] = args[name][0]
    with pytest.raises(ValueError, match=f"^{name} must have shape"):
        call(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_non_tensor_names_the_argument(name):
    args = dict(zip("qkv", qkv()))
    args[name] = args[name].tolist()
    with pytest.raises(TypeError, match=f"^{name} must be a torch.Tensor"):
        call(args["q"], args["k"], args["v"])


def test_sequence_length_must_equal_video_volume():
    with pytest.raises(ValueError, match="video_shape"):
        call(*qkv(), video_shape=(2, 3, 5))


@pytest.mark.parametrize("video_shape,error", [((2, 12), TypeError), ((2, 3, 4.0), TypeError),
                                               ((0, 3, 8), ValueError), ("234", TypeError)])
def test_malformed_video_shape(video_shape, error):
    with pytest.raises(error, match="video_shape"):
        call(*qkv(), video_shape=video_shape)


def test_mismatched_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="dtype"):
        call(q, k.half(), v)


def test_unsupported_dtype():
    q, k, v = (t.double() for t in qkv())
    with pytest.raises(TypeError, match="q.dtype"):
        call(q, k, v)


def test_mismatched_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="device"):
        call(q, k.to("meta"), v)


@pytest.mark.parametrize("q_shape, kv_shape, message", [
    ({}, {"D": 32}, "head dim"),
    ({}, {"S": 12}, "S = 24"),
    ({"B": 2}, {"B": 1}, "batch size"),
], ids=["head_dims", "sequence_lengths", "batch"])
def test_k_and_v_that_do_not_match_q_are_refused_naming_the_dimension(q_shape, kv_shape, message):
    q, _, _ = qkv(**q_shape)
    _, k, v = qkv(**kv_shape)
    with pytest.raises(ValueError, match=message):
        call(q, k, v)


def test_k_and_v_shapes_must_agree():
    q, k, _ = qkv()
    _, _, v = qkv(Hkv=1)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        call(q, k, v)


def test_fewer_kv_heads_needs_enable_gqa():
    with pytest.raises(ValueError, match="enable_gqa"):
        call(*qkv(Hq=4, Hkv=2))


def test_query_heads_must_be_a_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="multiple"):
        call(*qkv(Hq=3, Hkv=2), enable_gqa=True)


@pytest.mark.parametrize("scale,error", [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                         (float("inf"), ValueError), ("0.1", TypeError)])
def test_bad_scale(scale, error):
    with pytest.raises(error, match="scale"):
        call(*qkv(), scale=scale)


def test_bad_config_type():
    with pytest.raises(TypeError, match="config"):
        call(*qkv(), config={"query_keep_ratio": 0.5})


def test_bad_score_mod():
    with pytest.raises(TypeError, match="score_mod"):
        call(*qkv(), score_mod=1.0)


def test_bad_enable_gqa():
    with pytest.raises(TypeError, match="enable_gqa"):
        call(*qkv(), enable_gqa=1)


def test_empty_batch():
    with pytest.raises(ValueError, match="empty"):
        call(*qkv(B=0))


def test_valid_input_passes_validation_on_the_blockwise_path():
    q, k, v = (t.requires_grad_() for t in qkv())
    out = call(q, k, v, config=BSAConfig(tile=(2, 2, 2), window=(1, 1, 2), block_size=16))
    assert out.shape == q.shape and out.dtype == q.dtype


def test_video_shape_of_numpy_and_torch_integers_is_accepted():
    import numpy as np
    q, k, v = qkv()
    want = call(q, k, v, video_shape=(2, 3, 4))
    for shape in ((np.int64(2), np.int32(3), 4), (torch.tensor(2), torch.tensor(3), torch.tensor(4))):
        torch.testing.assert_close(call(q, k, v, video_shape=shape), want)


def test_a_shadowing_masks_module_fails_naming_the_file(tmp_path):
    import subprocess
    import sys
    (tmp_path / "masks.py").write_text("x = 1\n")
    run = subprocess.run([sys.executable, "-c", "import bsa_flex"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode != 0 and "shadows bsa_flex's masks" in run.stderr and str(tmp_path / "masks.py") in run.stderr


@pytest.mark.parametrize("grad", [False, True], ids=["flex_cpu", "blockwise"])
@pytest.mark.parametrize("tensor,value", [("q", float("nan")), ("k", float("inf")), ("v", float("nan")),
                                          ("q", float("-inf"))])
def test_a_non_finite_value_makes_its_heads_output_nan_and_leaves_every_other_head_bit_identical(tensor, value,
                                                                                                  grad):
    """One bad entry: its (batch, head) - for k or v, every query head of that key head - is all NaN, on
    every path; every other head's output and selection are exactly those of the clean run."""
    from bsa_flex.synthetic import video_qkv
    from bsa_flex.testing import check_selection
    config = BSAConfig(block_size=16)
    clean = video_qkv(2, 4, 2, (4, 8, 8), 16, seed=5, sharpness=4.0)
    dirty = [t.clone() for t in clean]
    dirty["qkv".index(tensor)][1, 1, 37, 3] = value  # batch 1, head 1 (key head 1: query heads 2, 3)
    bad_heads = [1] if tensor == "q" else [2, 3]
    runs = []
    for inputs in (clean, dirty):
        with torch.enable_grad():
            leaves = [t.clone().requires_grad_(grad) for t in inputs]
            out, stats = bsa_flex.attention(*leaves, (4, 8, 8), config, enable_gqa=True, return_stats=True)
        runs.append((out.detach(), stats))
    (want, want_stats), (got, got_stats) = runs
    assert got_stats.kernel == ("blockwise" if grad else "flex_cpu")
    check_selection(got_stats.selection, got_stats.layout, config)  # the bad heads' selection is well formed
    assert bool(got[1, bad_heads].isnan().all())
    good = torch.ones(2, 4, dtype=torch.bool)
    good[1, bad_heads] = False
    assert torch.equal(got[good], want[good])
    for mine, theirs in zip(got_stats.selection, want_stats.selection):
        assert torch.equal(mine[good], theirs[good])
