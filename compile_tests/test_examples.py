"""The runnable examples: the DiT training script's CPU smoke run and its measurement helpers,
and the Ulysses example on two CPU processes."""
import dataclasses
import importlib.util
import json
import math
import pathlib
import shutil
import sys

import pytest
import torch
from einops import rearrange
from hypothesis import given, strategies as st

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


train = _load("train_video_dit")
dit = sys.modules["video_dit"]  # the pieces the training script imports


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return train.main(["--tiny", "--out", str(out)]), out


def test_tiny_training_writes_a_summary_with_both_arms(tiny_run):
    summary, out = tiny_run
    assert (out / "summary.json").exists()
    assert set(summary["final_val_loss"]) == {"full", "bsa"}
    assert all(math.isfinite(x) for x in summary["final_val_loss"].values())
    assert {env["card"] for env in summary["environment"].values()} == {"CPU"}


def test_both_arms_start_from_the_same_weights_data_and_noise(tiny_run):
    """Step 0 is dense in the BSA arm (warm-up), so both arms compute the same first loss."""
    curves = tiny_run[0]["curves"]
    assert curves["full"]["val"][0] == curves["bsa"]["val"][0]
    assert curves["full"]["train_loss"][0] == pytest.approx(curves["bsa"]["train_loss"][0], rel=1e-6)


def test_bsa_arm_ends_sparse_after_its_warm_up(tiny_run):
    summary = tiny_run[0]
    assert 0.3 < summary["bsa_final_sparsity_mean"] < 1.0
    first_logged = summary["curves"]["bsa"]["sparsity"][0]
    assert first_logged[0] == 0 and first_logged[1] == [0.0] * len(first_logged[1])  # dense warm-up


def _small_model():
    torch.manual_seed(0)
    return train.VideoDiT(4, (1, 2, 2), 32, 1, 2, None), train.make_clips([5], 4, 16, 16, 4, "cpu")


def test_sweep_keeping_everything_reproduces_full_attention_and_all_its_mass():
    model, clips = _small_model()
    (row,) = train.training_free_sweep(model, clips, 16, torch.float32, keeps=(1.0,), thresholds=(1.0,))
    assert row["rel_l2"] < 1e-5 and row["retained_mass"] == pytest.approx(1.0, abs=1e-5)
    assert row["sparsity"] == pytest.approx(0.0, abs=1e-6)


def test_sweep_pruning_retains_less_mass_and_errs_more():
    model, clips = _small_model()
    (dense,), (sparse,) = (train.training_free_sweep(model, clips, 16, torch.float32, keeps=(keep,),
                                                     thresholds=(p,)) for keep, p in ((1.0, 1.0), (0.5, 0.5)))
    assert sparse["retained_mass"] < dense["retained_mass"] and sparse["rel_l2"] > dense["rel_l2"]


def test_sweep_kv_oracle_mass_bounds_the_selected_mass_and_is_all_of_it_when_keeping_everything():
    model, clips = _small_model()
    (dense,), (sparse,) = (train.training_free_sweep(model, clips, 16, torch.float32, keeps=(keep,),
                                                     thresholds=(p,)) for keep, p in ((1.0, 1.0), (0.5, 0.3)))
    assert dense["kv_mass_selected"] == pytest.approx(1.0, abs=1e-5)
    assert dense["kv_mass_oracle"] == pytest.approx(1.0, abs=1e-5)
    assert sparse["kv_mass_selected"] <= sparse["kv_mass_oracle"] + 1e-6 < 1.0


def _layout_4x8x8():
    from masks import tile_layout
    return tile_layout((4, 8, 8), (4, 4, 4), (2, 2, 2), 16, torch.device("cpu"))  # 256 tokens, 16 KV blocks


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_time_shift_keeps_both_ends_and_the_order_and_moves_times_toward_noise_above_one(shift):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    moved = dit.shift_time(t, shift)
    assert moved[0] == 0 and moved[-1] == 1 and bool((moved.diff() > 0).all())
    assert torch.allclose(moved, t) if shift == 1.0 else bool(((moved > t) == (shift > 1))[1:-1].all())


@pytest.mark.parametrize("shift", [1.0, 4.0])
def test_the_sampler_integrates_a_straight_flow_to_its_data_end_whatever_the_shift(shift):
    data, noise = torch.randn(2, 1, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    straight = lambda x, t: noise - data  # noqa: E731  the velocity of x_t = (1 - t) data + t noise
    assert torch.allclose(dit.sample(straight, noise, 7, torch.float32, shift=shift), data, atol=1e-6)


def test_shifted_training_times_are_the_unshifted_draw_moved_toward_noise():
    noise, t = dit.step_noise(3, (64, 1), "cpu", salt=2)
    shifted_noise, shifted = dit.step_noise(3, (64, 1), "cpu", salt=2, shift=3.0)
    assert torch.equal(noise, shifted_noise) and torch.allclose(shifted, dit.shift_time(t, 3.0))
    assert float(shifted.mean()) > float(t.mean())


def test_top_kv_block_mass_of_uniform_attention_is_the_fraction_of_blocks_kept():
    q = torch.zeros(1, 2, 256, 8)
    mass = dit.top_kv_block_mass(q, torch.randn(1, 2, 256, 8), _layout_4x8x8(), 0.1, 1.0)
    assert mass == pytest.approx(2 / 16, abs=1e-6)  # ceil(0.1 * 16) = 2 of 16 equal blocks


def test_top_kv_block_mass_is_all_of_it_when_every_token_attends_to_itself():
    q = torch.randn(1, 2, 256, 64, generator=torch.Generator().manual_seed(0)) * 4
    assert dit.top_kv_block_mass(q, q, _layout_4x8x8(), 0.1, 1.0) == pytest.approx(1.0, abs=1e-4)


def test_concentration_reports_every_layer_and_flow_time_within_the_unit_interval():
    model, clips = _small_model()
    rows = dit.concentration(model, clips, 16, torch.float32, times=(0.2, 0.9))
    assert [(r["layer"], r["flow_time"]) for r in rows] == [(0, 0.2), (0, 0.9)]
    assert all(2 / 16 - 1e-6 <= r["top_kv_block_mass"] <= 1 + 1e-6 for r in rows)


@pytest.mark.parametrize("scene", ["textured", "plain", "sprites", "sprites_striped"])
def test_clips_are_deterministic_per_seed_and_differ_across_seeds(scene):
    a, b, c = (train.make_clips([s], 4, 16, 16, 4, "cpu", scene=scene) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.shape == (1, 4, 4, 16, 16) and abs(float(a.std()) - 1.0) < 0.1


@pytest.mark.parametrize("argv", [["--tiny", "--steps", "1"], ["--tiny", "--final-keep", "0"],
                                  ["--tiny", "--warmup", "0.8", "--ramp", "0.5"],
                                  ["--tiny", "--latent", "4", "15", "16"]])
def test_bad_arguments_exit_with_a_usage_error(argv):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2


def test_summarize_rebuilds_summary_and_pictures_from_the_arm_files(tiny_run):
    pytest.importorskip("matplotlib")
    summary, out = tiny_run
    for name in ("summary.json", "loss.png", "samples.png"):
        (out / name).unlink()
    again = train.main(["--tiny", "--summarize", "--out", str(out)])
    assert again["final_val_loss"] == summary["final_val_loss"]
    assert (out / "loss.png").stat().st_size > 1000 and (out / "samples.png").stat().st_size > 1000


def test_arms_trained_one_at_a_time_give_the_same_result_as_both_together(tiny_run, tmp_path):
    summary, _ = tiny_run
    assert train.main(["--tiny", "--arm", "full", "--out", str(tmp_path)]) is None  # no summary yet
    separate = train.main(["--tiny", "--arm", "bsa", "--out", str(tmp_path)])
    for arm in ("full", "bsa"):
        assert separate["final_val_loss"][arm] == pytest.approx(summary["final_val_loss"][arm], rel=1e-6)
    assert separate["step_times_comparable"]  # both on this CPU


def test_summarize_without_an_arm_names_the_missing_file(tmp_path):
    with pytest.raises(SystemExit, match="arm_full.json is missing"):
        train.main(["--tiny", "--summarize", "--out", str(tmp_path)])


def test_summarize_says_which_samples_are_missing_and_still_writes_the_summary(tiny_run, tmp_path):
    summary, out = tiny_run
    for name in ("arm_full.json", "arm_bsa.json", "samples_full.pt"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    again = train.main(["--tiny", "--summarize", "--out", str(tmp_path)])
    assert again["final_val_loss"] == summary["final_val_loss"]
    assert any("samples_bsa.pt is missing" in note for note in again["notes"])


@pytest.mark.parametrize("ranks,video,compiled", [(2, ("4", "8", "16"), True), (3, ("3", "8", "16"), False)],
                         ids=["2_ranks_compiled", "3_ranks_sharing_4_heads"])
def test_ulysses_example_on_cpu_processes_matches_one_process(tmp_path, ranks, video, compiled):
    """examples/ulysses.py as the README runs it, small: gloo ranks (3 share 4 heads), checks and timings."""
    import os
    import subprocess
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               str(ROOT / "examples" / "ulysses.py"), "--video", *video, "--heads", "4", "--dim", "16",
               "--head-chunks", "1", *(["--compile"] if compiled else [])]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "ulysses.json").read_text())
    assert saved["world_size"] == ranks and len(saved["rows"]) == ranks and saved["attention_imbalance"] >= 1.0
    for row in saved["rows"]:
        for name in ("ulysses vs one process", "compiled vs eager ulysses")[:2 if compiled else 1]:
            check = row["checks"][name]
            assert check["tokens_choosing_otherwise"] == 0
            assert check["max_abs_error"] < 1e-5 and check["max_abs_grad_error"] < 1e-5


def test_the_readme_example_runs_as_pasted_on_cpu(capsys):
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(block, "README.md", "exec"), {})
    sparsity, kernel = capsys.readouterr().out.splitlines()[0].split()
    assert 0.0 < float(sparsity) < 1.0 and kernel == "flex_cpu"


def test_quickstart_prints_its_kernel_sparsity_and_distance(capsys):
    import runpy
    argv = sys.argv
    sys.argv = ["quickstart.py"]
    try:
        runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    finally:
        sys.argv = argv
    text = capsys.readouterr().out
    assert "kernel flex_cpu" in text and "sparsity" in text and "relative L2 distance" in text


def test_the_testing_modules_example_passes_as_a_test_file_of_a_fresh_project(tmp_path):
    """Copied as is, with hypothesis' default settings (no conftest, no profile of ours)."""
    import subprocess
    import bsa_flex.testing
    example = "\n".join(line[4:] for line in bsa_flex.testing.__doc__.split("\n\n", 1)[1].splitlines())
    (tmp_path / "test_mine.py").write_text(example)
    env = {k: v for k, v in __import__("os").environ.items() if k != "BSA_HYPOTHESIS_PROFILE"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_mine.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "1 passed" in run.stdout


def test_the_fine_tune_frontier_runs_end_to_end_on_cpu_and_writes_its_rows(tmp_path):
    """pretrain -> finetune (a dense and a bidirectional arm, two seeds) -> summarize: one fine-tune row
    with the issue's fields, its seeds, a gap measured against the dense arm, and the scratch rows."""
    frontier = _load("finetune_frontier")
    out, results = tmp_path / "run", tmp_path / "results"
    frontier.main(["pretrain", "--tiny", "--scene", "plain", "--out", str(out)])
    for seed in ("0", "1"):
        frontier.main(["finetune", "--tiny", "--out", str(out), "--seed", seed, "--arms", "dense,bsa_0.93"])
    frontier.main(["summarize", "--out", str(out), "--results", str(results),
                   "--scratch", str(ROOT / "benchmarks" / "results" / "train_video_dit_h200")])
    rows = json.loads((results / "quality_frontier.json").read_text())["rows"]
    fine = [r for r in rows if r["regime"] == "fine-tune"]
    assert [r["arm"] for r in fine] == ["bsa_0.93"] and fine[0]["seeds"] == [0, 1]
    assert set(fine[0]) >= {"query_keep_ratio", "fill", "windows", "total_sparsity", "val_loss_mean", "val_loss_std",
                            "dense_val_loss_mean", "dense_val_loss_std", "gap", "speedup_23296", "speedup_153600"}
    assert fine[0]["gap"] == pytest.approx(fine[0]["val_loss_mean"] / fine[0]["dense_val_loss_mean"] - 1)
    assert {r["regime"] for r in rows} == {"fine-tune", "scratch"}
    arms = json.loads((out / "arms_seed1.json").read_text())
    assert arms["setting"]["scene"] == "plain"  # the arms continue on the checkpoint's data


def test_checkpoint_concentration_is_recorded_at_pretraining_and_measured_again_the_same(tmp_path):
    frontier = _load("finetune_frontier")
    frontier.main(["pretrain", "--tiny", "--scene", "sprites", "--out", str(tmp_path)])
    recorded = json.loads((tmp_path / "pretrain.json").read_text())["concentration"]
    frontier.main(["concentration", "--tiny", "--out", str(tmp_path)])
    again = json.loads((tmp_path / "concentration.json").read_text())
    assert again["mean"] == pytest.approx(recorded["mean"], rel=1e-5)
    assert len(recorded["rows"]) == 2 * 3  # the tiny setting's layers x three flow times


def test_each_fine_tune_arm_builds_its_layers_with_its_own_fill_rule():
    frontier = _load("finetune_frontier")
    for arm in frontier.ARMS:
        model = frontier.build_model(frontier.SETTINGS["tiny"], "cpu", arm.fill)
        assert {layer.sparsity.bsa.fill for layer in model.attention_layers} == {arm.fill}


def test_a_budget_arm_caps_every_layer_at_its_share_of_the_kv_blocks_and_the_others_at_none():
    frontier = _load("finetune_frontier")
    setting = frontier.SETTINGS["gpu"]  # 64 KV blocks
    caps = {arm.name: {layer.sparsity.bsa.kv_block_cap(64) for layer in frontier.build_model(
                setting, "cpu", arm.fill, kv_budget=arm.kv_budget).attention_layers}
            for arm in frontier.ARMS if arm.name in ("kv_0.90", "kv_0.90_budget", "kv_0.93_budget", "bsa_0.93_budget")}
    assert caps == {"kv_0.90": {None}, "kv_0.90_budget": {6}, "kv_0.93_budget": {4}, "bsa_0.93_budget": {9}}


def test_the_training_examples_gpu_preset_caps_at_12_of_its_128_kv_blocks():
    from bsa_flex import BSAConfig
    args = train.parse_args(["--out", "unused"])
    tokens = math.prod(n // p for n, p in zip(args.latent, args.patch))
    assert tokens // args.block_size == 128 and args.max_kv_blocks is None
    assert BSAConfig(kv_budget=args.kv_budget).kv_block_cap(128) == 12


def test_a_budget_ramp_arm_starts_uncapped_and_ends_at_its_budget_in_every_layer():
    frontier = _load("finetune_frontier")
    arm = next(a for a in frontier.ARMS if a.name == "kv_0.93_budget_ramp")
    model = frontier.build_model(frontier.SETTINGS["tiny"], "cpu", arm.fill)
    schedule = frontier.schedule_for(arm, 0.9, 300)
    for step, budget in ((0, 1.0), (10**6, 4 / 64)):
        schedule.apply(model.attention_layers, step)
        assert {layer.config.kv_budget for layer in model.attention_layers} == {budget}
        assert {layer.config.max_kv_blocks for layer in model.attention_layers} == {None}


def test_pre_training_with_a_weights_average_of_decay_one_ends_on_the_initial_weights():
    frontier = _load("finetune_frontier")
    setting = frontier.SETTINGS["tiny"]
    torch.manual_seed(0)
    model = frontier.build_model(setting, "cpu")
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    frontier.train_steps(model, setting, 2, 1e-2, seed=0, ema=1.0)
    assert all(torch.equal(p, initial[name]) for name, p in model.named_parameters())
    frontier.train_steps(model, setting, 2, 1e-2, seed=0)
    assert not all(torch.equal(p, initial[name]) for name, p in model.named_parameters())


def test_pre_training_with_a_weights_average_of_decay_zero_ends_on_the_last_weights():
    frontier = _load("finetune_frontier")
    setting = frontier.SETTINGS["tiny"]
    ends = []
    for ema in (None, 0.0):
        torch.manual_seed(0)
        model = frontier.build_model(setting, "cpu")
        frontier.train_steps(model, setting, 2, 1e-2, seed=0, ema=ema)
        ends.append(dict(model.named_parameters()))
    assert all(torch.equal(p, ends[1][name]) for name, p in ends[0].items())


def test_a_fine_tune_record_holds_the_validation_loss_at_each_flow_time_and_their_mean():
    frontier = _load("finetune_frontier")
    setting = frontier.SETTINGS["tiny"]
    torch.manual_seed(0)
    model = frontier.build_model(setting, "cpu")
    clips = frontier.validation_clips(setting, "cpu")
    record = frontier.validation_record(model, clips, torch.float32)
    assert len(record["val_loss_by_time"]) == len(dit.VALIDATION_TIMES) == 8
    assert record["val_loss"] == dit.validation_loss(model, clips, torch.float32)
    assert record["val_loss"] == pytest.approx(sum(record["val_loss_by_time"]) / 8)


def test_training_free_rows_start_with_dense_at_the_checkpoints_loss_and_give_each_arm_its_losses_by_time(tmp_path):
    frontier = _load("finetune_frontier")
    frontier.main(["pretrain", "--tiny", "--out", str(tmp_path)])
    frontier.main(["training-free", "--tiny", "--out", str(tmp_path), "--arms", "kv_0.90,dense,bsa_0.93"])
    record = json.loads((tmp_path / "training_free.json").read_text())
    pretrained = json.loads((tmp_path / "pretrain.json").read_text())
    assert [r["arm"] for r in record["rows"]] == ["dense", "kv_0.90", "bsa_0.93"]
    assert record["rows"][0]["val_loss"] == pytest.approx(pretrained["val_loss"], rel=1e-6)
    for row in record["rows"]:
        assert len(row["val_loss_by_time"]) == len(record["validation_times"]) == 8
        assert row["val_loss"] == pytest.approx(sum(row["val_loss_by_time"]) / 8)
        assert (row["sparsity"] > 0.0) == (row["arm"] != "dense")


def test_a_frontier_row_gives_the_gap_at_each_flow_time_where_its_records_have_losses_by_time():
    frontier = _load("finetune_frontier")
    arm = {"name": "kv_0.90", "keep": 1.0, "target": 0.9, "fill": "most_similar", "windows": []}
    dense_arm = {**arm, "name": "dense", "keep": None}

    def record(a, seed, by_time):
        return {"arm": a, "run": a["name"], "finetune_steps": 4, "seed": seed, "sparsity_at_end": 0.9,
                "val_loss": sum(by_time) / len(by_time), "val_loss_by_time": by_time}

    records = [record(dense_arm, 0, [1.0, 2.0]), record(dense_arm, 1, [3.0, 2.0]),
               record(arm, 0, [2.0, 2.0]), record(arm, 1, [4.0, 4.0])]
    row, = frontier.frontier_rows(records, {})
    assert row["gap_by_time"] == pytest.approx([3.0 / 2.0 - 1, 3.0 / 2.0 - 1])
    older = [{k: v for k, v in r.items() if k != "val_loss_by_time"} if r["seed"] == 1 else r for r in records]
    assert frontier.frontier_rows(older, {})[0]["gap_by_time"] is None


def test_arms_run_in_the_order_given(tmp_path):
    frontier = _load("finetune_frontier")
    frontier.main(["pretrain", "--tiny", "--out", str(tmp_path)])
    frontier.main(["finetune", "--tiny", "--out", str(tmp_path), "--arms", "kv_0.90,dense"])
    records = json.loads((tmp_path / "arms_seed0.json").read_text())["records"]
    assert [r["run"] for r in records] == ["kv_0.90", "dense"]


def test_a_frontier_of_several_checkpoints_compares_each_arm_with_its_own_dense_arm(tmp_path):
    frontier = _load("finetune_frontier")
    results = ROOT / "benchmarks" / "results"
    folders = [results / "frontier_2026-12-05_sprites", results / "frontier_2026-12-03_plain"]
    summary = frontier.summarize(",".join(map(str, folders)), "", str(tmp_path / "no_scratch_runs"), str(tmp_path))
    for folder in folders:
        dense = [r["val_loss"] for r in summary["records"]
                 if r["checkpoint"] == folder.name and r["arm"]["keep"] is None]
        rows = [r for r in summary["rows"] if r["checkpoint"] == folder.name]
        assert len(dense) == 3 and rows
        assert all(r["dense_val_loss_mean"] == pytest.approx(sum(dense) / 3) for r in rows)
    assert [c["checkpoint"] for c in summary["checkpoints"]] == [f.name for f in folders]


def test_summarize_of_several_checkpoints_creates_no_folder_named_after_the_list(tmp_path):
    frontier = _load("finetune_frontier")
    results = ROOT / "benchmarks" / "results"
    folders = [tmp_path / "sprites", tmp_path / "plain"]
    for source, folder in zip(("frontier_2026-12-05_sprites", "frontier_2026-12-03_plain"), folders):
        folder.mkdir()
        for path in (results / source).glob("*.json"):
            shutil.copy(path, folder)
    listed = ",".join(map(str, folders))
    frontier.main(["summarize", "--out", listed, "--bench", "", "--results", str(tmp_path / "summary"),
                   "--scratch", str(tmp_path / "no_scratch_runs")])
    assert (tmp_path / "summary" / "quality_frontier.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "sprites", "summary"]


def test_an_arms_file_with_a_run_recorded_twice_is_refused_naming_the_run(tmp_path):
    frontier = _load("finetune_frontier")
    saved = json.loads((ROOT / "benchmarks" / "results" / "frontier_2026-12-05_sprites" / "arms_seed0.json").read_text())
    saved["records"].append(saved["records"][-1])
    path = tmp_path / "arms_seed0.json"
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=f"run\\(s\\) \\['{saved['records'][-1]['arm']['name']}'\\]"):
        frontier.load_arms_file(str(path))


@pytest.mark.parametrize("argv, flag", [(["training-free", "--clips", "0"], "--clips"),
                                        (["training-free", "--clips", "5"], "--clips"),
                                        (["finetune", "--arms", "dense,nope"], "--arms"),
                                        (["pretrain", "--time-shift", "0"], "--time-shift")])
def test_fine_tune_frontier_refuses_a_bad_argument_naming_it(argv, flag, tmp_path, capsys):
    frontier = _load("finetune_frontier")
    with pytest.raises(SystemExit) as exit_info:
        frontier.main([*argv, "--tiny", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("command, flag", [("pretrain", "--pretrain-steps"), ("finetune", "--finetune-steps")])
@pytest.mark.parametrize("steps", ["0", "-5"])
def test_fine_tune_frontier_refuses_a_run_of_no_steps_naming_the_flag(command, flag, steps, tmp_path, capsys):
    frontier = _load("finetune_frontier")
    with pytest.raises(SystemExit) as exit_info:
        frontier.main([command, "--tiny", flag, steps, "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


def test_a_longer_fine_tune_is_a_run_of_its_own_compared_with_the_dense_arm_of_its_length(tmp_path):
    frontier = _load("finetune_frontier")
    out, results = tmp_path / "run", tmp_path / "results"
    frontier.main(["pretrain", "--tiny", "--out", str(out)])
    for extra in ([], ["--finetune-steps", "6"]):
        frontier.main(["finetune", "--tiny", "--out", str(out), "--arms", "dense,kv_0.90", *extra])
    summary = frontier.summarize(str(out), "", str(tmp_path / "no_scratch_runs"), str(results))
    rows = {r["arm"]: r for r in summary["rows"]}
    assert {name: r["finetune_steps"] for name, r in rows.items()} == {"kv_0.90": 4, "kv_0.90_6steps": 6}
    dense = {r["finetune_steps"]: r["val_loss"] for r in summary["records"] if r["arm"]["keep"] is None}
    assert sorted(dense) == [4, 6] and dense[4] != dense[6]
    for r in rows.values():
        assert r["dense_val_loss_mean"] == dense[r["finetune_steps"]]


def test_records_written_before_run_labels_summarize_to_the_gaps_recorded_then(tmp_path):
    """The plain-scene records, written before runs had labels, and their rows in the top-level
    quality_frontier.json."""
    frontier = _load("finetune_frontier")
    folder = ROOT / "benchmarks" / "results" / "frontier_2026-12-03_plain"
    recorded = {r["arm"]: r["gap"] for r in json.loads((folder.parent / "quality_frontier.json").read_text())["rows"]
                if r.get("checkpoint") == folder.name}
    summary = frontier.summarize(str(folder), "", str(tmp_path / "no_scratch_runs"), str(tmp_path))
    assert {r["arm"]: r["gap"] for r in summary["rows"]} == pytest.approx(recorded)
    assert {r["finetune_steps"] for r in summary["rows"]} == {300}


def test_the_gpu_settings_defaults_pretrain_the_recorded_shifted_checkpoints_recipe():
    """`pretrain` without flags reproduces the setting of the checkpoint the latest GPU arms ran on."""
    frontier = _load("finetune_frontier")
    folder = ROOT / "benchmarks" / "results" / "frontier_2026-12-06_shift3b"
    assert frontier.checkpoint_setting(str(folder)) == frontier.SETTINGS["gpu"]


def test_a_checkpoint_recorded_before_the_learning_rate_decay_reads_back_as_constant_rate(tmp_path):
    frontier = _load("finetune_frontier")
    fields = dataclasses.asdict(frontier.SETTINGS["tiny"])
    del fields["pretrain_lr_final"], fields["time_shift"], fields["registers"]
    (tmp_path / "pretrain.json").write_text(json.dumps({"setting": fields}))
    assert frontier.checkpoint_setting(str(tmp_path)).pretrain_lr_final is None
    assert frontier.checkpoint_setting(str(tmp_path)).time_shift == 1.0
    assert frontier.checkpoint_setting(str(tmp_path)).registers == 0
    assert frontier.SETTINGS["gpu"].pretrain_lr_final == frontier.SETTINGS["gpu"].finetune_lr


def test_an_arm_with_per_layer_keep_ratios_prunes_queries_in_those_layers_only_and_has_no_bench_split():
    frontier = _load("finetune_frontier")
    arm = frontier.Arm("mixed", 1.0, 0.9, layer_keep=((1, 0.5),))
    model = frontier.build_model(frontier.SETTINGS["tiny"], "cpu")
    settings = frontier.schedule_for(arm, 0.6, 10).apply(model.attention_layers, 10**6)
    assert [s.keep_ratio for s in settings] == [1.0, 0.5]
    speedups = {(tokens, 1.0, None, 0.9): (5.0, "bench.json") for tokens in (23296, 153600)}
    assert frontier.split_speedups(dataclasses.asdict(arm), speedups) == ((None, None), (None, None))
    plain = dataclasses.asdict(frontier.Arm("kv", 1.0, 0.9))
    assert frontier.split_speedups(plain, speedups) == ((5.0, "bench.json"),) * 2


def test_a_local_fill_arm_takes_the_speed_up_of_the_bench_rows_with_local_rows_and_the_others_not(tmp_path):
    frontier = _load("finetune_frontier")
    row = {"tokens": 153600, "query_keep_ratio": 0.5, "target_sparsity": 0.93, "kernel": "flash"}
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": [{**row, "speedup_vs_sdpa_fwd_bwd": 12.0},  # written before fills were
                                          {**row, "fill": "local", "speedup_vs_sdpa_fwd_bwd": 11.0}]}))
    speedups = frontier.bench_speedups([str(bench)])
    local = dataclasses.asdict(next(a for a in frontier.ARMS if a.name == "bsa_0.93_local_budget8"))
    copy = dataclasses.asdict(next(a for a in frontier.ARMS if a.name == "bsa_0.93_budget"))
    assert frontier.split_speedups(local, speedups)[1] == (11.0, "bench.json (flash)")
    assert frontier.split_speedups(copy, speedups)[1] == (12.0, "bench.json (flash)")
    extra = dataclasses.asdict(next(a for a in frontier.ARMS if a.name == "bsa_0.93_local_extra2_budget6"))
    assert frontier.split_speedups(extra, speedups)[1] == (None, None)  # no bench row has local rows with extras


def test_a_flow_time_split_arm_takes_its_groups_sparsities_and_the_sampler_weighted_speed_up():
    frontier = _load("finetune_frontier")
    arm = next(a for a in frontier.ARMS if a.name == "split_0.93_budget")
    low, high = frontier.group_arms(arm)
    assert (low.keep, low.kv_budget, high.keep, high.kv_budget) == (1.0, 4 / 64, 0.25, 18 / 64)
    model = frontier.build_model(frontier.SETTINGS["tiny"], "cpu", arm.fill)
    split = frontier.FlowTimeSplit((0.75,), tuple(frontier.schedule_for(g, 0.6, 10, budget_in_schedule=True)
                                                   for g in (low, high)))
    at_time = frontier.setter_by_time(split, model.attention_layers, 10**6)
    for t, keep, budget in ((0.5, 8, 4 / 64), (0.9, 2, 18 / 64)):
        at_time(t)
        assert {(layer.config.keep_per_window, layer.config.kv_budget) for layer in model.attention_layers} == {
            (keep, budget)}
    speedups = {(tokens, keep, None, 0.93): (s, "bench.json") for tokens in (23296, 153600)
                for keep, s in ((1.0, 10.0), (0.25, 20.0))}
    (small, _), (large, source) = frontier.split_speedups(dataclasses.asdict(arm), speedups, time_shift=3.0)
    assert small == large == pytest.approx(1 / (0.5 / 10.0 + 0.5 / 20.0))  # shift 3: half the steps at t >= 0.75
    assert "keep 0.25 on 50% of the steps" in source


def test_a_flow_time_split_arm_fine_tunes_and_is_validated_group_by_group(tmp_path):
    frontier = _load("finetune_frontier")
    frontier.main(["pretrain", "--tiny", "--out", str(tmp_path)])
    frontier.main(["finetune", "--tiny", "--out", str(tmp_path), "--arms", "split_0.93_budget"])
    record, = json.loads((tmp_path / "arms_seed0.json").read_text())["records"]
    low, high = record["sparsity_at_end_by_group"]
    assert len(record["kv_threshold"]) == 2 and 0.5 < low < 1.0 and 0.5 < high < 1.0
    assert record["sparsity_at_end"] == pytest.approx((low + high) / 2)


def test_a_batch_run_once_per_group_of_rows_gets_the_gradient_of_one_run_over_all_rows():
    torch.manual_seed(0)
    model = train.VideoDiT(4, (1, 2, 2), 32, 1, 2, None)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    clean, noise, t = train.make_clips([1, 2, 3], 4, 8, 8, 4, "cpu"), torch.randn(3, 4, 4, 8, 8), torch.rand(3)
    grads = []
    for groups in (None, [(None, torch.tensor([True, False, True])), (None, torch.tensor([False, True, False]))]):
        optimiser = torch.optim.SGD(model.parameters(), lr=0.0)
        loss = train.train_step(model, optimiser, clean, noise, t, torch.float32, groups=groups)
        grads.append((loss, [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == pytest.approx(float(grads[1][0]), rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads[0][1], grads[1][1]))


def test_tiny_with_another_setting_is_a_usage_error(capsys):
    frontier = _load("finetune_frontier")
    with pytest.raises(SystemExit):
        frontier.main(["pretrain", "--tiny", "--setting", "cpu", "--out", "unused"])
    assert "cannot go with --setting cpu" in capsys.readouterr().err


def test_the_per_layer_keep_arms_refuse_a_model_without_their_layers():
    frontier = _load("finetune_frontier")
    model = frontier.build_model(frontier.SETTINGS["tiny"], "cpu")  # two layers; the arms name layer 3
    arm = next(a for a in frontier.ARMS if a.name == "kv_0.90_q13")
    with pytest.raises(ValueError, match="layer_overrides names layers"):
        frontier.schedule_for(arm, 0.6, 10).apply(model.attention_layers, 0)


def _model_with_registers(registers: int):
    """One BSA layer capped at one KV block of 16 (256 video tokens), every weight random (no zero init)."""
    from bsa_flex import BSAConfig
    torch.manual_seed(0)
    model = train.VideoDiT(4, (1, 2, 2), 32, 1, 2, BSAConfig(block_size=16, kv_budget=1 / 16), registers=registers)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model, train.make_clips([5], 4, 16, 16, 4, "cpu")


def test_registers_reach_every_video_token_under_bsa_and_the_output_is_the_video_only():
    model, clips = _model_with_registers(4)
    t = torch.tensor([0.7])
    with torch.no_grad():
        out = model(clips, t)
        model.registers.add_(torch.randn(model.registers.shape, generator=torch.Generator().manual_seed(1)))
        moved = model(clips, t)
    assert out.shape == clips.shape
    per_token = rearrange((moved - out).abs(), "n c t (h a) (w b) -> n t h w (c a b)", a=2, b=2).sum(-1)
    assert bool((per_token > 0).all())  # each token read the registers besides its selected KV blocks


def test_a_model_with_registers_starts_from_the_weights_of_the_same_model_without():
    torch.manual_seed(0)
    plain = train.VideoDiT(4, (1, 2, 2), 32, 2, 2, None)
    torch.manual_seed(0)
    with_registers = train.VideoDiT(4, (1, 2, 2), 32, 2, 2, None, registers=3)
    weights = with_registers.state_dict()
    assert weights.pop("registers").shape == (3, 32)
    assert all(torch.equal(weights[name], value) for name, value in plain.state_dict().items())


@pytest.mark.parametrize("registers", [-1, 2.0])
def test_a_register_count_that_is_not_a_non_negative_int_is_refused_by_name(registers):
    with pytest.raises(ValueError, match="registers must be an int >= 0"):
        train.VideoDiT(4, (1, 2, 2), 32, 1, 2, None, registers=registers)


def test_the_captured_attention_inputs_of_a_model_with_registers_are_its_video_tokens():
    model, clips = _model_with_registers(4)
    ((q, k, v, video_shape),) = dit.captured_qkv(model, clips, 0.5, torch.float32)
    assert video_shape == (4, 8, 8) and q.shape[2] == k.shape[2] == v.shape[2] == 256


def test_a_checkpoint_pre_trained_with_registers_keeps_them_through_its_arms(tmp_path):
    frontier = _load("finetune_frontier")
    frontier.main(["pretrain", "--tiny", "--registers", "3", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "pretrain.json").read_text())["setting"]["registers"] == 3
    assert torch.load(tmp_path / "dense.pt")["registers"].shape == (3, frontier.SETTINGS["tiny"].width)
    frontier.main(["finetune", "--tiny", "--out", str(tmp_path), "--arms", "dense,kv_0.93"])
    records = json.loads((tmp_path / "arms_seed0.json").read_text())["records"]
    assert 0.5 < records[1]["sparsity_at_end"] < 1.0
    summary = frontier.summarize(str(tmp_path), "", str(tmp_path / "no_scratch_runs"), str(tmp_path / "results"))
    (row,) = summary["rows"]
    assert (row["registers"], row["tokens"]) == (3, 4 * 8 * 8)
    with pytest.raises(SystemExit):
        frontier.main(["pretrain", "--tiny", "--registers", "-1", "--out", str(tmp_path)])


def test_a_fully_distilling_loss_is_zero_when_the_teacher_is_the_model_itself():
    torch.manual_seed(0)
    model = dit.VideoDiT(4, (1, 2, 2), 32, 1, 2, None)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)  # no zero-initialised output layer: the velocity is not 0
    clean, noise, t = dit.make_clips([1, 2], 4, 8, 8, 4, "cpu"), torch.randn(2, 4, 4, 8, 8), torch.rand(2)
    with torch.no_grad():
        assert float(dit.flow_loss(model, clean, noise, t, teacher=model, distill=1.0)) == 0.0
        assert float(dit.flow_loss(model, clean, noise, t)) > 0.0


def test_a_distilling_loss_fits_the_mix_of_the_datas_and_the_teachers_velocity():
    torch.manual_seed(0)
    student, teacher = dit.VideoDiT(4, (1, 2, 2), 32, 1, 2, None), dit.VideoDiT(4, (1, 2, 2), 32, 1, 2, None)
    for p in [*student.parameters(), *teacher.parameters()]:
        torch.nn.init.normal_(p, std=0.1)
    clean, noise, t = dit.make_clips([1, 2], 4, 8, 8, 4, "cpu"), torch.randn(2, 4, 4, 8, 8), torch.rand(2)
    noisy = (1 - t[:, None, None, None, None]) * clean + t[:, None, None, None, None] * noise
    with torch.no_grad():
        target = 0.7 * (noise - clean) + 0.3 * teacher(noisy, t)
        expected = torch.nn.functional.mse_loss(student(noisy, t), target)
    loss = dit.flow_loss(student, clean, noise, t, teacher=teacher, distill=0.3)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_a_distilling_arm_fine_tunes_from_the_checkpoint_as_its_teacher(tmp_path):
    frontier = _load("finetune_frontier")
    frontier.main(["pretrain", "--tiny", "--out", str(tmp_path)])
    frontier.main(["finetune", "--tiny", "--out", str(tmp_path), "--arms", "bsa_0.93_budget_distill"])
    record, = json.loads((tmp_path / "arms_seed0.json").read_text())["records"]
    assert record["arm"]["distill"] == 1.0 and math.isfinite(record["val_loss"])
    row, = frontier.frontier_rows([record], {})
    assert row["distill"] == 1.0


@given(t=st.floats(0.0, 1.0), shift=st.floats(0.5, 8.0))
def test_unshift_time_returns_the_time_that_shift_time_moved(t, shift):
    assert dit.unshift_time(dit.shift_time(t, shift), shift) == pytest.approx(t, abs=1e-12)
