"""Validation of everything a user hands to bsa_flex: the one set of validators that the config,
the schedule, the modules, Ulysses, the CLI and ``attention`` share. Each raises a TypeError or
ValueError that names the argument and what it must be."""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_DEVICES = ("cpu", "cuda")


def is_integer(value, *, tensor_ok: bool = False) -> bool:
    """An integer (Python or numpy; with ``tensor_ok`` a 0-dim integer tensor too), never a bool."""
    if isinstance(value, torch.Tensor):
        return tensor_ok and value.dim() == 0 and value.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                                   torch.uint8)
    return isinstance(value, (numbers.Integral,)) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    """A real number (int or float, Python or numpy), never a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value, low: int | None = None, *, optional: bool = False) -> None:
    """``value`` is an int (or None where ``optional``) of at least ``low``."""
    if optional and value is None:
        return
    if not is_integer(value):
        kind = "an int or None" if optional else "an int"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def check_real(name: str, value, low: float, high: float, *, low_open: bool = False,
               tensor_ok: bool = False) -> None:
    """``value`` is a finite number in [low, high] ((low, high] with ``low_open``); a 0-dim float
    tensor too where ``tensor_ok`` (its current value is checked)."""
    if tensor_ok and isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise TypeError(f"{name} as a tensor must be a 0-dim floating tensor, "
                            f"got shape {tuple(value.shape)} {value.dtype}")
        value = float(value)
    elif not is_real(value):
        kind = "a float or a 0-dim float tensor" if tensor_ok else "a float"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        lo = "(" if low_open else "["
        raise ValueError(f"{name} must be a finite number in {lo}{low}, {high}], got {value!r}")


def check_triple(name: str, value) -> tuple[int, int, int]:
    """Three positive integers (t, h, w; numpy or 0-dim integer tensors too), returned as Python ints."""
    if not isinstance(value, (tuple, list, torch.Size)) or len(value) != 3 or not all(
            is_integer(n, tensor_ok=True) for n in value):
        raise TypeError(f"{name} must be three ints (t, h, w), got {value!r}")
    if any(n < 1 for n in value):
        raise ValueError(f"{name} must be three positive ints (t, h, w), got {tuple(value)!r}")
    return tuple(int(n) for n in value)


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


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
        if not is_integer(value):
            raise TypeError(f"{name} must be an int (non-video tokens, e.g. text), got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    return int(prefix_tokens), int(suffix_tokens)


def check_video_shape(video_shape, num_tokens: int, text_tokens: tuple[int, int] = (0, 0), *,
                      sequence: str = "q") -> tuple[int, int, int]:
    """(T, H, W) as a tuple of positive ints whose product plus the non-video tokens is the sequence length
    of the argument named ``sequence``."""
    video_shape = check_triple("video_shape", video_shape)
    if math.prod(video_shape) + sum(text_tokens) != num_tokens:
        extra = "" if text_tokens == (0, 0) else f" plus {text_tokens[0]} prefix and {text_tokens[1]} suffix tokens"
        raise ValueError(f"video_shape {tuple(video_shape)} holds T*H*W = {math.prod(video_shape)} tokens{extra}, "
                         f"but {sequence} has S = {num_tokens}")
    return tuple(video_shape)


def check_inputs(q, k, v, video_shape, config, *, scale, enable_gqa, score_mod,
                 text_tokens: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    """Raise TypeError/ValueError naming the offending argument; return the video shape as a tuple."""
    check_operands(q, k, v, config, scale=scale, enable_gqa=enable_gqa, score_mod=score_mod)
    return check_video_shape(video_shape, q.shape[2], text_tokens)


def check_operands(q, k, v, config, *, scale, enable_gqa, score_mod) -> None:
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
    from .config import BSAConfig  # the config validates itself with this module
    if not isinstance(config, BSAConfig):
        raise TypeError(f"config must be a bsa_flex.BSAConfig or None, got {type(config).__name__}")
    if scale is not None:
        if not is_real(scale):
            raise TypeError(f"scale must be None or a float, got {type(scale).__name__}")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a finite positive float, got {scale!r}")
    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"score_mod must be None or a callable (score, b, h, q_idx, kv_idx) -> score, "
                        f"got {type(score_mod).__name__}")
