"""Classroom assignments (minisnip.classroom): markers, the student copy, the handout, the autograder, grading.

The expensive steps (one `make`, each `grade` starts one process per part) are shared through module fixtures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import minisnip
from minisnip.classroom import PARTS, UsageError, grade, make
from minisnip.classroom.__main__ import main
from minisnip.classroom.make import MANIFEST, assign, find_marked
from minisnip.classroom.markers import MarkerError, blank, find_regions

SRC = Path(minisnip.__file__).resolve().parent
ROOT = SRC.parent
POINTS = {p.name: p.points for p in PARTS}
MARKED_FILES = sorted({p.file for p in PARTS})
JOBS = 3

pytestmark = pytest.mark.usefixtures("one_thread")


def scores(report: dict) -> dict[str, int]:
    return {r["name"]: r["points"] for r in report["parts"]}


def reasons(report: dict) -> dict[str, str]:
    return {r["name"]: r["reason"] for r in report["parts"]}


def restore_solutions(folder: Path) -> None:
    """Put the reference solutions back: the library's marked files over the student's."""
    for f in MARKED_FILES:
        shutil.copyfile(ROOT / f, folder / f)


def patch(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} not found once in {path}"
    path.write_text(text.replace(old, new))


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A fresh assignment with every part blanked."""
    out = tmp_path_factory.mktemp("classroom") / "assignment"
    make(out)
    return out


@pytest.fixture(scope="module")
def restored(made, tmp_path_factory) -> Path:
    """A copy of the assignment with the reference solutions put back."""
    out = tmp_path_factory.mktemp("classroom") / "restored"
    shutil.copytree(made, out)
    restore_solutions(out)
    return out


def copy_of(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


# --- markers -------------------------------------------------------------------------------------------------

SOURCE = '''def f(x):
    """Doc mentioning
    # BEGIN SOLUTION
    in a docstring, which is no marker."""
    y = 1
    # BEGIN SOLUTION
    if x:
        y = (x +
    1)
    # END SOLUTION
    return y
'''


def test_markers_are_comments_inside_functions_and_blank_keeps_the_rest():
    (r,) = find_regions(SOURCE)
    assert (r.begin, r.end, r.indent, r.function) == (5, 9, "    ", "f")
    out = blank(SOURCE, [(r, 'p: write "it"')])
    assert '    raise NotImplementedError("p: write \\"it\\"")\n    return y\n' in out and "y = (x" not in out
    compile(out, "f", "exec")
    assert "BEGIN SOLUTION" not in blank(SOURCE, [], keep=[r]).split('"""')[2]  # kept code, marker lines gone
    for bad, why in (("    # BEGIN SOLUTION\n", "never closed"), ("    # END SOLUTION\n", "without a BEGIN"),
                     ("    # BEGIN SOLUTION\n    # BEGIN SOLUTION\n", "inside the region")):
        with pytest.raises(MarkerError, match=why):
            find_regions(f"def g():\n    pass\n{bad}    pass\n")
    with pytest.raises(MarkerError, match="inside a function"):
        find_regions("# BEGIN SOLUTION\nx = 1\n# END SOLUTION\n")


def test_every_region_of_the_library_belongs_to_its_part():
    assigned = assign(find_marked(SRC))
    for p in PARTS:
        assert {r.function for _, r in assigned[p.name]} == set(p.functions)
        assert {f for f, _ in assigned[p.name]} == {p.file}


# --- the student copy ------------------------------------------------------------------------------------------

def test_student_copy_is_clean_and_holds_no_solution(made):
    files = [p for p in made.rglob("*") if p.is_file()]
    assert not [p for p in made.rglob("*") if p.name in ("__pycache__", ".git") or p.suffix in (".pyc", ".pyo")]
    assert (made / "HANDOUT.md").is_file() and (made / "autograder" / "run.py").is_file()
    assert sorted(p.name for p in (made / "autograder" / "data").iterdir()) == sorted(f"{n}.pt" for n in POINTS)
    # every original line of every blanked region, unless the library has the same line outside the regions
    marked = find_marked(SRC)
    inside, outside = set(), set()
    for f in SRC.rglob("*.py"):
        rel = f.relative_to(ROOT).as_posix()
        lines = f.read_text().splitlines()
        covered = {i for r in (marked[rel][1] if rel in marked else []) for i in range(r.begin, r.end + 1)}
        inside |= {lines[i].strip() for i in covered if "SOLUTION" not in lines[i]}
        outside |= {line.strip() for i, line in enumerate(lines) if i not in covered}
    needles = {line for line in inside - outside if len(line) >= 8}
    assert len(needles) > 30
    for path in files:
        data = path.read_bytes()
        leaks = [n for n in needles if n.encode() in data]
        assert not leaks, f"{path.relative_to(made)} holds solution lines {leaks}"
        assert b"# BEGIN SOLUTION" not in data or path.parent.name == "classroom", path
    handout = (made / "HANDOUT.md").read_text()
    assert all(f"## Part {i}: {p.name} ({p.points} points)" in handout for i, p in enumerate(PARTS, 1))
    assert "sqrt(d)" in handout and "autograder/run.py" in handout


def test_student_copy_imports_and_runs_what_is_not_blanked(made):
    code = ("import minisnip, torch\n"
            "from minisnip.model import attention_head\n"
            "from minisnip.snip import function_norms, identity_prior\n"
            "from minisnip.pruning import list_branches\n"
            "print(minisnip.__file__)\n"
            "m = minisnip.BertModel(minisnip.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2,\n"
            "    num_attention_heads=4, intermediate_size=32, max_position_embeddings=16)).eval()\n"
            "print(tuple(m(torch.randint(0, 30, (2, 5))).shape), len(list_branches(m, (\"head\", \"attention\", \"ffn\"))))\n"
            "try:\n"
            "    attention_head(torch.ones(1, 2), torch.ones(1, 2), torch.ones(1, 2))\n"
            "except NotImplementedError as e:\n"
            "    print('raised', e)\n"
            "from minisnip.pruning.distill import distillation_loss\n"
            "try:\n"
            "    distillation_loss(torch.ones(1, 2), torch.ones(1, 2), 2.0)\n"
            "except NotImplementedError as e:\n"
            "    print('raised', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=made, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert Path(lines[0]).resolve() == (made / "minisnip" / "__init__.py").resolve()
    assert lines[1] == "(2, 5, 16) 12"
    assert lines[2].startswith("raised attention: compute softmax")
    assert lines[3].startswith("raised distillation: convert both logits")


# --- grading -----------------------------------------------------------------------------------------------------

def test_fresh_copy_scores_zero_exactly_on_the_blanked_parts(tmp_path):
    out = tmp_path / "some"
    blanked = {"attention", "power_iteration", "thresholding", "movement"}
    make(out, sorted(blanked))
    report = grade(out, jobs=JOBS)
    assert scores(report) == {n: 0 if n in blanked else p for n, p in POINTS.items()}
    for r in report["parts"]:
        assert (r["status"], "not implemented" in r["reason"]) == (("failed", True) if r["name"] in blanked
                                                                  else ("passed", False)), r
    total = sum(POINTS.values())
    assert (report["total"], report["max_total"]) == (total - sum(POINTS[n] for n in blanked), total)
    assert json.loads((out / MANIFEST).read_text())["parts"][0] == {"name": "attention", "points": 20, "blanked": True}


def test_unmodified_library_scores_full_marks_and_writes_json(restored, tmp_path):
    """With the solutions put back, the student copy's package is the library itself, byte for byte."""
    library = sorted(p.relative_to(ROOT) for p in SRC.rglob("*.py"))
    assert sorted(p.relative_to(restored) for p in (restored / "minisnip").rglob("*.py")) == library
    assert all((restored / f).read_bytes() == (ROOT / f).read_bytes() for f in library)
    assert main(["grade", str(restored), "--out", str(tmp_path / "g.json"), "--jobs", str(JOBS)]) == 0
    report = json.loads((tmp_path / "g.json").read_text())
    assert scores(report) == POINTS and report["total"] == report["max_total"] == sum(POINTS.values())
    assert all(c["passed"] for r in report["parts"] for c in r["checks"]) and len(report["parts"][0]["checks"]) >= 5


def test_wrong_hanging_or_crashing_parts_lose_only_their_points(restored, tmp_path):
    """Wrong solutions, a wrong shape, a hang and a dying process, each in its own part, graded in one run."""
    folder = copy_of(restored, tmp_path)
    patch(folder / "minisnip/model.py", "scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])",
          "scores = q @ k.transpose(-2, -1)")  # attention without 1/sqrt(d)
    patch(folder / "minisnip/snip/spectral.py", "v = F.normalize(W.t().mv(u), dim=0, eps=eps)", "v = W.t().mv(u)")
    patch(folder / "minisnip/snip/spectral.py", "u = F.normalize(W.mv(v), dim=0, eps=eps)", "u = W.mv(v)")
    patch(folder / "minisnip/snip/spectral.py", "return mats * scale[:, None, None]",
          "return (mats * scale[:, None, None]).flatten(1)")  # wrong shape
    patch(folder / "minisnip/snip/prior.py", "    norms = (sums / count", "    while True: pass\n    norms = (sums / count")
    patch(folder / "minisnip/model.py", "        rows = torch.cat(", "        import os; os._exit(3)\n        rows = torch.cat(")
    # movement: W' = W ⊙ M as before, but the scores get dL/dW' itself instead of dL/dW' ⊙ W
    patch(folder / "minisnip/methods/movement.py",
          "        return weight * StraightThroughMask.apply(self.state.scores, self.state.keep)",
          "        keep = self.state.keep.to(weight.dtype)\n"
          "        return weight * keep + StraightThroughMask.apply(self.state.scores, self.state.keep) - keep")
    patch(folder / "minisnip/pruning/distill.py", "    return T * T * kl", "    return kl")  # without the T^2
    report = grade(folder, time_limit=5, jobs=JOBS)
    broken = {"attention", "power_iteration", "spectral_rescale", "identity_prior", "keep_heads", "movement",
              "distillation"}
    assert scores(report) == {n: 0 if n in broken else p for n, p in POINTS.items()}
    why = reasons(report)
    assert why["attention"].startswith("test_attention_head_matches_reference: attention_head, case 0")
    assert "differs from the expected values" in why["attention"]
    assert why["power_iteration"].startswith("test_matches_reference: power_iteration, matrix (7, 5)")
    assert "wrong shape (4, 30), expected (4, 6, 5)" in why["spectral_rescale"]
    assert why["identity_prior"] == "time limit of 5 s exceeded in test_value_matches_reference"
    assert why["keep_heads"].startswith("the checks stopped with exit status 3 in test_weights_match_reference")
    assert why["movement"].startswith("test_masked_weight_matches_reference: MaskedWeight (torch.float64 weight): "
                                      "the scores' gradient dL/dS: differs from the expected values")
    assert why["distillation"].startswith("test_matches_reference: distillation_loss((4, 5) torch.float32, T=2.0): "
                                          "the loss: differs from the expected values")
    status = {r["name"]: r["status"] for r in report["parts"]}
    assert (status["identity_prior"], status["keep_heads"], status["attention"]) == ("time limit", "crashed", "failed")


# --- bad input ---------------------------------------------------------------------------------------------------

def test_make_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["make", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "refusing to write into" in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    with pytest.raises(UsageError, match="inside the library"):
        make(SRC / "student")


def test_make_again_replaces_only_what_it_wrote(tmp_path):
    out = tmp_path / "a"
    make(out, ["attention"])
    (out / "my_notes.md").write_text("mine")
    (out / "minisnip" / "__pycache__").mkdir(exist_ok=True)
    (out / "minisnip" / "__pycache__" / "model.cpython-310.pyc").write_bytes(b"stale")
    make(out, ["keep_heads"])
    assert (out / "my_notes.md").read_text() == "mine"
    assert not (out / "minisnip" / "__pycache__").exists()
    assert 'raise NotImplementedError("keep_heads:' in (out / "minisnip/model.py").read_text()
    assert "raise NotImplementedError(\"attention:" not in (out / "minisnip/model.py").read_text()
    (out / "HANDOUT.md").unlink()
    (out / "minisnip" / "glue.py").write_text("# the student's own version")
    make(out, ["keep_heads"])  # what the last make wrote is replaced, even when changed or gone
    assert (out / "HANDOUT.md").is_file() and "student's own" not in (out / "minisnip" / "glue.py").read_text()
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"].remove("HANDOUT.md")  # as if someone else had written it
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="refusing to overwrite .*HANDOUT.md"):
        make(out, ["keep_heads"])
    assert (out / "minisnip" / "model.py").is_file()  # refused before anything was removed


def test_unknown_parts_and_non_student_folders(tmp_path, capsys):
    assert main(["make", "--out", str(tmp_path / "x"), "--parts", "attention", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown part nope; valid parts: attention, keep_heads," in err and not (tmp_path / "x").exists()
    assert main(["grade", str(tmp_path)]) == 2
    assert "is not a student copy" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["grade"])
    assert e.value.code == 2


def test_grade_refuses_unknown_parts(made, capsys):
    assert main(["grade", str(made), "--parts", "attention", "nope"]) == 2
    assert "valid parts: attention" in capsys.readouterr().err
