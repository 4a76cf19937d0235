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
    assert set(row["stages"]) >= {"select_ms", "block_mask_ms", "kernel_fwd", "rest_fwd_ms"}
    assert "| 256 |" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("argv", [["--sparsities", "x"], ["--sparsities", "1.5"], ["--device", "tpu"]])
def test_bad_command_line_exits_with_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err
