"""SparsitySchedule: dense warm-up, then a stair ramp of BSA's knobs to their final values;
FlowTimeSplit: a schedule per range of the diffusion time."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, NamedTuple

import torch

from .validation import check_choice, check_int, check_real, check_triple, is_integer

__all__ = ["FlowTimeSplit", "LayerSparsity", "SparsitySchedule"]

_OVERRIDABLE = ("final_keep_ratio", "final_kv_threshold", "final_kv_budget", "dense", "window")
WINDOW_ALTERNATION = ("layer", "step")


class LayerSparsity(NamedTuple):
    """What one attention layer runs at one step."""

    dense: bool  # full attention (no BSA at all)
    keep_ratio: float  # BSA query keep ratio (ignored when dense)
    kv_threshold: float  # BSA KV threshold (ignored when dense)
    window: tuple[int, int, int] | None = None  # BSA query window; None: the layer's own
    kv_budget: float | None = None  # BSA KV budget (share of the KV blocks); None: the layer's own


def _check_fraction(name: str, value) -> None:
    check_real(f"SparsitySchedule.{name}", value, 0.0, 1.0, low_open=True)


def _check_count(name: str, value, low: int) -> None:
    check_int(f"SparsitySchedule.{name}", value, low)


@dataclass(frozen=True)
class SparsitySchedule:
    """Per step and layer: dense, or BSA with a query keep ratio, a KV threshold and a KV budget.

    Steps ``0 .. dense_steps - 1`` run full attention everywhere (warm-up), and the first
    ``dense_layers`` layers run it at every step. After the warm-up both knobs move linearly
    from ``start_*`` to ``final_*`` over ``ramp_steps`` steps, changing only every ``every``
    steps (stairs; the paper's recipe raises sparsity by 0.03 every 30 steps up to 0.9).
    ``layer_overrides`` maps a layer index to replacements of ``final_keep_ratio``,
    ``final_kv_threshold``, ``final_kv_budget``, ``dense`` or ``window``. With ``final_kv_budget``
    the KV budget (``BSAConfig.kv_budget``) ramps too, from ``start_kv_budget``; None leaves
    each layer's own.

    Space/time strategies: ``windows`` (query windows, each dividing the layers' tile) cycles
    by layer (``alternate="layer"``: layer i uses ``windows[i % n]``) or by stair
    (``alternate="step"``: every ``every`` steps the next window), e.g. ``((1, 2, 2), (2, 1, 1))``
    for spatial-only and temporal-only windows in turn. The keep ratio applies to each window's
    token count. Empty: every layer keeps its own window.

    Cost of changing values (see :class:`bsa_flex.BSAttention`): the KV threshold lives in a
    tensor updated in place, so its ramp never recompiles; the keep ratio sets a shape (the
    number of kept queries), so each distinct kept count per window compiles once (at most
    one graph per count between start and final, e.g. 5 for 8 -> 4 in 2x2x2 windows), and so
    does the switch from dense to sparse, each window and each KV budget (a cap on a count of
    blocks: one graph per stair). Revisiting a value reuses its graph.
    """

    final_keep_ratio: float = 1.0  # as BSAConfig(): the KV side alone (docs/training.md); the paper's is 0.5
    final_kv_threshold: float = 0.9
    dense_steps: int = 0
    ramp_steps: int = 0
    every: int = 30
    start_keep_ratio: float = 1.0
    start_kv_threshold: float = 1.0
    final_kv_budget: float | None = None
    start_kv_budget: float = 1.0
    dense_layers: int = 0
    layer_overrides: Mapping[int, Mapping[str, float | bool | tuple]] = field(default_factory=dict)
    windows: tuple[tuple[int, int, int], ...] = ()
    alternate: str = "layer"

    def __post_init__(self):
        for name in ("final_keep_ratio", "final_kv_threshold", "start_keep_ratio", "start_kv_threshold",
                     "start_kv_budget"):
            _check_fraction(name, getattr(self, name))
        if self.final_kv_budget is not None:
            _check_fraction("final_kv_budget", self.final_kv_budget)
        _check_count("dense_steps", self.dense_steps, 0)
        _check_count("ramp_steps", self.ramp_steps, 0)
        _check_count("every", self.every, 1)
        _check_count("dense_layers", self.dense_layers, 0)
        if not isinstance(self.windows, (tuple, list)):
            raise TypeError(f"SparsitySchedule.windows must be a tuple of (t, h, w) windows, got {self.windows!r}")
        object.__setattr__(self, "windows", tuple(check_triple(f"SparsitySchedule.windows[{i}]", w)
                                                  for i, w in enumerate(self.windows)))
        check_choice("SparsitySchedule.alternate", self.alternate, WINDOW_ALTERNATION)
        if not isinstance(self.layer_overrides, Mapping):
            raise TypeError(f"SparsitySchedule.layer_overrides must map layer index -> dict, "
                            f"got {type(self.layer_overrides).__name__}")
        for layer, override in self.layer_overrides.items():
            if not is_integer(layer) or layer < 0:
                raise TypeError(f"SparsitySchedule.layer_overrides keys must be layer indices >= 0, got {layer!r}")
            unknown = set(override) - set(_OVERRIDABLE)
            if unknown:
                raise ValueError(f"SparsitySchedule.layer_overrides[{layer}] has unknown keys {sorted(unknown)}; "
                                 f"allowed: {_OVERRIDABLE}")
            for name in ("final_keep_ratio", "final_kv_threshold", "final_kv_budget"):
                if name in override:
                    _check_fraction(f"layer_overrides[{layer}][{name!r}]", override[name])
            if "dense" in override and not isinstance(override["dense"], bool):
                raise TypeError(f"SparsitySchedule.layer_overrides[{layer}]['dense'] must be a bool")
            if "window" in override:
                check_triple(f"SparsitySchedule.layer_overrides[{layer}]['window']", override["window"])

    def progress(self, step: int) -> float:
        """Ramp progress in [0, 1] at ``step`` (a stair function; 1.0 once the ramp is over)."""
        _check_count("step", step, 0)
        if step < self.dense_steps:
            return 0.0
        if self.ramp_steps == 0:
            return 1.0
        stair = (step - self.dense_steps) // self.every * self.every
        return min(1.0, stair / self.ramp_steps)

    def at(self, step: int, layer: int) -> LayerSparsity:
        """The setting of ``layer`` at ``step``."""
        _check_count("layer", layer, 0)
        override = self.layer_overrides.get(layer, {})
        dense = step < self.dense_steps or layer < self.dense_layers or bool(override.get("dense", False))
        t = self.progress(step)
        final_keep = override.get("final_keep_ratio", self.final_keep_ratio)
        final_threshold = override.get("final_kv_threshold", self.final_kv_threshold)
        final_budget = override.get("final_kv_budget", self.final_kv_budget)
        return LayerSparsity(dense=dense,
                             keep_ratio=self.start_keep_ratio + t * (final_keep - self.start_keep_ratio),
                             kv_threshold=self.start_kv_threshold + t * (final_threshold - self.start_kv_threshold),
                             window=override.get("window", self.window_at(step, layer)),
                             kv_budget=None if final_budget is None else
                             self.start_kv_budget + t * (final_budget - self.start_kv_budget))

    def window_at(self, step: int, layer: int) -> tuple[int, int, int] | None:
        """The query window of ``windows`` for (step, layer), or None (the layer's own) without any."""
        if not self.windows:
            return None
        turn = layer if self.alternate == "layer" else max(0, step - self.dense_steps) // self.every
        return self.windows[turn % len(self.windows)]

    def apply(self, layers: Iterable, step: int) -> list[LayerSparsity]:
        """Set every layer (``BSAttention`` modules, in depth order) to its value at ``step``."""
        layers = list(layers)
        missing = sorted(index for index in self.layer_overrides if index >= len(layers))
        if missing:  # an override no layer takes would silently do nothing
            raise ValueError(f"SparsitySchedule.layer_overrides names layers {missing}, but only "
                             f"{len(layers)} layers were given (indices 0..{len(layers) - 1})")
        settings = []
        for index, layer in enumerate(layers):
            setting = self.at(step, index)
            layer.set_sparsity(setting)
            settings.append(setting)
        return settings


@dataclass(frozen=True)
class FlowTimeSplit:
    """A :class:`SparsitySchedule` per range of the diffusion time: e.g. all queries and few KV blocks
    at low noise, fewer queries and more KV blocks at high noise, at the same total sparsity.

    ``boundaries`` (increasing, in the units of the time the model takes: a flow time in [0, 1]
    with 1 = noise, or a scheduler's timestep) cut the time line into ``len(boundaries) + 1``
    groups; group ``i`` holds the times ``boundaries[i - 1] <= t < boundaries[i]`` and runs
    ``schedules[i]``. A layer runs one setting per call, so a batch whose samples fall into
    several groups runs once per group (:meth:`groups`); a sampler sets the group of each step's time.
    """

    boundaries: tuple[float, ...]
    schedules: tuple[SparsitySchedule, ...]

    def __post_init__(self):
        if not isinstance(self.boundaries, (tuple, list)) or not self.boundaries:
            raise TypeError(f"FlowTimeSplit.boundaries must be a non-empty tuple of times, got {self.boundaries!r}")
        for i, time in enumerate(self.boundaries):
            check_real(f"FlowTimeSplit.boundaries[{i}]", time, -math.inf, math.inf)
        if any(b <= a for a, b in zip(self.boundaries, self.boundaries[1:])):
            raise ValueError(f"FlowTimeSplit.boundaries must increase, got {tuple(self.boundaries)!r}")
        if not isinstance(self.schedules, (tuple, list)) or not all(
                isinstance(s, SparsitySchedule) for s in self.schedules):
            raise TypeError(f"FlowTimeSplit.schedules must be a tuple of SparsitySchedule, got {self.schedules!r}")
        if len(self.schedules) != len(self.boundaries) + 1:
            raise ValueError(f"FlowTimeSplit needs len(boundaries) + 1 = {len(self.boundaries) + 1} schedules "
                             f"(one per group of times), got {len(self.schedules)}")
        object.__setattr__(self, "boundaries", tuple(float(b) for b in self.boundaries))
        object.__setattr__(self, "schedules", tuple(self.schedules))

    def group_of(self, time: float) -> int:
        """The group of one time: how many boundaries are at or below it."""
        check_real("time", time, -math.inf, math.inf)
        return sum(boundary <= time for boundary in self.boundaries)

    def groups(self, times: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """The groups a batch's times fall into, in order, each with its rows: [(group, mask [N] bool)]."""
        if not isinstance(times, torch.Tensor) or times.dim() != 1:
            raise TypeError(f"times must be a 1-D tensor (one time per sample), got {times!r}")
        found = [self.group_of(time) for time in times.tolist()]
        index = torch.tensor(found, device=times.device)
        return [(group, index == group) for group in sorted(set(found))]

    def apply(self, layers: Iterable, step: int, group: int) -> list[LayerSparsity]:
        """Set every layer to its value at ``step`` in the schedule of ``group``."""
        check_int("group", group, 0)
        if group >= len(self.schedules):
            raise ValueError(f"group must be below {len(self.schedules)} (the number of groups), got {group}")
        return self.schedules[group].apply(layers, step)
