"""The compiled FlexAttention path on CPU (forward only: FlexAttention has no CPU backward).

Each new shape or structural config costs a compile (~10 s on 2 cores), so this module fuzzes
data and thresholds over a fixed set of cases; the mask logic is fuzzed widely elsewhere.
"""
import importlib
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch._dynamo.utils import counters

import bsa_flex
from bsa_flex import BSAConfig, BSARecompileWarning
from bsa_flex.attention import sparse_attention
from bsa_flex.plan import BSAPlan
from bsa_flex.runtime import threshold_tensor
from bsa_flex.synthetic import video_qkv
from bsa_flex.testing import assert_matches_oracle
from masks import static_selection, tile_layout

from .cases import Case

CPU = torch.device("cpu")


CASES = {
    "gqa_padded": Case((3, 5, 7), BSAConfig(tile=(2, 2, 2), window=(1, 2, 2), block_size=16), 2, 4, 2, 16, torch.float32),
    "zscore_tiles": Case((4, 8, 8), BSAConfig(tile=(4, 4, 4), window=(2, 2, 2), block_size=32, kv_rule="zscore"),
                         1, 2, 2, 32, torch.float32),
    "bf16_anchor_budget": Case((5, 6, 7), BSAConfig(tile=(2, 4, 4), window=(2, 2, 2), block_size=16, fill="anchor",
                                                    max_kv_blocks=3, query_keep_ratio=0.25), 1, 2, 2, 64, torch.bfloat16),
}


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@settings(max_examples=15)
@given(st.sampled_from(sorted(CASES)), st.integers(0, 2**31 - 1), st.floats(0.05, 1.0), st.floats(-0.5, 2.0),
       st.floats(1.0, 12.0))
def test_compiled_path_matches_oracle(name, seed, threshold, zscore, sharpness):
    case = CASES[name]
    config = BSAConfig(**{**case.config.__dict__, "kv_threshold": threshold, "kv_zscore": zscore})
    q, k, v = case.inputs(seed, sharpness=sharpness)
    stats = assert_matches_oracle(q, k, v, case.video_shape, config, enable_gqa=case.q_heads != case.kv_heads)
    assert stats.path == "flex"


@pytest.mark.parametrize("name", ["gqa_padded", "zscore_tiles"])
def test_dense_config_equals_sdpa(name):
    case = CASES[name]
    q, k, v = case.inputs(0)
    config = BSAConfig.dense(tile=case.config.tile, window=case.config.window, block_size=case.config.block_size)
    gqa = case.q_heads != case.kv_heads
    out, stats = bsa_flex.attention(q, k, v, case.video_shape, config, enable_gqa=gqa, return_stats=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa), atol=1e-4, rtol=1e-4)
    assert stats.path == "flex" and float(stats.sparsity) == pytest.approx(0.0, abs=1e-6)



def flex_cpu_plan(case, *, kernel: str = "flex_cpu", scale: float = 0.25) -> BSAPlan:
    """The plan of one of the cases on FlexAttention's CPU path (or another CPU kernel)."""
    layout = tile_layout(case.video_shape, case.config.tile, case.config.window, case.config.block_size, CPU)
    return BSAPlan(config=case.config, layout=layout, kernel=kernel, scale=scale,
                   static=static_selection(layout, case.config.keep_per_window))

def test_compiled_path_gets_its_sparsity_from_the_block_lists():
    """Compiled, the mask_mod masks padding keys only; on a video without padding it admits
    every pair, so a result equal to the sparse oracle (and unequal to dense attention) can
    only come from the kernel skipping the unselected blocks of its lists."""
    case = CASES["zscore_tiles"]
    layout = tile_layout(case.video_shape, case.config.tile, case.config.window, case.config.block_size, CPU)
    assert bool(layout.slot_valid.all())  # premise: no padding, the compiled mask_mod is all-True
    q, k, v = case.inputs(1, sharpness=8.0)
    stats = assert_matches_oracle(q, k, v, case.video_shape, case.config)
    assert float(stats.sparsity) > 0.3 and stats.path == "flex"
    out = bsa_flex.attention(q, k, v, case.video_shape, case.config)
    assert not torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-3)


@pytest.mark.parametrize("name", sorted(CASES))
def test_uncompiled_flex_computes_the_same_function_through_the_mask_mod(name):
    """Uncompiled FlexAttention ignores block lists and applies only the mask_mod element-wise."""
    case = CASES[name]
    q, k, v = case.inputs(2)
    gqa = case.q_heads != case.kv_heads
    compiled = bsa_flex.attention(q, k, v, case.video_shape, case.config, enable_gqa=gqa)
    with pytest.warns(bsa_flex.BSAEagerWarning, match="uncompiled"):
        eager, _, _ = sparse_attention(q, k, v, threshold_tensor(case.config.kv_rule_threshold, CPU),
                                       flex_cpu_plan(case, scale=case.head_dim ** -0.5))
    tol = 1e-5 if case.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(eager, compiled, atol=tol, rtol=tol)


def _own_frame(*args):
    """sparse_attention in a frame of its own: dynamo keeps compiled code per frame, and a test
    compiling sparse_attention itself with another backend would replace the runtime's graphs."""
    return sparse_attention(*args)


def test_operator_compiles_as_one_graph_without_breaks():
    case = CASES["gqa_padded"]
    q, k, v = case.inputs(3)
    graphs = []  # not torch._dynamo.explain: it resets dynamo, and with it the graphs of the rest of the suite
    torch.compile(_own_frame, backend=lambda gm, _: graphs.append(gm) or gm, fullgraph=True)(
        q, k, v, threshold_tensor(0.5, CPU), flex_cpu_plan(case))
    assert len(graphs) == 1


def test_compiled_graph_sorts_only_through_the_opaque_sort():
    """A sort Inductor can see becomes a Triton bitonic sort that takes minutes to compile on CUDA."""
    from torch._dynamo.backends.common import aot_autograd
    case = CASES["gqa_padded"]
    q, k, v = case.inputs(3)
    targets = []

    def record(graph_module, example_inputs):
        targets.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module

    compiled = torch.compile(_own_frame, backend=aot_autograd(fw_compiler=record), fullgraph=True)
    compiled(q, k, v, threshold_tensor(0.5, CPU), flex_cpu_plan(case))
    sorts = [t for t in targets if "sort" in t]
    assert sorts and all("bsa_masks.stable_argsort" in t for t in sorts), sorts


def test_fresh_data_and_new_thresholds_do_not_recompile():
    case = CASES["gqa_padded"]
    bsa_flex.attention(*case.inputs(4), case.video_shape, case.config, enable_gqa=True)  # warm
    before = graphs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", BSARecompileWarning)
        for i in range(6):
            config = BSAConfig(**{**case.config.__dict__, "kv_threshold": 0.2 + 0.1 * i})
            bsa_flex.attention(*case.inputs(10 + i), case.video_shape, config, enable_gqa=True)
    assert graphs() == before


def test_an_expected_compile_is_logged_not_warned(caplog):
    """A new shape compiles once: a user cannot act on that, so it is an INFO line, not a warning."""
    case = CASES["gqa_padded"]
    q, k, v = video_qkv(1, 2, 2, (2, 3, 11), 16, seed=0)  # a shape no other test uses
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="bsa_flex"):
        warnings.simplefilter("error", BSARecompileWarning)
        bsa_flex.attention(q, k, v, (2, 3, 11), case.config)
    assert any("compiled the sparse-attention graph" in r.getMessage() for r in caplog.records)


def test_the_same_signature_compiled_again_is_warned():
    """The graph log's rule (a compile whose signature was seen before is what a user can act on),
    without resetting dynamo's caches for the rest of the suite."""
    from bsa_flex import runtime
    graphs = runtime._GraphLog(limit=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BSARecompileWarning)
        graphs.record(("a signature",), "q (1, 2, 16, 8)")
        graphs.record(("another",), "q (1, 2, 32, 8)")
    with pytest.warns(BSARecompileWarning, match="again for a signature it had compiled before"):
        graphs.record(("a signature",), "q (1, 2, 16, 8)")


def test_a_graph_count_near_the_recompile_limit_is_warned(monkeypatch):
    from bsa_flex import runtime
    monkeypatch.setattr(runtime, "_GRAPHS", runtime._GraphLog(limit=2))  # warns at its first graph
    q, k, v = video_qkv(1, 2, 2, (2, 3, 9), 16, seed=0)  # a shape no other test uses
    with pytest.warns(BSARecompileWarning, match="near the limit of 2"):
        bsa_flex.attention(q, k, v, (2, 3, 9), CASES["gqa_padded"].config)


def test_more_graphs_than_dynamos_recompile_limit_compile_without_error():
    """Many shapes or kept counts are legitimate; dynamo's own budget must not turn them into errors."""
    with torch._dynamo.config.patch(recompile_limit=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", BSARecompileWarning)
        for width in (13, 14, 15):  # shapes no other test uses: three new graphs past a limit of 1
            q, k, v = video_qkv(1, 2, 2, (2, 3, width), 16, seed=width)
            bsa_flex.attention(q, k, v, (2, 3, width), BSAConfig(tile=(1, 3, 4), window=(1, 1, 2), block_size=16))
        assert torch._dynamo.config.recompile_limit == 1  # the user's setting is left as it was


def test_model_compiled_around_attention_runs_as_one_graph_and_does_not_recompile():
    """A user compiles their whole block; a schedule updates the threshold tensor in place."""
    case = CASES["zscore_tiles"]
    threshold = torch.tensor(0.5)
    config = BSAConfig(**{**case.config.__dict__, "kv_rule": "cumulative", "kv_threshold": threshold})
    proj = torch.nn.Linear(case.head_dim, case.head_dim)

    def block(q, k, v):
        return proj(bsa_flex.attention(q, k, v, case.video_shape, config))

    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    with torch.no_grad():
        compiled(*case.inputs(6))
        block(*case.inputs(6))  # the eager reference compiles bsa_flex's own graph once
        before = graphs()
        for i in range(5):
            threshold.fill_(0.3 + 0.15 * i)
            q, k, v = case.inputs(20 + i)
            got = compiled(q, k, v)
            assert graphs() == before
            torch.testing.assert_close(got, block(q, k, v), atol=1e-5, rtol=1e-5)


def test_score_mod_inside_a_model_compiled_on_cpu_runs_our_graph_behind_an_announced_break():
    case = CASES["zscore_tiles"]
    q, k, v = case.inputs(8)
    decay = lambda score, b, h, q_idx, kv_idx: score - 0.01 * (q_idx - kv_idx).abs() * (h + 1)  # noqa: E731
    call = lambda q, k, v: bsa_flex.attention(q, k, v, case.video_shape, case.config, score_mod=decay)  # noqa: E731
    with torch.no_grad(), pytest.warns(bsa_flex.BSAEagerWarning, match="score_mod runs in bsa_flex's own"):
        got = torch.compile(call, dynamic=False)(q, k, v)
    with torch.no_grad():
        torch.testing.assert_close(got, call(q, k, v), atol=1e-5, rtol=1e-5)


def test_same_input_twice_gives_identical_selection_and_output():
    case = CASES["bf16_anchor_budget"]
    q, k, v = case.inputs(7)
    first = bsa_flex.attention(q, k, v, case.video_shape, case.config, return_stats=True)
    second = bsa_flex.attention(q.clone(), k.clone(), v.clone(), case.video_shape, case.config, return_stats=True)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1].selection, second[1].selection):
        assert torch.equal(a, b)


def test_batch_equals_its_items_run_one_by_one():
    case = CASES["gqa_padded"]
    q, k, v = case.inputs(8)
    together = bsa_flex.attention(q, k, v, case.video_shape, case.config, enable_gqa=True)
    for i in range(case.batch):
        alone = bsa_flex.attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], case.video_shape, case.config, enable_gqa=True)
        torch.testing.assert_close(together[i:i + 1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["blockwise", "flex_cpu"], ids=["blockwise", "flex_uncompiled"])
def test_whatever_padding_slots_hold_cannot_change_any_output(kernel, monkeypatch):
    case = CASES["gqa_padded"]  # (3, 5, 7) in 2x2x2 tiles: padding slots in partial blocks
    q, k, v = case.inputs(9)
    plan = flex_cpu_plan(case, kernel=kernel)
    layout = plan.layout
    assert bool(layout.kv_block_partial.any())
    operator_module = importlib.import_module("bsa_flex.attention")  # bsa_flex.attention is the function
    attend = operator_module.attend_path(kernel)

    def attend_with_garbage_padding(q_kept, k_slots, v_slots, *rest):
        k_slots, v_slots = k_slots.clone(), v_slots.clone()
        k_slots[:, :, ~layout.slot_valid] = 1e4 * torch.randn_like(k_slots[:, :, ~layout.slot_valid])
        v_slots[:, :, ~layout.slot_valid] = 1e4 * torch.randn_like(v_slots[:, :, ~layout.slot_valid])
        return attend(q_kept, k_slots, v_slots, *rest)

    args = (threshold_tensor(0.5, CPU), plan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        clean, _, _ = sparse_attention(q, k, v, *args)
        monkeypatch.setattr(operator_module, "attend_path", lambda _: attend_with_garbage_padding)
        dirty, _, _ = sparse_attention(q, k, v, *args)
    torch.testing.assert_close(dirty, clean, atol=1e-5, rtol=1e-5)


def test_nothing_of_size_s_squared_is_materialised():
    """Trace the operator on fake tensors at 65,536 tokens and look at every intermediate."""
    from torch.fx.experimental.proxy_tensor import make_fx

    video_shape, config = (16, 64, 64), BSAConfig()
    S = 16 * 64 * 64
    layout = tile_layout(video_shape, config.tile, config.window, config.block_size, CPU)
    q, k, v = (torch.empty(1, 2, S, 64) for _ in range(3))
    plan = BSAPlan(config=config, layout=layout, kernel="flex_cpu", scale=0.125,
                   static=static_selection(layout, config.keep_per_window))

    def operator(q, k, v, threshold):
        return sparse_attention(q, k, v, threshold, plan)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = make_fx(operator, tracing_mode="fake", _allow_non_fake_inputs=True)(q, k, v, torch.tensor(0.9))
    sizes = [x.numel() for node in graph.graph.nodes
             for x in (node.meta.get("val") if isinstance(node.meta.get("val"), (list, tuple)) else [node.meta.get("val")])
             if isinstance(x, torch.Tensor)]
    assert len(sizes) > 100  # the whole operator was traced
    assert max(sizes) <= 2 * q.numel() and 100 * max(sizes) < S * S


def test_cpu_training_inside_a_fullgraph_compile_stops_with_a_bsa_flex_error_saying_what_to_do():
    case = CASES["gqa_padded"]
    q, k, v = (t.requires_grad_() for t in case.inputs(12))
    compiled = torch.compile(lambda q, k, v: bsa_flex.attention(q, k, v, case.video_shape, case.config,
                                                                enable_gqa=True), fullgraph=True)
    with pytest.raises(Exception, match="bsa_flex: on CPU with gradients.*fullgraph=True: compile without"):
        compiled(q, k, v)
    loose = torch.compile(lambda q, k, v: bsa_flex.attention(q, k, v, case.video_shape, case.config,
                                                             enable_gqa=True))
    with pytest.warns(bsa_flex.BSAEagerWarning, match="graph break"):  # without fullgraph: runs, equal to eager
        got = loose(q, k, v)
    torch.testing.assert_close(got, bsa_flex.attention(q, k, v, case.video_shape, case.config, enable_gqa=True))


def test_a_size_made_symbolic_by_the_callers_compile_is_specialised_one_graph_per_value():
    """plain_ints, which makes the layout's key: a dynamic size becomes a plain int under a guard (torch 2.11's
    dynamo cannot pass a symbolic int to the layout's constant function: 'SymNodeVariable() is not a constant')."""
    from torch._dynamo.testing import CompileCounter
    from bsa_flex.runtime import plain_ints

    def plus_size(x):
        (size,) = plain_ints((x.shape[0],))
        return x + size

    backend = CompileCounter()
    compiled = torch.compile(plus_size, backend=backend, fullgraph=True)
    for size in (3, 4, 5):
        x = torch.zeros(size)
        torch._dynamo.maybe_mark_dynamic(x, 0)
        with pytest.warns(bsa_flex.BSARecompileWarning, match="changed between calls .* is specialised"):
            assert torch.equal(compiled(x), torch.full((size,), float(size)))
    assert backend.frame_count == 3


def test_sizes_that_arrive_as_plain_ints_are_not_announced():
    """Static shapes (a caller compiled with dynamic=False, bsa_flex's own graph) and eager calls: no warning."""
    from bsa_flex.runtime import plain_ints

    def plus_size(x):
        (size,) = plain_ints((x.shape[0],))
        return x + size

    compiled = torch.compile(plus_size, backend="eager", fullgraph=True, dynamic=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BSARecompileWarning)
        for size in (3, 4):
            assert torch.equal(compiled(torch.zeros(size)), torch.full((size,), float(size)))
        assert plain_ints((2, 3)) == (2, 3)
