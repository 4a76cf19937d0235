"""Smoke test of the benchmark on CPU: it runs end to end and writes its reports (no timing claims)."""
import json

import pytest

from bsa_flex import bench


def test_quick_benchmark_runs_on_cpu_and_writes_reports(tmp_path):
    result = bench.run(quick=True, device="cpu", out=str(tmp_path))
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] and saved["environment"]["card"] == "CPU"
    row = result["rows"][0]
    assert 0.0 < row["sparsity"] < 1.0 and abs(row["sparsity"] - row["target_sparsity"]) < 0.1
    assert row["sdpa"]["backend"] in bench.SDPA_BACKENDS and row["bsa"]["fwd"] > 0
    assert set(row["stages"]) >= {"select_ms", "block_mask_ms", "kernel_fwd", "rest_fwd_ms", "kernel"}
    assert row["kernel"] == row["stages"]["kernel"] == "flex_cpu"  # the kernel that ran, named in the row
    assert "| 256 | keep 0.5 | flex_cpu |" in (tmp_path / "bench.md").read_text()
    assert row["tile_order"]["bsa"]["fwd"] > 0  # the same call in the tile order, its own record
    assert "- tile order, 256 tokens, keep 0.5, flex_cpu: fwd" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("argv", [["--sparsities", "x"], ["--sparsities", "1.5"], ["--device", "tpu"],
                                  ["--kernel", "cuda"], ["--geometries", "keep 0.9"], ["--shapes", "16x28"]])
def test_bad_command_line_exits_with_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_wan_part_runs_both_wan_cases_in_every_geometry_and_breaks_down_keep_half_and_keep_one():
    cases = bench.plan(False, "wan", bench.SWEEP_SPARSITIES)
    assert {(shape, target) for shape, target, *_ in cases} == set(bench.WAN_CASES)
    assert {geometry for _, _, geometry, _, _ in cases} == set(bench.GEOMETRIES)
    assert all(breakdown == (geometry in ("keep 0.5", "keep 1.0")) for _, _, geometry, _, breakdown in cases)


def test_every_case_runs_once_on_every_requested_kernel_and_shapes_filter_them():
    one = bench.plan(False, "wan", bench.SWEEP_SPARSITIES)
    both = bench.plan(False, "wan", bench.SWEEP_SPARSITIES, kernels=("flash", "triton"))
    assert len(both) == 2 * len(one) and {case[3] for case in both} == {"flash", "triton"}
    small = bench.plan(False, "wan", bench.SWEEP_SPARSITIES, shapes={(16, 28, 52)}, geometries=("keep 1.0",))
    assert [(case[0], case[2]) for case in small] == [((16, 28, 52), "keep 1.0")]


def test_all_parts_together_measure_each_case_once():
    every = bench.plan(False, "all", bench.SWEEP_SPARSITIES)
    assert len(every) == len(set(every))
    sweep = {(shape, target) for shape, target, *_ in bench.plan(False, "sweep", bench.SWEEP_SPARSITIES)}
    assert sweep == {(shape, s) for shape in bench.SWEEP_SHAPES for s in bench.SWEEP_SPARSITIES}


def test_frontier_part_runs_the_wan_shapes_at_every_frontier_sparsity_and_geometry_without_breakdown():
    cases = bench.plan(False, "frontier", bench.SWEEP_SPARSITIES, geometries=("keep 1.0", "keep 0.5"))
    assert {(shape, target, geometry) for shape, target, geometry, _, _ in cases} == {
        (shape, target, geometry) for shape, _ in bench.WAN_CASES for target in bench.FRONTIER_SPARSITIES
        for geometry in ("keep 1.0", "keep 0.5")}
    assert len(cases) == 12 and not any(breakdown for *_, breakdown in cases)


def test_the_cuda_graph_lines_report_each_record_or_why_it_is_missing():
    graphed = {"bsa": {"fwd": 1.0, "fwd_bwd": 3.0, "cudagraph_skips": 0},
               "sdpa": {"fwd": 5.0, "fwd_bwd": 21.0, "cudagraph_skips": 1},
               "speedup_vs_sdpa_fwd": 5.0, "speedup_vs_sdpa_fwd_bwd": 7.0,
               "outside_kernel_fwd": 0.5, "outside_kernel_fwd_bwd": 0.4}
    rows = [{"tokens": 23296, "geometry": "keep 0.5", "kernel": "flash", "cuda_graphs": graphed},
            {"tokens": 153600, "geometry": "keep 1.0", "kernel": "flash", "cuda_graphs": {"error": "overwritten"}},
            {"tokens": 2048, "geometry": "keep 0.5", "kernel": "triton"}]
    ok, failed, blank = bench.cuda_graph_lines(rows)
    assert "23,296" in ok and "fwd+bwd 3.00 ms" in ok and "7.00x" in ok and "1 SDPA" in ok
    assert "153,600" in failed and "failed: overwritten" in failed
    assert blank == ""


def test_a_steps_peak_counts_its_inputs_and_its_rise_but_not_memory_held_before_it():
    gib = 2**30
    held_elsewhere, inputs, rise = 3 * gib, 2 * gib, gib // 2
    assert bench.step_peak_gib(held_elsewhere + inputs + rise, held_elsewhere + inputs, inputs) == 2.5
    assert bench.step_peak_gib(5 * gib, 5 * gib, 0) == 0.0


def test_the_crossover_lines_follow_the_first_measured_geometry_when_keep_half_was_not_run():
    rows = [{"tokens": tokens, "geometry": geometry, "kernel": "flash", "target_sparsity": 0.95,
             "speedup_vs_sdpa_fwd_bwd": speedup}
            for tokens, geometry, speedup in ((23296, "keep 0.25 local", 0.8), (153600, "keep 0.25 local", 17.0),
                                              (23296, "keep 0.25", 6.0), (153600, "keep 0.25", 18.0))]
    assert bench.sweep_geometry(rows) == "keep 0.25"
    assert bench.crossover_lines(rows) == [
        "- sparsity 0.95, flash: BSA beats SDPA (fwd+bwd, keep 0.25) at every measured length, from 23,296 tokens "
        "(6.00x)."]
