"""The kernel choice (FLASH or Triton) as a rule over the facts of a call; availability is
written by hand here, for the choice only: results of either kernel are tested on the GPU."""
import dataclasses
import logging

import pytest
import torch

import bsa_flex
from bsa_flex import BSAConfig
from bsa_flex.kernels import KernelFacts, choose_kernel, flash_unavailable_reason

H200 = KernelFacts(device_type="cuda", capability=(9, 0), flash_importable=True, dtype=torch.bfloat16,
                   head_dim=128, block_size=128, needs_grad=True, deterministic=False)


def facts(**changes) -> KernelFacts:
    return dataclasses.replace(H200, **changes)


def test_auto_takes_flash_where_it_can_run():
    assert choose_kernel("auto", H200) == ("flash", None)
    assert choose_kernel("auto", facts(dtype=torch.float16, head_dim=64, needs_grad=False)) == ("flash", None)


@pytest.mark.parametrize("changes,reason", [
    ({"capability": (8, 0)}, "compute capability 9.0"),
    ({"flash_importable": False}, "flash_attn.cute is not importable"),
    ({"dtype": torch.float32}, "float16 or bfloat16"),
    ({"head_dim": 100}, "head_dim 100"),
    ({"capability": (10, 0), "head_dim": 192}, "head_dim 192"),
    ({"block_size": 256}, "block_size=128"),
    ({"deterministic": True}, "deterministic"),
    ({"has_score_mod": True}, "score_mod"),
])
def test_auto_takes_triton_where_flash_cannot_run_and_says_why(changes, reason):
    kernel, why = choose_kernel("auto", facts(**changes))
    assert kernel == "triton" and reason in why


@pytest.mark.parametrize("changes,reason", [
    ({"dtype": torch.float32}, "float32"), ({"flash_importable": False}, "bsa-flex\\[flash\\]"),
    ({"deterministic": True}, "deterministic"), ({"has_score_mod": True}, "score_mod"),
])
def test_flash_request_that_cannot_run_raises_saying_why(changes, reason):
    with pytest.raises(ValueError, match=f"kernel='flash'.*{reason}"):
        choose_kernel("flash", facts(**changes))


def test_a_deterministic_forward_may_take_flash():
    """Only FLASH's backward is non-deterministic."""
    assert choose_kernel("auto", facts(deterministic=True, needs_grad=False)) == ("flash", None)


def test_triton_request_takes_triton_even_where_flash_could_run():
    assert choose_kernel("triton", H200) == ("triton", None)


def test_blocks_under_128_tokens_with_gradients_are_refused_on_cuda():
    with pytest.raises(ValueError, match="block_size=64 has no FlexAttention backward"):
        choose_kernel("auto", facts(block_size=64))
    assert choose_kernel("auto", facts(block_size=64, needs_grad=False))[0] == "triton"


@pytest.mark.parametrize("needs_grad,kernel", [(False, "flex_cpu"), (True, "blockwise")])
def test_cpu_runs_flex_cpu_or_the_blockwise_path(needs_grad, kernel):
    cpu = facts(device_type="cpu", capability=None, flash_importable=False, needs_grad=needs_grad)
    assert choose_kernel("auto", cpu) == (kernel, None)
    for cuda_kernel in ("flash", "triton"):
        with pytest.raises(ValueError, match=f"kernel='{cuda_kernel}' names a CUDA kernel"):
            choose_kernel(cuda_kernel, cpu)


def test_reason_is_none_exactly_when_flash_is_chosen():
    for changes in ({}, {"dtype": torch.float32}, {"head_dim": 12}, {"needs_grad": False, "deterministic": True}):
        kernel, why = choose_kernel("auto", facts(**changes))
        assert (kernel == "flash") == (why is None) == (flash_unavailable_reason(facts(**changes)) is None)


def test_config_rejects_an_unknown_kernel():
    with pytest.raises(ValueError, match="BSAConfig.kernel must be one of"):
        BSAConfig(kernel="cuda")


def test_stats_name_the_kernel_that_ran_on_cpu():
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    _, stats = bsa_flex.attention(q, k, v, (4, 4, 4), BSAConfig(block_size=16), return_stats=True)
    assert (stats.kernel, stats.path) == ("flex_cpu", "flex")
    q.requires_grad_()
    _, stats = bsa_flex.attention(q, k, v, (4, 4, 4), BSAConfig(block_size=16), return_stats=True)
    assert (stats.kernel, stats.path) == ("blockwise", "blockwise")


def test_a_cuda_kernel_requested_on_cpu_is_refused_at_the_call():
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    with pytest.raises(ValueError, match="kernel='flash' names a CUDA kernel"):
        bsa_flex.attention(q, k, v, (4, 4, 4), BSAConfig(block_size=16, kernel="flash"))


def test_the_choice_is_logged_once(caplog):
    from bsa_flex.kernels import _announce_once
    _announce_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="bsa_flex"):
        for _ in range(2):
            bsa_flex.kernels.announce_kernel("triton", "FLASH takes float16 or bfloat16 inputs, not float32")
    lines = [r.getMessage() for r in caplog.records if "kernel" in r.getMessage()]
    assert lines == ["bsa_flex: attention runs on the triton kernel; FLASH passed over: "
                     "FLASH takes float16 or bfloat16 inputs, not float32"]


def test_bsattention_passes_the_kernel_choice_to_attention():
    layer = bsa_flex.BSAttention(32, 2, bsa=BSAConfig(block_size=16, kernel="triton"))
    with pytest.raises(ValueError, match="kernel='triton' names a CUDA kernel"):
        layer(torch.randn(1, 64, 32), (4, 4, 4))
