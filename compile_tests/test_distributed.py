"""Ulysses sequence parallelism on CPU: 2 to 4 gloo processes on loopback against single-process BSA (keep 1.0,
and queries pruned with the copy and the local fill), including head counts the ranks do not divide."""
import dataclasses
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bsa_flex
from bsa_flex import BSAConfig
from bsa_flex.distributed import check_ulysses_shapes, head_groups, ulysses_attention
from bsa_flex.synthetic import video_qkv

VIDEO = (4, 6, 8)  # 192 tokens: 96 per rank
CONFIG = BSAConfig(tile=(2, 2, 4), window=(1, 2, 2), block_size=16, kv_threshold=0.6)
PRUNED = dataclasses.replace(CONFIG, query_keep_ratio=0.5)  # half the queries, the most similar kept one copied
PRUNED_LOCAL = dataclasses.replace(PRUNED, fill="local")  # the pruned queries in rows of their own


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _head_scaled(score, b, h, q_idx, kv_idx):
    """A score_mod that depends on the (global) head index."""
    return score * (1.0 + 0.25 * h)


def _full_inputs(q_heads: int, kv_heads: int, text: tuple, with_grad: bool):
    """The whole q, k, v (the same on every rank): video tokens with random text tokens around them."""
    q, k, v = video_qkv(2, q_heads, kv_heads, VIDEO, 16, seed=0)
    g = torch.Generator().manual_seed(1)
    return [torch.cat([torch.randn(*t.shape[:2], text[0], 16, generator=g), t,
                       torch.randn(*t.shape[:2], text[1], 16, generator=g)], 2).requires_grad_(with_grad)
            for t in (q, k, v)]


def _assert_same_gradients(out, ref, local, full, shard):
    """Backward of the same output gradient: each rank's q/k/v gradients are its shard of one process's."""
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    out.backward(grad[:, :, shard])
    ref.backward(grad)
    for mine, whole in zip(local, full):
        torch.testing.assert_close(mine.grad, whole.grad[:, :, shard], atol=1e-5, rtol=1e-5)


def _rank_main(rank: int, world: int, port: int, with_grad: bool, gqa: bool, compiled: bool, text: tuple,
               head_chunks: int, config: BSAConfig):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a bounded collective timeout: a hung rank fails the test instead of stalling CI
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        q, k, v = _full_inputs(4, 2 if gqa else 4, text, with_grad)
        shard = slice(rank * q.shape[2] // world, (rank + 1) * q.shape[2] // world)
        heads = slice(rank * q.shape[1] // world, (rank + 1) * q.shape[1] // world)
        local = [t.detach()[:, :, shard].clone().requires_grad_(with_grad) for t in (q, k, v)]
        score_mod, head_dependent = None, head_chunks > 1 and not compiled
        if head_dependent:  # head indices must reach the score_mod in this rank's numbering
            score_mod = lambda s, b, h, qi, ki: _head_scaled(s, b, h + heads.start, qi, ki)  # noqa: E731
        run = lambda q, k, v: ulysses_attention(q, k, v, VIDEO, config, enable_gqa=gqa,  # noqa: E731
                                                prefix_tokens=text[0], suffix_tokens=text[1],
                                                score_mod=score_mod, head_chunks=head_chunks, return_stats=True)
        if compiled:  # the all-to-alls are functional collectives: one graph with the operator
            run = torch.compile(run, fullgraph=True, dynamic=False)
        with torch.set_grad_enabled(with_grad):
            out, stats = run(*local)
            ref, ref_stats = bsa_flex.attention(q, k, v, VIDEO, config, enable_gqa=gqa, prefix_tokens=text[0],
                                                suffix_tokens=text[1], return_stats=True,
                                                score_mod=_head_scaled if head_dependent else None)
        torch.testing.assert_close(out, ref[:, :, shard], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats.sparsity_per_head, ref_stats.sparsity_per_head[:, heads])
        assert torch.equal(stats.selection.kv_blocks, ref_stats.selection.kv_blocks[:, heads])
        if with_grad:
            _assert_same_gradients(out, ref, local, (q, k, v), shard)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("with_grad,gqa,compiled,text,head_chunks,config", [
    (True, False, False, (0, 0), 1, CONFIG), (True, True, False, (0, 0), 1, CONFIG),
    (False, False, False, (0, 0), 1, CONFIG), (False, False, True, (0, 0), 1, CONFIG),
    (True, True, False, (5, 11), 1, CONFIG), (True, False, False, (0, 0), 2, CONFIG),
    (False, False, True, (0, 0), 2, CONFIG), (True, True, False, (5, 11), 1, PRUNED),
    (False, False, True, (0, 0), 1, PRUNED_LOCAL)],
    ids=["grads", "grads_gqa", "forward", "forward_fullgraph_compiled", "grads_gqa_text_tokens",
         "grads_two_head_chunks_head_dependent_score_mod", "forward_fullgraph_compiled_two_head_chunks",
         "grads_gqa_text_tokens_queries_pruned", "forward_fullgraph_compiled_queries_pruned_local_fill"])
def test_two_gloo_ranks_equal_single_process_bsa(with_grad, gqa, compiled, text, head_chunks, config):
    mp.start_processes(_rank_main, args=(2, _free_port(), with_grad, gqa, compiled, text, head_chunks, config),
                       nprocs=2, join=True, start_method="spawn")


def _shared_heads_rank_main(rank: int, world: int, port: int, heads: tuple, with_grad: bool, compiled: bool,
                            text: tuple, config: BSAConfig):
    """Ranks that share heads (P does not divide them): output and q/k/v gradients of one process."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        q, k, v = _full_inputs(*heads, text, with_grad)
        shard = slice(rank * q.shape[2] // world, (rank + 1) * q.shape[2] // world)
        local = [t.detach()[:, :, shard].clone().requires_grad_(with_grad) for t in (q, k, v)]
        gqa = heads[0] != heads[1]
        run = lambda q, k, v: ulysses_attention(q, k, v, VIDEO, config, enable_gqa=gqa,  # noqa: E731
                                                prefix_tokens=text[0], suffix_tokens=text[1])
        if compiled:
            run = torch.compile(run, fullgraph=True, dynamic=False)
        with torch.set_grad_enabled(with_grad):
            out = run(*local)
            ref = bsa_flex.attention(q, k, v, VIDEO, config, enable_gqa=gqa, prefix_tokens=text[0],
                                     suffix_tokens=text[1])
        torch.testing.assert_close(out, ref[:, :, shard], atol=1e-5, rtol=1e-5)
        if with_grad:
            _assert_same_gradients(out, ref, local, (q, k, v), shard)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,heads,with_grad,compiled,text,config", [
    (3, (4, 2), True, False, (0, 0), CONFIG), (4, (6, 6), True, False, (5, 11), CONFIG),
    (3, (4, 4), False, True, (0, 0), CONFIG), (3, (4, 2), True, False, (0, 0), PRUNED_LOCAL)],
    ids=["3_ranks_4_q_2_kv_heads_grads", "4_ranks_6_heads_grads_text_tokens", "3_ranks_4_heads_forward_compiled",
         "3_ranks_4_q_2_kv_heads_grads_queries_pruned_local_fill"])
def test_ranks_that_do_not_divide_the_heads_equal_single_process_bsa(world, heads, with_grad, compiled, text, config):
    mp.start_processes(_shared_heads_rank_main, args=(world, _free_port(), heads, with_grad, compiled, text, config),
                       nprocs=world, join=True, start_method="spawn")


@pytest.mark.parametrize("q_heads,kv_heads,world,expected", [(12, 12, 8, (4, 2)), (12, 12, 4, (4, 1)),
                                                             (4, 2, 3, (1, 3)), (6, 6, 4, (2, 2)), (8, 2, 4, (2, 2))])
def test_head_groups_are_the_most_groups_that_split_both_head_counts_and_the_ranks(q_heads, kv_heads, world, expected):
    assert head_groups(q_heads, kv_heads, world) == expected


def test_query_shares_cover_every_query_block_exactly_once():
    from bsa_flex.attention import query_blocks_in_share
    for n_blocks, runs in ((7, 3), (12, 2), (2, 5)):
        shares = torch.stack([query_blocks_in_share(n_blocks, (i, runs), "cpu") for i in range(runs)])
        assert torch.equal(shares.sum(0), torch.ones(n_blocks, dtype=torch.long))


@pytest.mark.parametrize("q_heads,kv_heads,shard,video,text,match", [
    (4, 4, 52, (3, 5, 7), (0, 0), "does not split evenly"),
    (4, 4, 90, (4, 6, 8), (0, 0), "each rank must hold"),
    (4, 4, 97, (4, 6, 8), (3, 0), "does not split evenly"),  # 192 video + 3 text tokens
])
def test_shapes_that_do_not_split_get_a_clear_error(q_heads, kv_heads, shard, video, text, match):
    with pytest.raises(ValueError, match=match):
        check_ulysses_shapes(q_heads, kv_heads, shard, video, 2, text)


@pytest.mark.parametrize("head_chunks,match", [(0, "int >= 1"), (2.0, "int >= 1"), (3, "must divide the heads")])
def test_head_chunks_that_do_not_divide_the_heads_get_a_clear_error(head_chunks, match):
    from bsa_flex.distributed import _check_head_chunks
    with pytest.raises(ValueError, match=match):
        _check_head_chunks(head_chunks, 4, 2)


def test_ulysses_without_an_initialised_process_group_says_so():
    q = torch.randn(1, 2, 96, 16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ulysses_attention(q, q, q, VIDEO, CONFIG)


@pytest.mark.parametrize("config", [CONFIG, PRUNED, PRUNED_LOCAL], ids=["keep_1", "keep_half", "keep_half_local_fill"])
@pytest.mark.parametrize("with_grad", [True, False], ids=["blockwise_with_gradients", "compiled_forward"])
def test_the_query_shares_of_a_head_group_sum_to_the_whole_attention_with_finite_gradients(with_grad, config):
    """Each share attends its run of query blocks and gives exact zeros elsewhere; the shares' sum is
    one-process BSA, and the q/k/v gradients of the shares (rows attending nothing included) sum to its."""
    from bsa_flex.distributed import rank_attention
    q, k, v = _full_inputs(4, 2, (0, 0), with_grad)
    with torch.set_grad_enabled(with_grad):
        ref = bsa_flex.attention(q, k, v, VIDEO, config, enable_gqa=True)
        parts = [rank_attention(q, k, v, VIDEO, config, query_share=(i, 3), enable_gqa=True) for i in range(3)]
    assert torch.stack([(p != 0).any(-1) for p in parts]).sum(0).max() <= 1  # one share per token at most
    torch.testing.assert_close(sum(parts), ref, atol=1e-6, rtol=1e-6)
    if with_grad:
        g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
        expected = torch.autograd.grad(ref, (q, k, v), g)
        for share_sum, want in zip(zip(*(torch.autograd.grad(p, (q, k, v), g) for p in parts)), expected):
            assert all(t.isfinite().all() for t in share_sum)
            torch.testing.assert_close(sum(share_sum), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("share", [(2, 2), (-1, 2), (0, 0), (0.0, 2), (0,)])
def test_a_query_share_that_is_not_a_run_of_the_blocks_is_refused_naming_it(share):
    from bsa_flex.distributed import rank_attention
    q = torch.randn(1, 2, 192, 16)
    with pytest.raises(ValueError, match="query_share"):
        rank_attention(q, q, q, VIDEO, CONFIG, query_share=share)
