"""Every method on the shared recipe through the command line: the same outputs, the target reached, the pruned
model saved and reloadable with the score it reports; and what the recipe refuses before any training."""

from __future__ import annotations

import json

import pytest

import minisnip
from minisnip.__main__ import METHODS, main
from minisnip.finetune import load_task_data
from minisnip.pruning.branches import head_params
from minisnip.pruning.compression import (compression, compression_with_zeros, dense_encoder_linear_params,
                                          encoder_linears, sparsity)
from minisnip.train import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--epochs", "2", "--batch-size", "4", "--max-length", "32", "--no-progress", "--no-plots"]


def run(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_reaches_its_target_and_writes_the_same_outputs(name, tiny_folder, glue_fixtures_dir, tmp_path,
                                                                   capsys):
    out = tmp_path / name
    code, err = run(["prune", "--method", name, "--target", "0.5", "--task", "mrpc", "--glue-dir",
                     str(glue_fixtures_dir), "--model", str(tiny_folder), "--out", str(out), *QUICK], capsys)
    assert code == 0, err
    module = METHODS[name][0]
    result = json.loads((out / "result.json").read_text())
    pruning = json.loads((out / "pruning.json").read_text())
    assert result["status"] == "completed" and result["method"] == name and result["structured"] == module.STRUCTURED
    assert set(result["scores"]) >= {"finetuned", "pruned_before_recovery", "pruned"}
    pruned = minisnip.BertForSequenceClassification.from_pretrained(out / "pruned")
    dense = minisnip.BertConfig.from_json_file(tiny_folder / "config.json")
    if module.STRUCTURED:
        # within one branch of the target (a head owns a little more than a neuron group of 2 x head_dim)
        one_branch = head_params(dense.hidden_size, dense.head_dim) / dense_encoder_linear_params(dense)
        assert 0.5 <= result["compression"] <= 0.5 + one_branch + 1e-9
        assert compression(pruned, dense) == pytest.approx(result["compression"])
        assert pruning["removed"] and all(b["score"] is not None for b in pruning["branches"])
        removed = [b for b in pruning["branches"] if b["removed"]]
        assert removed and len(removed) < len(pruning["branches"])
    else:  # zeros inside the matrices: exactly the target's share of the weights (per-matrix rounding)
        linears = encoder_linears(pruned)
        assert sparsity(pruned) == pytest.approx(0.5, abs=0.5 * len(linears) / sum(l.weight.numel() for _, l in linears))
        assert result["sparsity"] == pytest.approx(sparsity(pruned))
        assert compression_with_zeros(pruned, dense) == pytest.approx(result["compression"])
        assert pruned.config.layers == dense.layers  # nothing removed, only zeroed
    tok = minisnip.load_tokenizer(out / "pruned")
    data = load_task_data("mrpc", tok, glue_fixtures_dir, max_length=32)
    assert evaluate(pruned, data.dev["dev"], data.task, tok)["f1"] == pytest.approx(result["score"], abs=1e-6)
    if module.USES_DISTILLATION:  # no --teacher: the run fine-tuned its own and kept it
        assert (out / "teacher" / "model.safetensors").exists() and result["teacher"]["dev"]


def test_distill_any_method_with_a_given_teacher(tiny_folder, glue_fixtures_dir, tmp_path, capsys):
    teacher_run = tmp_path / "teacher"
    assert main(["finetune", "--task", "mrpc", "--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder),
                 "--out", str(teacher_run), "--epochs", "1", "--batch-size", "4", "--max-length", "32",
                 "--no-progress"]) == 0
    out = tmp_path / "distilled"
    code, err = run(["prune", "--method", "magnitude", "--distill", "--teacher", str(teacher_run / "best"),
                     "--distill-temperature", "3", "--target", "0.3", "--task", "mrpc", "--glue-dir",
                     str(glue_fixtures_dir), "--model", str(tiny_folder), "--out", str(out), *QUICK], capsys)
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    assert result["prune"]["distill"]["temperature"] == 3.0 and result["teacher"] == str(teacher_run / "best")
    assert all("distill_kd" in e for e in result["scores"]["finetune_history"]["epochs"])
    assert not (out / "teacher").exists()


@pytest.mark.parametrize("argv, says", [
    (["--method", "magic"], "invalid choice"),
    (["--method", "snip", "--target", "0.0"], "outside"),
    (["--method", "snip", "--kinds", "head", "--target", "0.6"], "cannot be reached"),  # heads: 50% of this model
    (["--method", "magnitude", "--teacher", "x"], "--teacher is used for distillation"),
    (["--method", "magnitude", "--distill-alpha", "2"], "need --distill"),
    (["--method", "movement", "--threshold", "0.1"], "--threshold is for structured methods"),
    (["--method", "l0", "--dense"], "target"),
    (["--method", "movement", "--prior-lambda", "0.1"], "SNIP's"),
    (["--method", "movement", "--option", "variant=diagonal"], "variant"),
])
def test_bad_method_input_is_refused_before_training(argv, says, tiny_folder, glue_fixtures_dir, tmp_path, capsys):
    code, err = run(["prune", *argv, "--task", "mrpc", "--glue-dir", str(glue_fixtures_dir),
                     "--model", str(tiny_folder), "--out", str(tmp_path / "run"), *QUICK], capsys)
    assert code == 2 and says in err, err
    assert list(tmp_path.iterdir()) == []


def test_teacher_of_another_task_is_refused(tiny_folder, glue_fixtures_dir, tmp_path, capsys):
    teacher_run = tmp_path / "t"
    assert main(["finetune", "--task", "stsb", "--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder),
                 "--out", str(teacher_run), "--epochs", "1", "--batch-size", "4", "--max-length", "32",
                 "--no-progress"]) == 0
    code, err = run(["prune", "--method", "snip", "--distill", "--teacher", str(teacher_run / "best"),
                     "--task", "mrpc", "--glue-dir", str(glue_fixtures_dir), "--model", str(tiny_folder),
                     "--out", str(tmp_path / "run"), *QUICK], capsys)
    assert code == 2 and "needs 2" in err and "same task" in err
    assert not (tmp_path / "run").exists()
