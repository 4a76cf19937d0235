"""Is the backward of BSA's output fill (a gather whose backward scatters with atomics) a hotspot?

    PYTHONPATH=$PWD python benchmarks/probe_fill_backward.py      (CUDA; a probe, not the benchmark)

At 153,600 tokens, 12 heads, D=128, bf16, keep 0.5 in 2x2x2 windows: times the compiled
backward of ``gather_tokens(out_kept, fill_source)`` (scatter-add into the kept rows) against an
atomic-free alternative that sums each window's gradients into its kept rows with a one-hot
contraction, and checks that both give the same gradient. Prediction: if the scatter's atomics
cost more than ~1 ms, the contraction (about 1.6 GB of traffic, ~0.4 ms) is worth adopting.
"""
import torch
from triton.testing import do_bench

from bsa_flex import BSAConfig
from bsa_flex.synthetic import video_qkv
from masks import gather_tokens, select_queries, tile_layout

video, heads, dim = (40, 48, 80), 12, 128
config = BSAConfig()
layout = tile_layout(video, config.tile, config.window, config.block_size, torch.device("cuda"))
q, _, _ = video_qkv(1, heads, heads, video, dim, dtype=torch.bfloat16, device="cuda", seed=0, sharpness=2.0)
kept = torch.compile(lambda q: select_queries(q, layout, config.keep_per_window, config.fill))(q)
out_kept = torch.randn(1, heads, kept.kept_token.shape[-1], dim, device="cuda", dtype=torch.bfloat16)
grad_out = torch.randn_like(q)
n, w, k = layout.num_windows, layout.window_tokens, config.keep_per_window


@torch.compile
def scatter_backward(grad_out, fill_source):
    rows = torch.zeros_like(out_kept)
    return rows.scatter_add(2, fill_source[..., None].expand(-1, -1, -1, dim), grad_out)


@torch.compile
def window_contraction(grad_out, fill_source):
    slots = layout.slot_token[: layout.num_video_slots]
    grad_slots = grad_out.index_select(2, slots).view(1, heads, n, w, dim).float()
    rank = fill_source.index_select(2, slots).view(1, heads, n, w) - torch.arange(n, device="cuda")[:, None] * k
    onehot = (rank[..., None] == torch.arange(k, device="cuda")).float()  # [1, H, n, w, k]
    rows = torch.einsum("bhnwd,bhnwk->bhnkd", grad_slots, onehot).reshape(1, heads, n * k, dim)
    return torch.nn.functional.pad(rows, (0, 0, 0, out_kept.shape[2] - n * k)).to(grad_out.dtype)


a = scatter_backward(grad_out, kept.fill_source)
b = window_contraction(grad_out, kept.fill_source)
print("max abs difference", float((a.float() - b.float()).abs().max()))
ref = torch.autograd.grad(gather_tokens(out_kept.requires_grad_(), kept.fill_source), out_kept, grad_out)[0]
print("autograd vs scatter", float((ref.float() - a.float()).abs().max()))
for name, fn in [("scatter_add (autograd's way)", scatter_backward), ("window one-hot contraction", window_contraction)]:
    print(f"{name}: {do_bench(lambda: fn(grad_out, kept.fill_source), return_mode='median'):.3f} ms")
