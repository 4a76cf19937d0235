"""Ulysses sequence-parallel BSA: each rank holds S/P tokens, attends over all S for H/P heads
(or, where P does not divide the heads, for a head group shared by several ranks).

    torchrun --nproc-per-node 2 examples/ulysses.py            # NCCL on GPUs, gloo on CPU
    torchrun --nproc-per-node 2 examples/ulysses.py --video 40 48 80 --heads 12 --dim 128

Checks the result against single-process BSA on each rank's device, then times forward+backward:
the whole Ulysses step, the all-to-alls and this rank's attention separately (heads differ in
sparsity, so ranks differ), and single-process BSA over all heads on one GPU (the 1-GPU baseline).
With OUT set, rank 0 writes the rows to $OUT/ulysses.json.
"""
import argparse
import datetime
import json
import os
import time

import torch
import torch.distributed as dist
from einops import rearrange
from torch.distributed._functional_collectives import wait_tensor

import bsa_flex
from bsa_flex.attention import query_blocks_in_share
from bsa_flex.distributed import head_groups, heads_to_sequence, rank_attention, sequence_to_heads, ulysses_attention
from bsa_flex.synthetic import video_qkv
from masks import tokens_with_same_selection


def timed_ms(fn, device, repeats=10):
    """Median wall time of fn in ms, synchronising the device around each call."""
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()  # ranks start together, so a collective does not time the other rank's lateness
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times[1:])[repeats // 2]


def same_selection_in_shard(mine, theirs, shard: slice, block_size: int, replicas: int = 1) -> torch.Tensor:
    """[B, H, S/P] bool over all heads at this rank's tokens: both runs chose the same query and KV blocks.

    mine and theirs are the selections of this rank's heads (over the whole sequence); the ranks
    of a head group (``replicas`` of them, each reporting its own query blocks) must all agree.
    """
    same = tokens_with_same_selection(mine, theirs, block_size).to(torch.uint8)
    parts = [torch.empty_like(same) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, same)
    by_group = rearrange(torch.stack(parts).bool(), "(g r) b h s -> r b (g h) s", r=replicas).all(0)
    return by_group[:, :, shard]


def compare(out, ref, grads, ref_grads, same) -> dict:
    """Output error where the selections agree and overall, the tokens that chose otherwise, gradient error."""
    diff = (out.detach().float() - ref.detach().float()).abs().amax(-1)
    grad_diff = [(g.float() - r.float()) for g, r in zip(grads, ref_grads)]
    return dict(max_abs_error_same_selection=float(diff[same].max()), max_abs_error=float(diff.max()),
                rel_l2=float((out.detach().float() - ref.detach().float()).norm() / ref.detach().float().norm()),
                tokens_choosing_otherwise=int((~same).sum()), tokens=same.numel(),
                max_abs_grad_error=max(float(d.abs().max()) for d in grad_diff),
                grad_rel_l2=max(float(d.norm() / r.float().norm()) for d, r in zip(grad_diff, ref_grads)))


def describe(c: dict) -> str:
    return (f"max |err| {c['max_abs_error_same_selection']:.2e} where the selection agrees "
            f"({c['tokens'] - c['tokens_choosing_otherwise']} of {c['tokens']} token-heads), {c['max_abs_error']:.2e} "
            f"overall (rel. L2 {c['rel_l2']:.1e}); grads max |err| {c['max_abs_grad_error']:.2e}, "
            f"rel. L2 {c['grad_rel_l2']:.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=int, nargs=3, default=[8, 16, 32], metavar=("T", "H", "W"))
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--head-chunks", type=int, nargs="+", default=[1, 2],
                        help="time the Ulysses step with each of these head_chunks values (overlap of the "
                             "all-to-alls with attention); the first one is also checked against one process")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile(ulysses_attention): the layout changes around the "
                             "all-to-alls can then fuse into the attention graph's own kernels")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    video = tuple(args.video)
    dtype = torch.bfloat16 if cuda else torch.float32
    q, k, v = video_qkv(1, args.heads, args.heads, video, args.dim, dtype=dtype, device=device, seed=0,
                        requires_grad=True)  # the same full tensors on every rank (same seed)
    S = q.shape[2]
    shard = slice(rank * S // world, (rank + 1) * S // world)
    local = [t.detach()[:, :, shard].clone().requires_grad_() for t in (q, k, v)]
    config = bsa_flex.BSAConfig(block_size=128 if cuda else 32)

    grad_full = torch.randn(q.shape, generator=torch.Generator(device).manual_seed(1), device=device, dtype=dtype)
    grad = grad_full[:, :, shard]
    groups, replicas = head_groups(args.heads, args.heads, world)  # replicas > 1: ranks share heads
    share = (rank % replicas, replicas)
    heads = slice(rank // replicas * args.heads // groups, (rank // replicas + 1) * args.heads // groups)

    def run_checked(fn):
        """Output, stats and input gradients of one Ulysses fwd+bwd."""
        for t in local:
            t.grad = None
        out, stats = fn(*local, video, config, head_chunks=args.head_chunks[0], return_stats=True)
        out.backward(grad)
        return out, stats, [t.grad.clone() for t in local]

    # Discrete choices can differ between two graphs where a window's query scores nearly tie:
    # outputs must agree to rounding where the selection agrees; the rest is counted.
    reference, ref_stats = bsa_flex.attention(q, k, v, video, config, return_stats=True)
    reference.backward(grad_full)
    ref_grads = [t.grad[:, :, shard] for t in (q, k, v)]
    ref_selection = type(ref_stats.selection)(*(t[:, heads] for t in ref_stats.selection))
    if replicas > 1:  # a rank sharing heads reports the KV blocks of its own query blocks only
        rows = query_blocks_in_share(ref_selection.kv_blocks.shape[2], share, device)
        ref_selection = ref_selection._replace(kv_blocks=ref_selection.kv_blocks & rows[:, None])
    out, stats, grads = run_checked(ulysses_attention)
    checks = {"ulysses vs one process": compare(
        out, reference[:, :, shard], grads, ref_grads,
        same_selection_in_shard(stats.selection, ref_selection, shard, config.block_size, replicas))}

    variants = [(f"{c} head chunks", c, ulysses_attention) for c in args.head_chunks]
    if args.compile:
        compiled = torch.compile(ulysses_attention, dynamic=False)
        variants += [(f"{c} head chunks, compiled", c, compiled) for c in args.head_chunks]
        out_c, stats_c, grads_c = run_checked(compiled)
        checks["compiled vs eager ulysses"] = compare(
            out_c, out, grads_c, grads, same_selection_in_shard(stats_c.selection, stats.selection, shard,
                                                                config.block_size, replicas))
    step = lambda fn, chunks: fn(*local, video, config, head_chunks=chunks).backward(grad)  # noqa: E731
    group = dist.group.WORLD
    heads_local = [sequence_to_heads(t.detach(), world, group, replicas) for t in local]
    a2a = lambda: wait_tensor(heads_to_sequence(sequence_to_heads(local[0].detach(), world, group, replicas),  # noqa: E731
                                                world, group, replicas))
    attend = lambda: rank_attention(*[t.requires_grad_() for t in heads_local], video, config,  # noqa: E731
                                    query_share=share).sum().backward()
    one_gpu = lambda: bsa_flex.attention(q, k, v, video, config).backward(grad_full)  # noqa: E731
    row = dict(rank=rank, sparsity=float(stats.sparsity), checks=checks,
               step_ms={label: timed_ms(lambda: step(fn, c), device) for label, c, fn in variants},
               attention_ms=timed_ms(attend, device), all_to_all_pair_ms=timed_ms(a2a, device))
    row["one_gpu_all_heads_ms"] = timed_ms(one_gpu, device)  # every rank alone at once, each on its own GPU
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        for r in rows:
            steps = "  ".join(f"{ms:.2f} ms ({label})" for label, ms in r["step_ms"].items())
            print(f"rank {r['rank']}: sparsity {r['sparsity']:.3f}  fwd+bwd {steps}  "
                  f"local attention fwd+bwd {r['attention_ms']:.2f} ms  one all-to-all pair (fwd) "
                  f"{r['all_to_all_pair_ms']:.2f} ms")
            for name, c in r["checks"].items():
                print(f"  {name}: {describe(c)}")
        slowest, fastest = max(r["attention_ms"] for r in rows), min(r["attention_ms"] for r in rows)
        print(f"attention load imbalance (slowest / fastest rank): {slowest / fastest:.2f}")
        one_gpu_ms = rows[0]["one_gpu_all_heads_ms"]
        throughput = {}
        for label, _, _ in variants:
            step_ms = max(r["step_ms"][label] for r in rows)
            throughput[label] = one_gpu_ms / step_ms
            print(f"1 process, all {args.heads} heads: fwd+bwd {one_gpu_ms:.2f} ms; {world} ranks, {label}: "
                  f"{step_ms:.2f} ms (slowest rank) -> throughput {throughput[label]:.2f}x on {world} over 1")
        if os.environ.get("OUT"):
            env = dict(torch=torch.__version__, world=world, head_groups=groups, ranks_per_group=replicas,
                       video=video, heads=args.heads, dim=args.dim,
                       dtype=str(dtype), backend=dist.get_backend(),
                       card=torch.cuda.get_device_name(device) if cuda else "cpu")
            with open(os.path.join(os.environ["OUT"], "ulysses.json"), "w") as f:
                json.dump(dict(environment=env, world_size=world, kernel=stats.kernel, rows=rows,
                               throughput_vs_1gpu=throughput,
                               attention_imbalance=slowest / fastest), f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
