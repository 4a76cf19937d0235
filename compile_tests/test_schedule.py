"""SparsitySchedule: warm-up, stairs, final values, per-layer overrides, validation; FlowTimeSplit: groups of times."""
import pytest
from hypothesis import given, strategies as st

import torch

from bsa_flex import FlowTimeSplit, SparsitySchedule


@st.composite
def schedules(draw):
    return SparsitySchedule(
        final_keep_ratio=draw(st.floats(0.1, 1.0)), final_kv_threshold=draw(st.floats(0.1, 1.0)),
        dense_steps=draw(st.integers(0, 50)), ramp_steps=draw(st.integers(0, 300)), every=draw(st.integers(1, 40)),
        start_keep_ratio=draw(st.floats(0.1, 1.0)), start_kv_threshold=draw(st.floats(0.1, 1.0)),
        dense_layers=draw(st.integers(0, 3)))


@given(schedules(), st.integers(0, 5))
def test_warm_up_steps_are_dense_in_every_layer(schedule, layer):
    assert all(schedule.at(step, layer).dense for step in range(schedule.dense_steps))


@given(schedules(), st.integers(0, 500))
def test_first_layers_stay_dense_at_every_step(schedule, step):
    assert all(schedule.at(step, layer).dense for layer in range(schedule.dense_layers))
    assert schedule.at(step, schedule.dense_layers).dense == (step < schedule.dense_steps)


@given(schedules())
def test_values_change_only_on_stair_boundaries_and_move_monotonically_to_the_final(schedule):
    end = schedule.dense_steps + schedule.ramp_steps + 2 * schedule.every
    values = [schedule.at(step, 5) for step in range(schedule.dense_steps, end)]
    for offset, (before, after) in enumerate(zip(values, values[1:]), start=1):
        if (before.keep_ratio, before.kv_threshold) != (after.keep_ratio, after.kv_threshold):
            assert offset % schedule.every == 0
    for name, start, final in [("keep_ratio", schedule.start_keep_ratio, schedule.final_keep_ratio),
                               ("kv_threshold", schedule.start_kv_threshold, schedule.final_kv_threshold)]:
        series = [getattr(v, name) for v in values]
        assert series[0] == pytest.approx(start) or schedule.ramp_steps == 0
        steps = [b - a for a, b in zip(series, series[1:])]
        assert all(d * (final - start) >= -1e-12 for d in steps)  # never moves away from the final value
        assert series[-1] == pytest.approx(final)


@given(schedules(), st.integers(0, 10_000))
def test_after_the_ramp_every_step_runs_the_final_values(schedule, extra):
    setting = schedule.at(schedule.dense_steps + schedule.ramp_steps + schedule.every + extra, 7)
    assert not setting.dense
    assert setting.keep_ratio == pytest.approx(schedule.final_keep_ratio)
    assert setting.kv_threshold == pytest.approx(schedule.final_kv_threshold)


def test_layer_overrides_replace_the_final_values_of_that_layer_only():
    schedule = SparsitySchedule(final_keep_ratio=0.5, final_kv_threshold=0.9,
                                layer_overrides={1: {"final_keep_ratio": 0.75, "final_kv_threshold": 0.95},
                                                 2: {"dense": True}})
    assert schedule.at(10, 0)[1:3] == (0.5, 0.9)
    assert schedule.at(10, 1)[1:3] == (0.75, 0.95)
    assert schedule.at(10, 2).dense and not schedule.at(10, 3).dense


def test_applying_an_override_of_a_layer_the_model_lacks_is_an_error_naming_it():
    from bsa_flex import BSAttention
    layers = [BSAttention(32, 2) for _ in range(2)]
    with pytest.raises(ValueError, match=r"layer_overrides names layers \[3\], but only 2 layers"):
        SparsitySchedule(layer_overrides={3: {"final_keep_ratio": 0.5}}).apply(layers, 0)


def test_the_papers_recipe_raises_sparsity_every_30_steps():
    """+0.03 every 30 steps up to 0.9: here as the keep ratio going 1.0 -> 0.1 in 30 stairs."""
    schedule = SparsitySchedule(final_keep_ratio=0.1, start_keep_ratio=1.0, final_kv_threshold=1.0,
                                ramp_steps=900, every=30)
    keeps = [schedule.at(step, 0).keep_ratio for step in range(0, 931)]
    assert keeps[29] == 1.0 and keeps[30] == pytest.approx(0.97) and keeps[900] == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"final_keep_ratio": 0.0}, ValueError, "final_keep_ratio"),
    ({"final_kv_threshold": 1.5}, ValueError, "final_kv_threshold"),
    ({"start_keep_ratio": "1"}, TypeError, "start_keep_ratio"),
    ({"every": 0}, ValueError, "every"),
    ({"dense_steps": -1}, ValueError, "dense_steps"),
    ({"ramp_steps": 2.5}, TypeError, "ramp_steps"),
    ({"layer_overrides": {0: {"keep": 0.5}}}, ValueError, "unknown keys"),
    ({"layer_overrides": {0: {"final_keep_ratio": 2.0}}}, ValueError, "final_keep_ratio"),
    ({"layer_overrides": {-1: {}}}, TypeError, "layer indices"),
    ({"layer_overrides": [(0, {})]}, TypeError, "layer_overrides"),
    ({"layer_overrides": {0: {"window": (2, 2)}}}, TypeError, "window"),
    ({"windows": ((1, 2, 2), (0, 1, 1))}, ValueError, r"windows\[1\]"),
    ({"windows": (1, 2, 2)}, TypeError, r"windows\[0\]"),
    ({"alternate": "frame"}, ValueError, "alternate"),
    ({"final_kv_budget": 0.0}, ValueError, "final_kv_budget"),
    ({"start_kv_budget": 1.5}, ValueError, "start_kv_budget"),
    ({"layer_overrides": {0: {"final_kv_budget": "0.1"}}}, TypeError, "final_kv_budget"),
])
def test_invalid_schedules_are_rejected_naming_the_field(kwargs, error, match):
    with pytest.raises(error, match=match):
        SparsitySchedule(**kwargs)


def test_negative_step_is_rejected():
    with pytest.raises(ValueError, match="step"):
        SparsitySchedule().at(-1, 0)


def test_windows_alternate_by_layer_and_a_layer_override_wins():
    schedule = SparsitySchedule(windows=((1, 2, 2), (2, 1, 1)), layer_overrides={3: {"window": (2, 2, 2)}})
    assert [schedule.at(5, layer).window for layer in range(4)] == [(1, 2, 2), (2, 1, 1), (1, 2, 2), (2, 2, 2)]


def test_windows_alternate_by_stair_after_the_warm_up():
    schedule = SparsitySchedule(windows=([1, 2, 2], [2, 1, 1]), alternate="step", dense_steps=10, every=5)
    assert [schedule.at(step, 0).window for step in (10, 14, 15, 20)] == [(1, 2, 2), (1, 2, 2), (2, 1, 1), (1, 2, 2)]


def test_without_windows_every_layer_keeps_its_own():
    assert SparsitySchedule().at(3, 2).window is None


def test_without_a_final_kv_budget_no_layer_is_given_one():
    assert SparsitySchedule(final_keep_ratio=0.5, ramp_steps=60).at(30, 0).kv_budget is None


def test_a_kv_budget_ramps_in_the_same_stairs_and_a_layer_override_replaces_its_final_value():
    schedule = SparsitySchedule(final_kv_budget=0.1, final_kv_threshold=0.9, ramp_steps=90, every=30,
                                layer_overrides={1: {"final_kv_budget": 0.4}})
    assert [schedule.at(step, 0).kv_budget for step in (0, 29, 30, 60, 90, 500)] == pytest.approx(
        [1.0, 1.0, 0.7, 0.4, 0.1, 0.1])
    assert [schedule.at(step, 0).kv_threshold for step in (29, 30)] == pytest.approx([1.0, 29 / 30])
    assert schedule.at(90, 1).kv_budget == pytest.approx(0.4)


def _two_way_split(boundary: float = 0.75) -> FlowTimeSplit:
    """All queries below the boundary, a quarter of them from it on."""
    return FlowTimeSplit((boundary,), (SparsitySchedule(), SparsitySchedule(final_keep_ratio=0.25)))


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=16), st.lists(st.floats(0.01, 0.99), min_size=1,
                                                                       max_size=3, unique=True))
def test_the_groups_of_a_batch_partition_it_and_each_row_is_in_the_group_of_its_time(times, boundaries):
    split = FlowTimeSplit(tuple(sorted(boundaries)), (SparsitySchedule(),) * (len(boundaries) + 1))
    t = torch.tensor(times, dtype=torch.float64)
    groups = split.groups(t)
    assert sum(mask.long() for _, mask in groups).tolist() == [1] * len(times)
    for group, mask in groups:
        assert all(split.group_of(time) == group for time in t[mask].tolist())


def test_a_time_on_a_boundary_belongs_to_the_group_above():
    split = _two_way_split(0.75)
    assert [split.group_of(t) for t in (0.0, 0.7499, 0.75, 1.0)] == [0, 0, 1, 1]


def test_applying_a_group_sets_every_layer_to_that_groups_schedule():
    from bsa_flex import BSAConfig, BSAttention
    layers = [BSAttention(32, 2, bsa=BSAConfig()) for _ in range(2)]
    split = _two_way_split()
    split.apply(layers, 0, 1)
    assert [layer.config.keep_per_window for layer in layers] == [2, 2]  # a quarter of 2x2x2
    split.apply(layers, 0, 0)
    assert [layer.config.keep_per_window for layer in layers] == [8, 8]


@pytest.mark.parametrize("boundaries, schedules, error, match", [
    ((0.5, 0.5), 3, ValueError, "boundaries must increase"),
    ((0.5,), 3, ValueError, r"needs len\(boundaries\) \+ 1 = 2 schedules"),
    ((), 1, TypeError, "non-empty tuple of times"),
    ((float("nan"),), 2, ValueError, r"boundaries\[0\]"),
])
def test_invalid_splits_are_rejected_naming_the_field(boundaries, schedules, error, match):
    with pytest.raises(error, match=match):
        FlowTimeSplit(boundaries, (SparsitySchedule(),) * schedules)


def test_a_split_of_anything_but_schedules_or_a_group_past_the_last_is_rejected():
    with pytest.raises(TypeError, match="tuple of SparsitySchedule"):
        FlowTimeSplit((0.5,), (SparsitySchedule(), {"final_keep_ratio": 0.5}))
    with pytest.raises(ValueError, match="group must be below 2"):
        _two_way_split().apply([], 0, 2)
