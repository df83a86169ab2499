"""Making an assignment: the student copy of the library, the handout, and the autograder with its reference values.

    out/
      minisnip/              the whole package; every marked region of the chosen parts replaced by
                             `raise NotImplementedError("<part>: <what to write>")`, the other regions kept
                             (their marker lines dropped); no caches, no VCS metadata
      HANDOUT.md             what to implement, in which order, the equations, how each part is graded
      autograder/            run.py, one checks file per part, parts.json, data/<part>.pt (reference values:
                             `torch.save` of tensors, lists, dicts and numbers, read back with weights_only=True)
      .minisnip-classroom.json   what this tool wrote (so a second `make` replaces only that, and `grade`
                             knows a student copy)

Everything is built in a temporary folder beside `out` and moved in at the end; before that, every file is
searched for the lines of the blanked solutions, and a hit stops the command.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import import_module
from pathlib import Path

import torch

from ..rundir import is_inside
from .errors import ClassroomError, UsageError
from .markers import MarkerError, Region, blank, find_regions
from .parts import PARTS, Part, get_parts

MANIFEST = ".minisnip-classroom.json"
TOOL = "minisnip.classroom"
_SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".ipynb_checkpoints"}
_SKIP_SUFFIXES = (".pyc", ".pyo", "~", ".swp", ".swo", ".orig", ".rej", ".bak", ".tmp")
_MIN_LINE = 8  # solution lines shorter than this ("else:", "pass") are not searched for


def source_package() -> Path:
    """The folder of the `minisnip` package the assignment is made from (the one imported here)."""
    import minisnip
    return Path(minisnip.__file__).resolve().parent


def read_manifest(folder: Path) -> dict:
    """The manifest of a folder `make` wrote; UsageError when the folder is not such a student copy."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise UsageError(f"{folder} is not a folder")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("tool") != TOOL:
        raise UsageError(f"{folder} is not a student copy made by `python -m minisnip.classroom make` "
                         f"(no valid {MANIFEST} in it)")
    return manifest


# --- the marked regions of the library -------------------------------------------------------------------

def _package_files(src: Path) -> list[Path]:
    """Every file of the package worth copying, relative to its parent folder, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")
                             and not d.endswith(".egg-info"))
        for name in sorted(filenames):
            if not name.startswith(".") and not name.endswith(_SKIP_SUFFIXES):
                out.append((Path(dirpath) / name).relative_to(src.parent))
    return out


def find_marked(src: Path) -> dict[str, tuple[str, list[Region]]]:
    """{relative path: (source, regions)} for every .py file of the package that holds solution markers."""
    found = {}
    for rel in _package_files(src):
        if rel.suffix != ".py":
            continue
        text = (src.parent / rel).read_text(encoding="utf-8")
        regions = find_regions(text, rel.as_posix())
        if regions:
            found[rel.as_posix()] = (text, regions)
    return found


def assign(marked: dict[str, tuple[str, list[Region]]], parts=PARTS) -> dict[str, list[tuple[str, Region]]]:
    """{part name: [(file, region)]}; MarkerError for a region no part claims or a part without its regions."""
    owner = {(p.file, f): p for p in parts for f in p.functions}
    by_function = {f: p for p in parts for f in p.functions}
    out: dict[str, list[tuple[str, Region]]] = {p.name: [] for p in parts}
    for file, (_, regions) in marked.items():
        for r in regions:
            part = owner.get((file, r.function))
            if part is None:
                moved = by_function.get(r.function)
                if moved is not None:
                    raise MarkerError(f"{file}:{r.begin + 1}: the solution markers of part {moved.name!r} "
                                      f"(function {r.function}) are here, but minisnip/classroom/parts.py says "
                                      f"{moved.file}: update the part's file")
                raise MarkerError(f"{file}:{r.begin + 1}: solution markers in {r.function} belong to no part; add a "
                                  "part to minisnip/classroom/parts.py or remove the markers")
            out[part.name].append((file, r))
    for p in parts:
        have = {r.function for _, r in out[p.name]}
        missing = [f for f in p.functions if f not in have]
        if missing:
            raise MarkerError(f"part {p.name!r}: no solution markers in {p.file} function "
                              f"{', '.join(missing)} (is this library a student copy?)")
    return out


def solution_lines(marked: dict[str, tuple[str, list[Region]]], regions: list[tuple[str, Region]]) -> set[str]:
    """The stripped lines of these regions (the blanked ones) that occur nowhere else in the marked files."""
    inside: set[str] = set()
    outside: set[str] = set()
    for file, (text, _) in marked.items():
        lines = text.splitlines()
        covered = {i for f, r in regions if f == file for i in range(r.begin, r.end + 1)}
        outside.update(lines[i].strip() for i in range(len(lines)) if i not in covered)
    for file, r in regions:
        inside.update(line.strip() for line in r.body(marked[file][0].splitlines()))
    return {line for line in inside - outside if len(line) >= _MIN_LINE}


def _outside_lines(src: Path, marked) -> set[str]:
    """Stripped lines of every package file outside the marked regions (unmarked files whole)."""
    lines: set[str] = set()
    for rel in _package_files(src):
        if rel.suffix == ".py" and rel.as_posix() not in marked:
            lines.update(x.strip() for x in (src.parent / rel).read_text(encoding="utf-8").splitlines())
    return lines


# --- writing ---------------------------------------------------------------------------------------------

def _write(stage: Path, rel: str, data: str | bytes) -> str:
    path = stage / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return rel


def _message(part: Part, function: str) -> str:
    return f"{part.name}: {part.functions[function]}"


def _write_package(stage: Path, src: Path, marked, assigned, chosen: list[Part]) -> list[str]:
    blanked = {p.name for p in chosen}
    by_name = {p.name: p for p in PARTS}
    files = []
    for rel in _package_files(src):
        key = rel.as_posix()
        if key not in marked:
            files.append(_write(stage, key, (src.parent / rel).read_bytes()))
            continue
        text, _ = marked[key]
        todo, keep = [], []
        for name, regions in assigned.items():
            for file, r in regions:
                if file == key:
                    (todo.append((r, _message(by_name[name], r.function))) if name in blanked else keep.append(r))
        new = blank(text, todo, keep)
        try:
            compile(new, key, "exec")
        except SyntaxError as e:
            raise MarkerError(f"{key}: the student version does not compile ({e}); a region must be whole "
                              "statements at one indentation") from None
        files.append(_write(stage, key, new))
    return files


def _write_autograder(stage: Path, chosen: list[Part]) -> list[str]:
    here = Path(__file__).resolve().parent
    blanked = {p.name for p in chosen}
    files = [_write(stage, "autograder/__init__.py", '"""The autograder of this assignment: '
                    'python autograder/run.py [PART ...]"""\n'),
             _write(stage, "autograder/run.py", (here / "runner.py").read_text(encoding="utf-8")),
             _write(stage, "autograder/_common.py", (here / "graders" / "_common.py").read_text(encoding="utf-8"))]
    table = {}
    for p in PARTS:
        grader = import_module(f"{__package__}.graders.{p.name}")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny tensors: threads only cost time
        try:
            data = grader.make_cases()
        except NotImplementedError as e:
            raise ClassroomError(f"part {p.name!r}: the library's own code raised NotImplementedError ({e}); make "
                                 "an assignment from the full library, not from a student copy") from None
        finally:
            torch.set_num_threads(threads)
        path = stage / "autograder" / "data" / f"{p.name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)
        torch.load(path, weights_only=True)  # what the runner will do: fails here if something is not weights-only
        files.append(f"autograder/data/{p.name}.pt")
        files.append(_write(stage, f"autograder/{p.name}.py",
                            (here / "graders" / f"{p.name}.py").read_text(encoding="utf-8")))
        table[p.name] = {"points": p.points, "file": p.file, "functions": list(p.functions),
                         "blanked": p.name in blanked}
    files.append(_write(stage, "autograder/parts.json", json.dumps(table, indent=2) + "\n"))
    return files


def handout(chosen: list[Part]) -> str:
    """HANDOUT.md: the parts to write in order, with their equations and grading, then the parts given."""
    names = {p.name for p in chosen}
    total = sum(p.points for p in chosen)
    out = ["# minisnip assignment: BERT and SNIP pruning, the key equations by hand", "",
           "This folder is a copy of the minisnip library (a from-scratch PyTorch BERT with SNIP structured pruning, "
           "Lin et al., Findings of EMNLP 2020) in which some function bodies are left to you. Each one now raises "
           "`NotImplementedError(\"<part>: <what to write>\")`; replace that line by your code. Keep the signatures, "
           "keep computations in torch (differentiable where the docstring says so), and do not edit autograder/.",
           "", f"{len(chosen)} part{'s' if len(chosen) != 1 else ''}, {total} points. Work through them in this "
           "order (later parts lean on the ideas, not the code, of earlier ones):", "",
           "| # | part | points | file | function(s) |", "|---|---|---|---|---|"]
    for i, p in enumerate(chosen, 1):
        out.append(f"| {i} | {p.name} | {p.points} | `{p.file}` | {', '.join(f'`{f}`' for f in p.functions)} |")
    out += ["", "## Setting up and checking your work", "",
            "Use a Python (3.10+) with the library's requirements (torch, numpy, tokenizers, safetensors, tqdm) and "
            "run everything from this folder, so that `import minisnip` finds this copy:", "", "```bash",
            "python -c 'import minisnip; print(minisnip.__file__)'   # must print a path inside this folder",
            "python autograder/run.py                 # every part, one line per check",
            "python autograder/run.py attention       # one part", "```", "",
            "A part scores its points when all its checks pass, 0 otherwise. The checks compare your functions "
            "with reference values stored in autograder/data/ (small inputs on fixed seeds) and test properties "
            "that a wrong solution would break. Grading runs every part in its own process with a time limit: "
            "a part that raises, hangs or returns the wrong shape scores 0, the others are graded as usual.", ""]
    for i, p in enumerate(chosen, 1):
        out += [f"## Part {i}: {p.name} ({p.points} points)", "", f"File `{p.file}`:", ""]
        out += [f"- `{f}`: {what}" for f, what in p.functions.items()]
        out += ["", p.summary, "", "```text", p.equations, "```", "", f"**How it is graded.** {p.grading}", ""]
    given = [p for p in PARTS if p.name not in names]
    if given:
        out += ["## Given", "", "These parts are left as the library has them (their checks run too, and pass): "
                + ", ".join(f"{p.name} (`{p.file}`)" for p in given) + ".", ""]
    return "\n".join(out)


# --- the output folder -------------------------------------------------------------------------------------

def _check_out(out: Path, src: Path) -> dict | None:
    """The old manifest when `out` is a folder this tool made, None when it is new or empty; UsageError otherwise."""
    if out == src or src in out.parents:
        raise UsageError(f"--out {out} lies inside the library it copies ({src}); choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return None
    if not (out / MANIFEST).is_file():
        raise UsageError(f"refusing to write into {out}: it is not empty and was not made by "
                         f"`python -m minisnip.classroom make` (no {MANIFEST}); choose a new or empty folder")
    return read_manifest(out)


def _install(stage: Path, out: Path, old: dict | None, files: list[str]) -> None:
    """Move the staged files into out; from a folder made before, first remove exactly what was written then."""
    if old is None:
        if out.exists():
            out.rmdir()  # empty, checked
        os.replace(stage, out)
        umask = os.umask(0)
        os.umask(umask)
        out.chmod(0o777 & ~umask)  # mkdtemp made the folder private
        return
    old_files = [f for f in old.get("files", []) if isinstance(f, str) and is_inside(out / f, out)]
    strangers = [f for f in files + [MANIFEST] if f not in old_files and f != MANIFEST and (out / f).exists()]
    if strangers:
        raise UsageError(f"refusing to overwrite {out / strangers[0]}: the last `make` did not write it")
    dirs = set()
    for f in old_files:
        path = out / f
        if path.is_file() or path.is_symlink():
            path.unlink()
        for parent in path.parents:
            if parent == out:
                break
            dirs.add(parent)
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        cache = d / "__pycache__"  # bytecode Python wrote for the files removed above
        if cache.is_dir() and all(c.suffix in (".pyc", ".pyo") for c in cache.iterdir()):
            shutil.rmtree(cache)
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    for f in files + [MANIFEST]:
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / f, out / f)


def make(out: str | Path, parts: list[str] | None = None) -> dict:
    """Write the assignment for `parts` (default: all) into `out`; returns the manifest written."""
    chosen = get_parts(parts)
    src = source_package()
    out = Path(out).absolute()
    old = _check_out(out, src)
    marked = find_marked(src)
    assigned = assign(marked)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".minisnip-classroom-", dir=out.parent))
    try:
        files = _write_package(stage, src, marked, assigned, chosen)
        files += _write_autograder(stage, chosen)
        files.append(_write(stage, "HANDOUT.md", handout(chosen)))
        _check_no_solution(stage, marked, assigned, chosen, _outside_lines(src, marked))
        manifest = {"tool": TOOL, "format": 1, "parts": [{"name": p.name, "points": p.points,
                                                         "blanked": p in chosen} for p in PARTS],
                    "files": sorted(files)}
        _write(stage, MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _install(stage, out, old, files)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _check_no_solution(stage: Path, marked, assigned, chosen: list[Part], elsewhere: set[str]) -> None:
    """ClassroomError if any staged file holds a line of a blanked solution."""
    needles = solution_lines(marked, [fr for p in chosen for fr in assigned[p.name]]) - elsewhere
    encoded = [(n, n.encode("utf-8")) for n in sorted(needles)]
    for path in sorted(p for p in stage.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for text, needle in encoded:
            if needle in data:
                raise ClassroomError(f"{path.relative_to(stage)} would contain a line of a solution ({text!r}); "
                                     "nothing was written")


__all__ = ["MANIFEST", "assign", "find_marked", "handout", "make", "read_manifest", "solution_lines",
           "source_package"]
