"""The bsa-flex command line: help, the demo, the pictures, and one-line errors."""
import sys

import pytest

from bsa_flex import cli


def test_help_names_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(f"bsa-flex {name}" in text for name in ("demo", "bench", "viz"))


def test_no_subcommand_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "SUBCOMMAND" in capsys.readouterr().out


def test_demo_reports_sparsity_time_and_error(capsys):
    assert cli.main(["demo", "--video", "4x8x8", "--heads", "2", "--head-dim", "16", "--cpu"]) == 0
    text = capsys.readouterr().out
    assert "256 tokens" in text and "sparsity" in text and "relative L2 error" in text


@pytest.mark.parametrize("argv, message", [
    (["demo", "--video", "4x8"], "T x H x W"),
    (["demo", "--keep", "1.5"], "(0, 1]"),
    (["demo", "--heads", "0"], "--heads must be a positive int"),
    (["viz", "--layers", "0"], "--layers must be a positive int"),
])
def test_bad_arguments_are_one_usage_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_viz_writes_three_pictures_and_no_warning(tmp_path, capsys, recwarn):
    """No warning a user cannot act on (its layers' q/k/v have other strides: an expected compile, logged)."""
    pytest.importorskip("matplotlib")
    assert cli.main(["viz", "--video", "4x16x16", "--heads", "2", "--head-dim", "16", "--layers", "3",
                     "--out", str(tmp_path)]) == 0
    names = {"kept_queries.png", "kv_blocks.png", "sparsity_per_layer.png"}
    assert {p.name for p in tmp_path.iterdir()} == names
    assert all((tmp_path / n).stat().st_size > 1000 for n in names)
    assert not [w for w in recwarn if "bsa_flex" in str(w.message)]


def test_viz_without_matplotlib_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["viz", "--video", "4x8x8", "--heads", "2", "--head-dim", "16", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("bsa-flex viz: error: bsa_flex.viz needs matplotlib: "
                                               "pip install 'bsa-flex[viz]'")


def test_bench_subcommand_is_the_benchmark_with_its_own_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["a_file", "a_file/below_it"])
def test_viz_to_an_unusable_folder_is_one_error_line(where, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    assert cli.main(["viz", "--out", str(tmp_path / where), "--video", "2x4x4", "--layers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bsa-flex viz: error:" in err and "Traceback" not in err

