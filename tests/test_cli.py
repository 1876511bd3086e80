"""Every command's flags as a user types them: no prefix of a flag is taken for the flag.

With argparse's default allow_abbrev, `run_h_pylori.sh ... --val 0.3` audited the default split while train.py
trained on --val-frac 0.3, and `--epoch 1` passed for `--epochs`. Each case below gives the command arguments that
would fail fast *after* parsing (a missing data root, a missing checkpoint...), so that code which still accepted the
prefix fails this test at once with another message rather than running.
"""
import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import common

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/HelicoDataSet"

# command -> (arguments before the abbreviation, the abbreviation and its value); {tmp} is the test's folder
ABBREVIATED = {
    "train --val": ("train", ["--data-root", MISSING], ["--val", "0.3"]),  # --val-frac
    "train --epoch": ("train", ["--data-root", MISSING], ["--epoch", "1"]),  # --epochs
    "audit_leakage --val": ("audit_leakage", ["--data-root", MISSING], ["--val", "0.3"]),  # --val-frac
    "evaluate --hold": ("evaluate", ["--checkpoint", "{tmp}/best.pt"], ["--hold"]),  # --holdout
    "bench --min": ("bench", ["--data-root", MISSING], ["--min", "0"]),  # --min-seconds
    "make_demo_data --see": ("make_demo_data", ["{tmp}/file/demo"], ["--see", "1"]),  # --seed
    "patch_cache --norm": ("patch_cache", ["--data-root", MISSING, "--out", "{tmp}/cache"], ["--norm"]),  # --normalized
    "stain --ref": ("stain", [MISSING, "{tmp}/out"], ["--ref", "{tmp}/x.png"]),  # --reference-patch
    "stain_check --mode": ("stain_check", [], ["--mode", "bogus"]),  # --modes (which would reject the value)
    "train_patient --epoch": ("train_patient", ["--checkpoint", "{tmp}/best.pt"], ["--epoch", "1"]),  # --epochs
    "bench_patient --train": ("bench_patient", ["--checkpoint", "{tmp}/best.pt"], ["--train", "1"]),  # --train-bags
    "gpu_check --stage": ("gpu_check", ["--data-root", MISSING], ["--stage", "resume"]),  # --stages
    "bench_startup --meas": ("bench_startup", ["--root", MISSING], ["--meas", "audit_again"]),  # --measures
    "predict --evid": ("predict", ["--checkpoint", "{tmp}/best.pt", "--input", MISSING], ["--evid", "1"]),  # --evidence
}


@pytest.mark.parametrize("case", list(ABBREVIATED))
def test_an_abbreviated_flag_exits_2_naming_it(case, tmp_path, capsys):
    command, before, abbreviated = ABBREVIATED[case]
    (tmp_path / "file").write_text("")  # make_demo_data: an OUT_DIR it cannot create
    argv = [a.replace("{tmp}", str(tmp_path)) for a in before + abbreviated]
    main = importlib.import_module(command).main
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == common.EXIT_BAD_INPUT, err
    assert f"error: unrecognized arguments: {' '.join(argv[len(before):])}" in err, err


def test_train_val_abbreviation_is_refused_as_the_launcher_runs_it(tmp_path):
    """The mistyped command line, in its own process: exit 2 before any data is read."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data-root", MISSING, "--runs-dir", str(tmp_path),
                        "--val", "0.3"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == common.EXIT_BAD_INPUT, r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("error: unrecognized arguments: --val 0.3"), r.stderr
    assert not any(tmp_path.iterdir())


def test_gpu_check_without_cuda_exits_2_at_once_in_one_line(capsys, tmp_path, monkeypatch):
    import torch
    import gpu_check
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only node, wherever the suite runs
    assert gpu_check.main(["--json", str(tmp_path / "out.json")]) == common.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs CUDA and no GPU is visible to this process" in err
    assert not (tmp_path / "out.json").exists()
    assert gpu_check.main(["--stages", "resume,warp"]) == common.EXIT_BAD_INPUT
    assert "--stages resume,warp: unknown warp" in capsys.readouterr().err


COMMANDS = ("train", "train_patient", "evaluate", "predict", "audit_leakage", "stain", "patch_cache", "make_demo_data", "bench",
            "bench_patient", "bench_startup", "gpu_check", "stain_check")
WITH_DEVICE = ("train", "train_patient", "evaluate", "predict", "stain", "patch_cache", "bench", "bench_patient", "gpu_check",
               "audit_leakage")  # the audit accepts train.py's flags, unlisted


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_shows_every_default_and_one_device_and_amp_flag(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # one line per flag: a default is never split by the wrapping
    parser = importlib.import_module(command).get_args_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.help != argparse.SUPPRESS and action.default not in (None, False,
                                                                                                  argparse.SUPPRESS):
            assert f"(default: {action.default})" in text, (command, action.option_strings)
    flags = {s: a for a in parser._actions for s in a.option_strings}
    assert ("--device" in flags) == (command in WITH_DEVICE)
    if "--device" in flags:
        assert flags["--device"].type is common.device_flag
        assert "cuda:N" in flags["--device"].help or flags["--device"].help == argparse.SUPPRESS
    if "--amp" in flags or "--no-amp" in flags:
        assert flags["--amp"] is flags["--no-amp"] and isinstance(flags["--amp"], argparse.BooleanOptionalAction)
    assert not {"--reference", "--size", "--expected-size"} & set(flags)


@pytest.mark.parametrize("command", WITH_DEVICE)
def test_a_device_no_command_knows_is_refused_when_parsed_naming_the_choices(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(command).main(["--device", "gpu"])
    err = capsys.readouterr().err
    assert exit_.value.code == common.EXIT_BAD_INPUT
    assert err.splitlines()[-1].endswith("error: argument --device: 'gpu': expected auto, cpu, cuda or cuda:N")
