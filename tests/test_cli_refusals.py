"""What the command line refuses, and that a refusal changes nothing on disk (issue: nothing lost, nothing silent).

Each case goes through `main([...])` as a user's command line would, and checks the exit status, that the
message names the offending file, flag or value, and that the folders involved are byte for byte as before.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import minisnip
from minisnip.__main__ import main
from minisnip.train import TrainConfig, TrainHook, TrainingDiverged, fit

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--epochs", "1", "--batch-size", "4", "--max-length", "32", "--no-progress"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (and beside it, hidden partial folders included) with a hash of its bytes."""
    root = folder.parent
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_folder, glue_fixtures_dir) -> Path:
    """A completed SST-2 fine-tune of the tiny model (read-only for the tests: they copy it)."""
    out = tmp_path_factory.mktemp("runs") / "sst2"
    assert main(["finetune", "--task", "sst2", "--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder),
                 "--out", str(out), *QUICK]) == 0
    return out


def copy_run(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def stop_in_recovery(monkeypatch, stop: BaseException) -> None:
    """Make prune's second call of fit (the recovery; the first is the fine-tuning) raise `stop`."""
    import minisnip.pruning.recipe as recipe
    real_fit, calls = recipe.fit, []

    def fit_stopping_in_recovery(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise stop
        return real_fit(*args, **kwargs)
    monkeypatch.setattr(recipe, "fit", fit_stopping_in_recovery)


def run(argv: list[str], capsys) -> tuple[int, str]:
    """main(argv) -> (exit status, stderr); argparse's own refusals (SystemExit) count as exits too."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# --- data loss ------------------------------------------------------------------------------------------------
def test_typo_in_task_with_overwrite_deletes_nothing(finished_run, tmp_path, tiny_folder, glue_fixtures_dir, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    code, err = run(["prune", "--task", "rtee", "--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder),
                     "--out", str(out), "--overwrite", *QUICK], capsys)
    assert code == 2 and "'rtee'" in err and "Traceback" not in err
    assert snapshot(out) == before


def test_starting_checkpoint_inside_out_is_refused(finished_run, tmp_path, glue_fixtures_dir, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    code, err = run(["finetune", "--task", "sst2", "--glue-dir", str(glue_fixtures_dir), "--model", str(out / "best"),
                     "--out", str(out), "--overwrite", *QUICK], capsys)
    assert code == 2 and "--model" in err and "inside --out" in err
    assert snapshot(out) == before


def test_overwrite_replaces_only_what_minisnip_wrote(finished_run, tmp_path, tiny_folder, glue_fixtures_dir, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    (out / "my_notes.txt").write_text("keep me")
    (out / "figures").mkdir()
    (out / "figures" / "mine.png").write_bytes(b"\x89PNG")
    old_result = (out / "result.json").read_text()
    code, _ = run(["finetune", "--task", "wnli", "--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder),
                   "--out", str(out), "--overwrite", *QUICK], capsys)
    assert code == 0
    assert (out / "my_notes.txt").read_text() == "keep me" and (out / "figures" / "mine.png").exists()
    assert (out / "result.json").read_text() != old_result
    assert json.loads((out / "result.json").read_text())["task"] == "wnli"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial or old folders left


def test_without_overwrite_a_run_is_refused(finished_run, tmp_path, tiny_folder, glue_fixtures_dir, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    code, err = run(["finetune", "--task", "sst2", "--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder),
                     "--out", str(out), *QUICK], capsys)
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    assert snapshot(out) == before


def test_a_run_that_fails_before_training_leaves_no_folder(tmp_path, tiny_folder, capsys):
    out = tmp_path / "new" / "run"
    code, err = run(["finetune", "--task", "rte", "--glue-dir", str(tmp_path / "no-such-glue"),
                     "--model", str(tiny_folder), "--out", str(out), *QUICK], capsys)
    assert code == 2 and "no-such-glue" in err
    assert list(tmp_path.iterdir()) == []  # not even the parent folder was made


def test_interrupted_prune_is_marked_and_complete(tmp_path, tiny_folder, glue_fixtures_dir, capsys, monkeypatch):
    """Ctrl-C during recovery: the run folder is in place and its result.json says "interrupted"."""
    stop_in_recovery(monkeypatch, KeyboardInterrupt())
    out = tmp_path / "run"
    code, err = run(["prune", "--task", "rte", "--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder),
                     "--out", str(out), "--target", "0.3", "--no-plots", *QUICK], capsys)
    assert code == 130 and "interrupted" in err
    assert json.loads((out / "result.json").read_text())["status"] == "interrupted"
    assert not (out / "pruned").exists()  # nothing that looks like a finished result
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


# --- quiet wrong answers ----------------------------------------------------------------------------------------
def test_evaluate_refuses_a_pretrained_head(tiny_folder, glue_fixtures_dir, capsys):
    code, err = run(["evaluate", "--task", "rte", "--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder)],
                    capsys)
    assert code == 2 and "no classifier weights" in err and "--allow-untrained-head" in err
    code, _ = run(["evaluate", "--task", "rte", "--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder),
                   "--allow-untrained-head"], capsys)
    assert code == 0


def test_evaluate_refuses_a_head_of_another_task(finished_run, glue_fixtures_dir, capsys):
    code, err = run(["evaluate", "--task", "rte", "--glue-dir", str(glue_fixtures_dir),
                     "--model", str(finished_run / "best")], capsys)
    assert code == 2 and "fine-tuned on SST-2, not RTE" in err
    code, err = run(["evaluate", "--task", "stsb", "--glue-dir", str(glue_fixtures_dir),
                     "--model", str(finished_run / "best")], capsys)
    assert code == 2 and "needs 1" in err
    code, _ = run(["evaluate", "--task", "sst2", "--glue-dir", str(glue_fixtures_dir),
                   "--model", str(finished_run / "best")], capsys)
    assert code == 0


@pytest.mark.parametrize("flag, value, says", [
    ("--prior-lambda", "nan", "not a finite number"), ("--prior-lambda", "-1", "outside"),
    ("--prior-warmup", "inf", "not a finite number"), ("--lr", "0", "outside"), ("--lr", "nan", "not a finite"),
    ("--target", "1", "outside"), ("--target", "nan", "not a finite"), ("--threshold", "-0.5", "outside"),
    ("--threshold", "nan", "not a finite"), ("--neuron-group-size", "0", "below 1"), ("--sn-bound", "abc", "'init'"),
    ("--sn-bound", "0", "'init'"), ("--epochs", "0", "below 1"), ("--max-train", "-3", "below 1"),
    ("--warmup", "1", "outside"), ("--recovery-epochs", "-1", "below 0"), ("--option", "prior_lambda", "NAME=VALUE"),
])
def test_bad_numbers_are_refused_before_anything(flag, value, says, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run(["prune", "--task", "rte", "--out", str(out), flag, value], capsys)
    assert code == 2 and flag in err and says in err
    assert not out.exists()


def test_unknown_method_option_names_the_settings(tmp_path, tiny_folder, glue_fixtures_dir, capsys):
    code, err = run(["prune", "--task", "rte", "--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder),
                     "--out", str(tmp_path / "run"), "--option", "lamda=1"], capsys)
    assert code == 2 and "lamda" in err and "prior_lambda" in err and not (tmp_path / "run").exists()


def test_repeated_seeds_are_refused(tmp_path, tiny_folder, glue_fixtures_dir, capsys):
    code, err = run(["finetune", "--task", "rte", "--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder),
                     "--out", str(tmp_path / "run"), "--seeds", "3", "3", *QUICK], capsys)
    assert code == 2 and "3 more than once" in err and not (tmp_path / "run").exists()


def test_threshold_above_every_norm_is_refused_before_training(tmp_path, tiny_folder, glue_fixtures_dir, capsys):
    code, err = run(["prune", "--task", "rte", "--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder),
                     "--out", str(tmp_path / "run"), "--threshold", "1000", *QUICK], capsys)
    assert code == 2 and "--threshold 1000" in err and "--allow-empty" in err
    assert list(tmp_path.iterdir()) == []


def test_dense_with_a_target_is_refused(tmp_path, capsys):
    code, err = run(["prune", "--task", "rte", "--out", str(tmp_path / "run"), "--dense", "--target", "0.5"], capsys)
    assert code == 2 and "--dense" in err


# --- errors a user can act on -------------------------------------------------------------------------------------
def test_out_that_is_a_file_is_refused(tmp_path, tiny_folder, glue_fixtures_dir, capsys):
    out = tmp_path / "results.txt"
    out.write_text("mine")
    code, err = run(["finetune", "--task", "rte", "--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder),
                     "--out", str(out), *QUICK], capsys)
    assert code == 2 and "is a file" in err and out.read_text() == "mine"


def test_out_below_a_file_is_refused(tmp_path, tiny_folder, glue_fixtures_dir, capsys):
    (tmp_path / "f").write_text("x")
    code, err = run(["finetune", "--task", "rte", "--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder),
                     "--out", str(tmp_path / "f" / "run"), *QUICK], capsys)
    assert code == 2 and "is a file" in err


def test_evaluate_out_that_is_a_folder_is_refused(finished_run, tmp_path, glue_fixtures_dir, capsys):
    code, err = run(["evaluate", "--task", "sst2", "--glue-dir", str(glue_fixtures_dir),
                     "--model", str(finished_run / "best"), "--out", str(tmp_path)], capsys)
    assert code == 2 and "is a folder" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_on_a_cpu_build_is_refused(tmp_path, capsys):
    code, err = run(["finetune", "--task", "rte", "--out", str(tmp_path / "run"), "--device", "cuda"], capsys)
    assert code == 2 and "--device" in err and "no CUDA" in err
    code, err = run(["finetune", "--task", "rte", "--out", str(tmp_path / "run"), "--device", "tpu9"], capsys)
    assert code == 2 and "not a device" in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    from minisnip.glue import GlueDataError
    with pytest.raises(GlueDataError, match="rtee"):
        main(["finetune", "--task", "rtee", "--out", str(tmp_path / "run"), "--debug"])


def test_divergence_message_names_no_checkpoint_that_was_never_written(tiny_folder, glue_fixtures_dir, tmp_path):
    from minisnip.finetune import load_classifier, load_task_data
    tokenizer = minisnip.load_tokenizer(tiny_folder)
    data = load_task_data("rte", tokenizer, glue_fixtures_dir, max_length=32)
    model = load_classifier(tiny_folder, data.task)

    class NanAtOnce(TrainHook):
        def loss(self, ctx):
            return torch.tensor(float("nan"))
    with pytest.raises(TrainingDiverged, match="no checkpoint was saved") as e:
        fit(model, tokenizer, data.task, data.train, data.dev, TrainConfig(epochs=1, batch_size=4, progress=False),
            out_dir=tmp_path, hooks=[NanAtOnce()])
    assert "best" not in str(e.value) and not (tmp_path / "best").exists()


def test_offline_without_glue_dir_says_how_to_pass_one(tmp_path):
    """Offline, no --glue-dir, no MINISNIP_GLUE_DIR, and a glue/ folder in the working directory (which the
    `datasets` library once took for a local dataset): one line saying what was tried and what to pass."""
    import os
    import subprocess
    import sys
    (tmp_path / "glue").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MINISNIP_GLUE_DIR"}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "minisnip", "finetune", "--task", "rte", "--out", str(tmp_path / "run")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nyu-mll/glue" in proc.stderr and "--glue-dir" in proc.stderr and "MINISNIP_GLUE_DIR" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["glue"]


@pytest.mark.parametrize("stop", [RuntimeError("boom in recovery"), KeyboardInterrupt()])
def test_a_run_that_fails_over_an_earlier_run_leaves_that_run_whole(stop, finished_run, tmp_path, tiny_folder,
                                                                     glue_fixtures_dir, capsys, monkeypatch):
    """--overwrite replaces a finished run only with one that completed: a failed or interrupted run lands
    beside it, in <out>.failed-<time>, with its result.json saying how it ended."""
    stop_in_recovery(monkeypatch, stop)
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    code, err = run(["prune", "--task", "rte", "--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder),
                     "--out", str(out), "--overwrite", "--target", "0.3", "--no-plots", *QUICK], capsys)
    [failed] = [p for p in tmp_path.iterdir() if p.name.startswith("run.failed-")]
    assert {k: v for k, v in snapshot(out).items() if not k.startswith("run.failed-")} == before
    status = json.loads((failed / "result.json").read_text())["status"]
    if isinstance(stop, KeyboardInterrupt):
        assert code == 130 and status == "interrupted"
    else:
        assert code == 1 and status == "failed: RuntimeError: boom in recovery"
    assert str(failed) in err and "keeps its earlier run" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", failed.name])  # nothing partial left


@pytest.mark.parametrize("argv, message", [
    (["--method", "l0", "--kinds", "head", "attention"], "gate a block and its parts at once"),
    (["--method", "snip-prox", "--kinds", "attention", "ffn"], "whole blocks"),
])
def test_what_a_methods_gates_cannot_take_is_refused_before_anything_is_written(
        argv, message, finished_run, tmp_path, tiny_folder, glue_fixtures_dir, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    before = snapshot(out)
    code, err = run(["prune", "--task", "rte", "--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder),
                     "--out", str(out), "--overwrite", "--target", "0.3", "--no-plots", *argv, *QUICK], capsys)
    assert code == 2 and message in err
    assert snapshot(out) == before


def test_evaluate_out_replaces_only_its_own_metrics_file(finished_run, tmp_path, glue_fixtures_dir, capsys):
    model = copy_run(finished_run, tmp_path / "run") / "best"
    base = ["evaluate", "--task", "sst2", "--glue-dir", str(glue_fixtures_dir), "--model", str(model)]
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    code, err = run([*base, "--out", str(notes)], capsys)
    assert code == 2 and "not a metrics file written by evaluate" in err and notes.read_text() == '{"mine": 1}'
    before = snapshot(model)
    code, err = run([*base, "--out", str(model / "config.json")], capsys)
    assert code == 2 and "inside --model" in err and snapshot(model) == before
    metrics = tmp_path / "metrics.json"
    assert run([*base, "--out", str(metrics)], capsys)[0] == 0
    first = json.loads(metrics.read_text())
    assert set(first) == {"task", "model", "metrics"}
    assert run([*base, "--out", str(metrics)], capsys)[0] == 0  # its own earlier file: replaced
    assert json.loads(metrics.read_text()) == first


def test_a_gradual_cut_without_a_target_is_refused_before_training(tmp_path, tiny_folder, glue_fixtures_dir, capsys):
    code, err = run(["prune", "--task", "rte", "--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder),
                     "--out", str(tmp_path / "run"), "--threshold", "0.01", "--option", "gradual=true", *QUICK], capsys)
    assert code == 2 and "gradual needs a target" in err
    assert list(tmp_path.iterdir()) == []
