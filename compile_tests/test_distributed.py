"""Ulysses sequence parallelism on CPU: 2 gloo processes on loopback against single-process BSA."""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bsa_flex
from bsa_flex import BSAConfig
from bsa_flex.distributed import check_ulysses_shapes, ulysses_attention
from bsa_flex.synthetic import video_qkv

VIDEO = (4, 6, 8)  # 192 tokens: 96 per rank
CONFIG = BSAConfig(tile=(2, 2, 4), window=(1, 2, 2), block_size=16, kv_threshold=0.6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _head_scaled(score, b, h, q_idx, kv_idx):
    """A score_mod that depends on the (global) head index."""
    return score * (1.0 + 0.25 * h)


def _rank_main(rank: int, world: int, port: int, with_grad: bool, gqa: bool, compiled: bool, text: tuple,
               head_chunks: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a bounded collective timeout: a hung rank fails the test instead of stalling CI
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        q, k, v = video_qkv(2, 4, 2 if gqa else 4, VIDEO, 16, seed=0)
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.cat([torch.randn(*t.shape[:2], text[0], 16, generator=g), t,
                              torch.randn(*t.shape[:2], text[1], 16, generator=g)], 2).requires_grad_(with_grad)
                   for t in (q, k, v))
        shard = slice(rank * q.shape[2] // world, (rank + 1) * q.shape[2] // world)
        heads = slice(rank * q.shape[1] // world, (rank + 1) * q.shape[1] // world)
        local = [t.detach()[:, :, shard].clone().requires_grad_(with_grad) for t in (q, k, v)]
        score_mod, head_dependent = None, head_chunks > 1 and not compiled
        if head_dependent:  # head indices must reach the score_mod in this rank's numbering
            score_mod = lambda s, b, h, qi, ki: _head_scaled(s, b, h + heads.start, qi, ki)  # noqa: E731
        run = lambda q, k, v: ulysses_attention(q, k, v, VIDEO, CONFIG, enable_gqa=gqa,  # noqa: E731
                                                prefix_tokens=text[0], suffix_tokens=text[1],
                                                score_mod=score_mod, head_chunks=head_chunks, return_stats=True)
        if compiled:  # the all-to-alls are functional collectives: one graph with the operator
            run = torch.compile(run, fullgraph=True, dynamic=False)
        with torch.set_grad_enabled(with_grad):
            out, stats = run(*local)
            ref, ref_stats = bsa_flex.attention(q, k, v, VIDEO, CONFIG, enable_gqa=gqa, prefix_tokens=text[0],
                                                suffix_tokens=text[1], return_stats=True,
                                                score_mod=_head_scaled if head_dependent else None)
        torch.testing.assert_close(out, ref[:, :, shard], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats.sparsity_per_head, ref_stats.sparsity_per_head[:, heads])
        assert torch.equal(stats.selection.kv_blocks, ref_stats.selection.kv_blocks[:, heads])
        if with_grad:
            grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
            out.backward(grad[:, :, shard])
            ref.backward(grad)
            for mine, full in zip(local, (q, k, v)):
                torch.testing.assert_close(mine.grad, full.grad[:, :, shard], atol=1e-5, rtol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("with_grad,gqa,compiled,text,head_chunks", [
    (True, False, False, (0, 0), 1), (True, True, False, (0, 0), 1), (False, False, False, (0, 0), 1),
    (False, False, True, (0, 0), 1), (True, True, False, (5, 11), 1), (True, False, False, (0, 0), 2),
    (False, False, True, (0, 0), 2)],
    ids=["grads", "grads_gqa", "forward", "forward_fullgraph_compiled", "grads_gqa_text_tokens",
         "grads_two_head_chunks_head_dependent_score_mod", "forward_fullgraph_compiled_two_head_chunks"])
def test_two_gloo_ranks_equal_single_process_bsa(with_grad, gqa, compiled, text, head_chunks):
    mp.start_processes(_rank_main, args=(2, _free_port(), with_grad, gqa, compiled, text, head_chunks), nprocs=2,
                       join=True, start_method="spawn")


@pytest.mark.parametrize("q_heads,kv_heads,shard,video,text,match", [
    (4, 4, 52, (3, 5, 7), (0, 0), "does not split evenly"),
    (4, 4, 90, (4, 6, 8), (0, 0), "each rank must hold"),
    (4, 4, 97, (4, 6, 8), (3, 0), "does not split evenly"),  # 192 video + 3 text tokens
    (3, 3, 96, (4, 6, 8), (0, 0), "q have 3 heads"),
    (4, 1, 96, (4, 6, 8), (0, 0), "k and v have 1 heads"),
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
