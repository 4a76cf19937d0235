"""Validation of everything a user hands to ``bsa_flex.attention``."""
from __future__ import annotations

import math

import torch

from .config import BSAConfig

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_DEVICES = ("cpu", "cuda")


def _check_qkv(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, H, S, D], got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape [B, H, S, D] (4 dims), got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}.dtype must be float16, bfloat16 or float32, got {t.dtype}")
    if t.device.type not in SUPPORTED_DEVICES:
        raise ValueError(f"{name} must be on a CPU or CUDA device, got {t.device}")
    if 0 in t.shape:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")


def check_text_tokens(prefix_tokens, suffix_tokens) -> tuple[int, int]:
    """The counts of non-video tokens before and after the video, as non-negative ints."""
    for name, value in (("prefix_tokens", prefix_tokens), ("suffix_tokens", suffix_tokens)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int (non-video tokens, e.g. text), got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    return prefix_tokens, suffix_tokens


def check_video_shape(video_shape, num_tokens: int, text_tokens: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    """(T, H, W) as a tuple of positive ints whose product plus the non-video tokens is the sequence length."""
    if not isinstance(video_shape, (tuple, list, torch.Size)) or len(video_shape) != 3 or any(
            isinstance(n, bool) or not isinstance(n, int) for n in video_shape):
        raise TypeError(f"video_shape must be three ints (T, H, W), got {video_shape!r}")
    if any(n < 1 for n in video_shape):
        raise ValueError(f"video_shape must be three positive ints (T, H, W), got {tuple(video_shape)}")
    if math.prod(video_shape) + sum(text_tokens) != num_tokens:
        extra = "" if text_tokens == (0, 0) else f" plus {text_tokens[0]} prefix and {text_tokens[1]} suffix tokens"
        raise ValueError(f"video_shape {tuple(video_shape)} holds T*H*W = {math.prod(video_shape)} tokens{extra}, "
                         f"but q has S = {num_tokens}")
    return tuple(video_shape)


def check_inputs(q, k, v, video_shape, config, scale, enable_gqa, score_mod,
                 text_tokens: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    """Raise TypeError/ValueError naming the offending argument; return the video shape as a tuple."""
    check_operands(q, k, v, config, scale, enable_gqa, score_mod)
    return check_video_shape(video_shape, q.shape[2], text_tokens)


def check_operands(q, k, v, config, scale, enable_gqa, score_mod) -> None:
    """Every check of :func:`check_inputs` but the video shape (q's S may be a shard of the sequence)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_qkv(name, t)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    B, Hq, S, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Hkv, S, D], got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"k and v must have batch size B = {B} like q, got {k.shape[0]}")
    if k.shape[2] != S:
        raise ValueError(f"k and v must have S = {S} tokens like q, got {k.shape[2]}")
    if k.shape[3] != D:
        raise ValueError(f"k and v must have head dim D = {D} like q, got {k.shape[3]}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    Hkv = k.shape[1]
    if Hkv != Hq and not enable_gqa:
        raise ValueError(f"q has {Hq} heads but k and v have {Hkv}: pass enable_gqa=True for grouped-query attention")
    if Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv}) for grouped-query attention")
    if not isinstance(config, BSAConfig):
        raise TypeError(f"config must be a bsa_flex.BSAConfig or None, got {type(config).__name__}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be None or a float, got {type(scale).__name__}")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a finite positive float, got {scale!r}")
    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"score_mod must be None or a callable (score, b, h, q_idx, kv_idx) -> score, "
                        f"got {type(score_mod).__name__}")
