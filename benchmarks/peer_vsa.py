"""VSA's block-sparse Triton kernel (fastvideo-kernel) against FlexAttention at equal block density.

    PYTHONPATH=$PWD python benchmarks/peer_vsa.py --vsa-kernel PATH [--tokens 23296 153600]

PATH is python/fastvideo_kernel/triton_kernels/block_sparse_attn_triton.py from the
fastvideo-kernel 0.3.5 sdist (`pip download --no-deps --no-binary :all: fastvideo-kernel==0.3.5`).
The package itself needs a CUDA build pinned to torch 2.12; that file needs only triton.

Both kernels compute the same function: one random block selection made at Flex's 128-token
granularity, with the density of the Wan case (1 - sparsity: 0.07 at 23,296 tokens, 0.05 at
153,600), given to VSA at its 64-token granularity (each 128 block is 2 x 2 of VSA's). Kernels
alone: no selection, no gathers, no query pruning. Baseline: the best SDPA backend, same run.
Prints a table; details to $OUT/peer_vsa.json when OUT is set.
"""
import argparse
import importlib.util
import json
import os

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from bsa_flex.bench import _compile, best_sdpa, environment, median_ms
from masks import ordered_kv_blocks

CASES = {23296: ((16, 28, 52), 0.93), 153600: ((40, 48, 80), 0.95)}
HEADS, HEAD_DIM, FLEX_BLOCK, VSA_BLOCK = 12, 128, 128, 64


def load_vsa(path: str):
    """The module holding triton_block_sparse_attn_forward / _backward."""
    spec = importlib.util.spec_from_file_location("vsa_block_sparse_attn_triton", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_block_map(rows: int, cols: int, density: float, device, seed: int = 0) -> torch.Tensor:
    """[1, HEADS, rows, cols] bool, exactly round(density * cols) (at least 1) blocks per row, at random."""
    per_row = max(1, round(density * cols))
    g = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(1, HEADS, rows, cols, generator=g, device=device)
    chosen = scores.topk(per_row, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True)


def flex_block_mask(block_map: torch.Tensor, seq_len: int) -> BlockMask:
    """Every selected block full (no mask_mod inside), as BSA's blocks of real tokens are."""
    empty_num = torch.zeros(block_map.shape[:-1], dtype=torch.int32, device=block_map.device)
    empty_idx = torch.zeros(block_map.shape, dtype=torch.int32, device=block_map.device)
    return BlockMask.from_kv_blocks(empty_num, empty_idx, *ordered_kv_blocks(block_map),
                                    BLOCK_SIZE=FLEX_BLOCK, seq_lengths=(seq_len, seq_len))


def vsa_lists(block_map: torch.Tensor) -> dict:
    """VSA's metadata for the same selection at 64-token blocks: q->kv and kv->q lists, block sizes."""
    fine = block_map.repeat_interleave(2, -2).repeat_interleave(2, -1)
    q2k_num, q2k_idx = ordered_kv_blocks(fine)
    k2q_num, k2q_idx = ordered_kv_blocks(fine.transpose(-2, -1))
    sizes = torch.full((fine.shape[-1],), VSA_BLOCK, dtype=torch.int32, device=fine.device)
    return dict(q2k_index=q2k_idx.contiguous(), q2k_num=q2k_num.contiguous(), k2q_index=k2q_idx.contiguous(),
                k2q_num=k2q_num.contiguous(), variable_block_sizes=sizes)


def bench(tokens: int, vsa, device) -> dict:
    video_shape, sparsity = CASES[tokens]
    density = 1.0 - sparsity
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v, grad = (torch.randn(1, HEADS, tokens, HEAD_DIM, generator=g, device=device, dtype=torch.bfloat16)
                     for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    block_map = random_block_map(tokens // FLEX_BLOCK, tokens // FLEX_BLOCK, density, device)
    block_mask = flex_block_mask(block_map, tokens)
    kernel = _compile(lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask))
    lists = vsa_lists(block_map)

    def vsa_forward():
        return vsa.triton_block_sparse_attn_forward(q, k, v, lists["q2k_index"], lists["q2k_num"],
                                                    lists["variable_block_sizes"])

    def vsa_step():
        out, lse = vsa_forward()
        return vsa.triton_block_sparse_attn_backward(grad, q, k, v, out, lse, lists["q2k_index"], lists["q2k_num"],
                                                     lists["k2q_index"], lists["k2q_num"],
                                                     lists["variable_block_sizes"])

    with torch.no_grad():
        flex_out, vsa_out = kernel(q, k, v), vsa_forward()[0]
    agreement = float((flex_out.float() - vsa_out.float()).abs().max())
    flex_step = lambda: kernel(*leaves).backward(grad)  # noqa: E731
    sdpa = best_sdpa(*leaves, grad, device)
    row = {"tokens": tokens, "video_shape": video_shape, "block_density": float(block_map.float().mean()),
           "max_abs_difference_flex_vs_vsa": agreement,
           "sdpa": {key: sdpa[key] for key in ("backend", "fwd", "fwd_bwd")},
           "flex": {"fwd": median_ms(lambda: kernel(q, k, v), device), "fwd_bwd": median_ms(flex_step, device)},
           "vsa": {"fwd": median_ms(vsa_forward, device), "fwd_bwd": median_ms(vsa_step, device)}}
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vsa-kernel", required=True, help="path to fastvideo-kernel's block_sparse_attn_triton.py")
    parser.add_argument("--tokens", type=int, nargs="+", choices=sorted(CASES), default=sorted(CASES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (both kernels are GPU kernels)")
    if not os.path.isfile(args.vsa_kernel):
        parser.error(f"--vsa-kernel: no file at {args.vsa_kernel}")
    device = torch.device("cuda")
    vsa = load_vsa(args.vsa_kernel)
    rows = [bench(tokens, vsa, device) for tokens in args.tokens]
    result = {"environment": environment(device), "rows": rows}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "peer_vsa.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"{result['environment']}")
    print(f"{'tokens':>8} {'density':>8} {'SDPA fwd+bwd':>13} {'Flex fwd+bwd':>13} {'VSA fwd+bwd':>12} "
          f"{'Flex fwd':>9} {'VSA fwd':>8} {'max |Flex-VSA|':>15}")
    for r in rows:
        print(f"{r['tokens']:>8} {r['block_density']:>8.3f} {r['sdpa']['fwd_bwd']:>10.2f} ms "
              f"{r['flex']['fwd_bwd']:>10.2f} ms {r['vsa']['fwd_bwd']:>9.2f} ms {r['flex']['fwd']:>6.2f} ms "
              f"{r['vsa']['fwd']:>5.2f} ms {r['max_abs_difference_flex_vs_vsa']:>15.3e}  (SDPA: {r['sdpa']['backend']})")


if __name__ == "__main__":
    main()
