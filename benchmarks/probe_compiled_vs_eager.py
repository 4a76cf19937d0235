"""Which is right where torch.compile(bsa_flex.attention) and the eager call differ? (a probe)

    PYTHONPATH=$PWD python benchmarks/probe_compiled_vs_eager.py [--video T H W] [--heads N] [--no-grad]

Runs BSA eagerly and inside a caller's torch.compile on the same inputs (bf16, requires_grad as
in training unless --no-grad), counts the token-heads whose selection differs (query or KV
blocks), and for the 20 output rows that differ most computes that row in float64 from each
side's own selection (the query the row copies, the keys of its query block's KV blocks).
Prints each side's error against its own float64 row: both small means both are right, each
for the selection it made.
Written after 2 ranks of torch.compile(ulysses_attention) differed from eager by up to 1.1 on H200s.
"""
import argparse
import warnings

import torch

import bsa_flex
from bsa_flex import BSAConfig
from bsa_flex.synthetic import video_qkv
from masks import tile_layout, tokens_with_same_selection


def oracle_row(q, k, v, selection, layout, b, h, t, scale):
    """Float64 output of raster token t of head h, from the selection alone: [D]."""
    r = int(selection.fill_source[b, h, t])
    query = int(selection.kept_token[b, h, r])
    kv_row = selection.kv_blocks[b, h, r // layout.block_size]
    keys = kv_row[layout.token_slot // layout.block_size].nonzero().squeeze(-1)
    scores = (k[b, h, keys].double() @ q[b, h, query].double()) * scale
    return torch.softmax(scores, 0) @ v[b, h, keys].double(), query, len(keys)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=int, nargs=3, default=[40, 48, 80])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--no-grad", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    video, config = tuple(args.video), BSAConfig()
    q, k, v = video_qkv(1, args.heads, args.heads, video, 128, dtype=torch.bfloat16, device=device, seed=0,
                        requires_grad=not args.no_grad)
    compiled = torch.compile(bsa_flex.attention, dynamic=False)
    with torch.set_grad_enabled(not args.no_grad):
        eager_out, eager_stats = bsa_flex.attention(q, k, v, video, config, return_stats=True)
        comp_out, comp_stats = compiled(q, k, v, video, config, return_stats=True)
    layout = tile_layout(video, config.tile, config.window, config.block_size, q.device)
    same = tokens_with_same_selection(eager_stats.selection, comp_stats.selection, config.block_size)
    diff = (eager_out.detach().float() - comp_out.detach().float()).abs().amax(-1)  # [B, H, S]
    agreeing = f"{float(diff[same].max()):.3e}" if bool(same.any()) else "-"
    print(f"{device} S={q.shape[2]} grad={not args.no_grad}: token-heads with another selection "
          f"{int((~same).sum())} of {same.numel()}; max |diff| {float(diff.max()):.3e} overall, {agreeing} where "
          f"the selection agrees; rows with |diff| > 0.05: {int((diff > 0.05).sum())}")
    scale, S = q.shape[-1] ** -0.5, q.shape[2]
    values, flat = diff.flatten().topk(min(20, diff.numel()))
    print(" head  token  same  query e/c   keys e/c  |diff|  |eager-own oracle|  |compiled-own oracle|")
    qkv = [t.detach() for t in (q, k, v)]
    for value, index in zip(values.tolist(), flat.tolist()):
        b, h, t = index // (args.heads * S), index // S % args.heads, index % S
        ref_e, query_e, keys_e = oracle_row(*qkv, eager_stats.selection, layout, b, h, t, scale)
        ref_c, query_c, keys_c = oracle_row(*qkv, comp_stats.selection, layout, b, h, t, scale)
        e = float((eager_out[b, h, t].double() - ref_e).abs().max())
        c = float((comp_out[b, h, t].double() - ref_c).abs().max())
        print(f"{h:5d} {t:6d} {str(bool(same[b, h, t])):>5} {query_e:6d}/{query_c:<6d} {keys_e:5d}/{keys_c:<5d} "
              f"{value:.3e}  {e:.3e}  {c:.3e}")


if __name__ == "__main__":
    main()
