"""BSA in diffusers' Wan2.1 transformer: ``apply_bsa(transformer, config)``, undone by ``remove_bsa``.

diffusers (0.42) has no registry for new attention backends, so this swaps the attention
processor of every block's self-attention (``attn1``); cross-attention (``attn2``) stays dense.
The video shape (T, H, W after patching) is read from the latents of each forward pass by a
pre-hook on the transformer. Requires ``pip install 'bsa-flex[diffusers]'``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import BSAConfig
from ..modules import SparsityControl, layer_stats
from ..schedule import SparsitySchedule

__all__ = ["apply_bsa", "remove_bsa", "BSAWanAttnProcessor", "BSAHandle"]


def _wan_module():
    try:
        from diffusers.models.transformers import transformer_wan
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError("bsa_flex.integrations.diffusers needs diffusers: pip install 'bsa-flex[diffusers]'") from error
    return transformer_wan


@dataclass
class _LatentShape:
    """The post-patch video shape of the forward pass in progress, shared by the processors."""

    video_shape: tuple[int, int, int] | None = None


def _rotate(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on [B, S, H, D] (interleaved pairs), as diffusers' Wan processor applies it."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)
    return out.type_as(x)


class BSAWanAttnProcessor:
    """A ``WanAttention`` self-attention processor that attends with BSA (or densely, as set).

    Same projections, q/k RMSNorm and rotary embedding as diffusers' ``WanAttnProcessor``; the
    attention itself is :meth:`attend`, which tests override to run the oracle.
    """

    def __init__(self, control: SparsityControl, shape: _LatentShape):
        self.control = control
        self.shape = shape

    @property
    def last_stats(self):
        return self.control.last_stats

    def set_sparsity(self, setting) -> None:
        self.control.set_sparsity(setting)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, video_shape) -> torch.Tensor:
        """[B, H, S, D] -> [B, H, S, D]: BSA or dense, as the schedule set this layer."""
        return self.control.attention(q, k, v, video_shape)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb=None) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("BSAWanAttnProcessor is for self-attention (attn1); cross-attention stays dense")
        if attention_mask is not None:
            raise ValueError("BSA does not take an attention_mask: its sparsity comes from the selection")
        if self.shape.video_shape is None:
            raise RuntimeError("the video shape is unknown: call the transformer patched by apply_bsa, "
                               "not its attention modules directly")
        query, key, value = _wan_module()._get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))  # [B, S, H, D]
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        query, key = query.to(value.dtype), key.to(value.dtype)  # CUDA autocast may run the norms in float32
        self.control.to(query.device)
        out = self.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                             self.shape.video_shape)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


@dataclass
class BSAHandle:
    """What ``apply_bsa`` changed: the processors it installed and how to undo it."""

    transformer: torch.nn.Module
    processors: list[BSAWanAttnProcessor]
    originals: list = field(repr=False)
    hook: torch.utils.hooks.RemovableHandle = field(repr=False)
    schedule: SparsitySchedule | None = None

    def step(self, step: int) -> list:
        """Apply the schedule (if any) at ``step`` to every layer; returns the per-layer settings."""
        if self.schedule is None:
            raise ValueError("apply_bsa was called without a schedule")
        return self.schedule.apply(self.processors, step)

    def stats(self) -> list[dict]:
        """Per layer: dense flag, sparsity and kept-query fraction of the last forward (one host sync)."""
        return layer_stats(self.processors)


def _check_latents(transformer, args, kwargs, shape: _LatentShape) -> None:
    """Forward pre-hook: record the post-patch video shape, refusing latents the patch does not tile."""
    latents = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
        raise ValueError("WanTransformer3DModel with BSA expects hidden_states of shape [B, C, F, H, W], got "
                         f"{getattr(latents, 'shape', type(latents).__name__)}")
    patch = tuple(transformer.config.patch_size)
    frames, height, width = latents.shape[2:]
    if frames % patch[0] or height % patch[1] or width % patch[2]:
        raise ValueError(f"latents of (frames, height, width) = {(frames, height, width)} are not divisible by the "
                         f"patch size {patch}: BSA needs the whole post-patch video grid (diffusers would drop the "
                         f"remainder); crop or pad the latents to multiples of {patch}")
    shape.video_shape = (frames // patch[0], height // patch[1], width // patch[2])


def apply_bsa(transformer, config: BSAConfig | None = None, schedule: SparsitySchedule | None = None) -> BSAHandle:
    """Switch the self-attention of a diffusers ``WanTransformer3DModel`` to BSA; returns a handle.

    ``config``: the BSA configuration of every layer (default ``BSAConfig()``). ``schedule``: an
    optional :class:`SparsitySchedule`; call ``handle.step(step)`` each training step. Undo with
    :func:`remove_bsa` (or ``handle`` passed to it). Works under ``torch.compile`` of the transformer.
    """
    wan = _wan_module()
    if not isinstance(transformer, wan.WanTransformer3DModel):
        raise TypeError(f"apply_bsa expects a diffusers WanTransformer3DModel, got {type(transformer).__name__}")
    if getattr(transformer, "_bsa_handle", None) is not None:
        raise ValueError("BSA is already applied to this transformer: call remove_bsa first")
    config = BSAConfig() if config is None else config
    if not isinstance(config, BSAConfig):
        raise TypeError(f"config must be a BSAConfig or None, got {type(config).__name__}")
    if schedule is not None and not isinstance(schedule, SparsitySchedule):
        raise TypeError(f"schedule must be a SparsitySchedule or None, got {type(schedule).__name__}")
    device = next(transformer.parameters()).device
    shape = _LatentShape()
    processors, originals = [], []
    for block in transformer.blocks:
        control = SparsityControl(config)
        control.to(device)
        processor = BSAWanAttnProcessor(control, shape)
        originals.append(block.attn1.processor)
        block.attn1.set_processor(processor)
        processors.append(processor)
    hook = transformer.register_forward_pre_hook(lambda module, args, kwargs: _check_latents(module, args, kwargs, shape),
                                                 with_kwargs=True)
    handle = BSAHandle(transformer, processors, originals, hook, schedule)
    transformer._bsa_handle = handle
    return handle


def remove_bsa(transformer) -> None:
    """Restore the attention processors ``apply_bsa`` replaced and remove its hook."""
    handle = getattr(transformer, "_bsa_handle", None)
    if handle is None:
        raise ValueError("BSA is not applied to this transformer")
    for block, original in zip(transformer.blocks, handle.originals):
        block.attn1.set_processor(original)
    handle.hook.remove()
    transformer._bsa_handle = None

