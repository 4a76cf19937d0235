"""First look at BSA at Wan2.1 shapes on one GPU: SDPA vs the whole BSA pipeline vs its Flex kernel.

Prints a table; details to $OUT/probe_wan.json when OUT is set. A probe, not the benchmark.
"""
import json
import os
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench
from torch.nn.attention.flex_attention import flex_attention

import bsa_flex
from bsa_flex import BSAConfig
from bsa_flex.synthetic import video_qkv
from masks import build_block_mask, gather_tokens, tile_layout, to_tile_major

dev = "cuda"
H, D = 12, 128
rows = []
flex = torch.compile(flex_attention, dynamic=False)


def bench(fn, grad_out=None):
    fwd = do_bench(fn, warmup=25, rep=100, return_mode="median")
    fb = do_bench(lambda: fn().backward(grad_out), warmup=25, rep=100, return_mode="median")
    return fwd, fb


CASES = [((16, 28, 52), 24), ((40, 48, 80), 118)]
ONLY = os.environ.get("PROBE_TOKENS")  # e.g. PROBE_TOKENS=153600: one case only
for video_shape, budget in CASES:
    if ONLY and int(ONLY) != video_shape[0] * video_shape[1] * video_shape[2]:
        continue
    S = video_shape[0] * video_shape[1] * video_shape[2]
    t0 = time.time()
    q, k, v = video_qkv(1, H, H, video_shape, D, dtype=torch.bfloat16, device=dev, seed=0, sharpness=2.0,
                        requires_grad=True)
    gen_s = time.time() - t0
    go = torch.randn_like(q)
    sd = bench(lambda: F.scaled_dot_product_attention(q, k, v), go)
    torch.cuda.reset_peak_memory_stats()
    F.scaled_dot_product_attention(q, k, v).backward(go)
    sd_mem = torch.cuda.max_memory_allocated() / 2**30
    for name, config in [("keep0.5_p0.9_budget", BSAConfig(kv_threshold=0.9, max_kv_blocks=budget))]:
        t0 = time.time()
        out, stats = bsa_flex.attention(q, k, v, video_shape, config, return_stats=True)
        out.backward(go)
        compile_s = time.time() - t0
        sparsity = float(stats.sparsity)
        bsa = bench(lambda: bsa_flex.attention(q, k, v, video_shape, config), go)
        torch.cuda.reset_peak_memory_stats()
        bsa_flex.attention(q, k, v, video_shape, config).backward(go)
        bsa_mem = torch.cuda.max_memory_allocated() / 2**30
        # the Flex kernel alone on the same selection (mask built once, outside the timing)
        layout = tile_layout(video_shape, config.tile, config.window, config.block_size, torch.device(dev))
        sel = stats.selection
        qk = gather_tokens(q.detach(), sel.kept_token).requires_grad_()
        ks = to_tile_major(k.detach(), layout).requires_grad_()
        vs = to_tile_major(v.detach(), layout).requires_grad_()
        bm = build_block_mask(sel.kv_blocks, layout)
        gk = torch.randn_like(qk)
        kern = bench(lambda: flex(qk, ks, vs, block_mask=bm, scale=D ** -0.5), gk)
        row = dict(S=S, config=name, sparsity=sparsity, kept=float(stats.kept_query_fraction),
                   kv_density=float(stats.kv_density.mean()), sdpa_fwd=sd[0], sdpa_fb=sd[1],
                   bsa_fwd=bsa[0], bsa_fb=bsa[1], kernel_fwd=kern[0], kernel_fb=kern[1],
                   speedup_fwd=sd[0] / bsa[0], speedup_fb=sd[1] / bsa[1],
                   overhead_fb=(bsa[1] - kern[1]) / bsa[1], sdpa_peak_gib=sd_mem, bsa_peak_gib=bsa_mem,
                   compile_s=compile_s, gen_s=gen_s)
        rows.append(row)
        print(json.dumps(row), flush=True)
    torch.cuda.empty_cache()

if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "probe_wan.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
print(f"{'S':>7} {'config':>20} {'spars':>6} {'SDPA f/fb ms':>14} {'BSA f/fb ms':>14} {'kern f/fb':>13} "
      f"{'x fwd':>6} {'x fb':>6} {'ovh':>5} {'mem S/B GiB':>11}")
for r in rows:
    print(f"{r['S']:>7} {r['config']:>20} {r['sparsity']:.3f} {r['sdpa_fwd']:6.2f}/{r['sdpa_fb']:7.2f} "
          f"{r['bsa_fwd']:6.2f}/{r['bsa_fb']:7.2f} {r['kernel_fwd']:5.2f}/{r['kernel_fb']:6.2f} "
          f"{r['speedup_fwd']:6.2f} {r['speedup_fb']:6.2f} {r['overhead_fb']:5.2f} {r['sdpa_peak_gib']:5.2f}/{r['bsa_peak_gib']:5.2f}")
