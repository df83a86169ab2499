"""Solution regions in Python source: find them, blank them, or drop just their marker lines.

A region is the run of statements between two comment lines, nbgrader's convention:

    # BEGIN SOLUTION
    ...the reference code...
    # END SOLUTION

Only real comments count (found with `tokenize`, so a docstring or string mentioning the markers is no
region); both lines sit at the indentation of the region's first statement, inside one function. Blanking
replaces the whole region, marker lines included, by one `raise NotImplementedError("...")` at that
indentation, so the function keeps its signature, docstring and the code around the region.
"""

from __future__ import annotations

import ast
import io
import re
import textwrap
import tokenize
from dataclasses import dataclass

from .errors import ClassroomError

_MARKER = re.compile(r"^#+\s*(BEGIN|END) SOLUTION\s*$")


class MarkerError(ClassroomError):
    """Markers that do not form well-made regions (unpaired, nested, outside a function, mis-indented)."""


@dataclass(frozen=True)
class Region:
    """One marked region of a file: lines `begin` .. `end` (0-based, the marker lines themselves)."""

    begin: int
    end: int
    indent: str
    function: str  # qualified name of the enclosing function, e.g. "Attention.keep_heads"

    def body(self, lines: list[str]) -> list[str]:
        """The lines between the two markers."""
        return lines[self.begin + 1:self.end]


def _marker_lines(source: str, path: str) -> list[tuple[int, str]]:
    """(0-based line, "BEGIN" / "END") of every comment that is a marker and alone on its line."""
    found = []
    lines = source.splitlines()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                m = _MARKER.match(tok.string.strip())
                row = tok.start[0] - 1
                if m and lines[row].strip() == tok.string.strip():
                    found.append((row, m.group(1)))
    except (tokenize.TokenError, SyntaxError) as e:
        raise MarkerError(f"{path}: cannot read the Python source ({e})") from None
    return found


def _functions(tree: ast.AST) -> list[tuple[str, int, int]]:
    """(qualified name, first body line, last line), 1-based, of every function, classes included in the name."""
    out: list[tuple[str, int, int]] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                out.append((name, child.body[0].lineno, child.end_lineno))
                walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".")
            else:
                walk(child, prefix)
    walk(tree, "")
    return out


def find_regions(source: str, path: str = "<source>") -> list[Region]:
    """All marked regions of a file, in order; MarkerError for markers that do not pair up into regions."""
    marks = _marker_lines(source, path)
    if not marks:
        return []
    lines = source.splitlines()
    try:
        functions = _functions(ast.parse(source, path))
    except SyntaxError as e:
        raise MarkerError(f"{path}: not valid Python ({e})") from None
    regions: list[Region] = []
    open_at: int | None = None
    for row, kind in marks:
        where = f"{path}:{row + 1}"
        if kind == "BEGIN":
            if open_at is not None:
                raise MarkerError(f"{where}: BEGIN SOLUTION inside the region opened at line {open_at + 1}")
            open_at = row
            continue
        if open_at is None:
            raise MarkerError(f"{where}: END SOLUTION without a BEGIN SOLUTION before it")
        regions.append(_region(lines, open_at, row, functions, path))
        open_at = None
    if open_at is not None:
        raise MarkerError(f"{path}:{open_at + 1}: BEGIN SOLUTION is never closed by an END SOLUTION")
    return regions


def _indent(line: str) -> str:
    return line[:len(line) - len(line.lstrip())]


def _region(lines: list[str], begin: int, end: int, functions, path: str) -> Region:
    indent = _indent(lines[begin])
    if _indent(lines[end]) != indent:
        raise MarkerError(f"{path}:{end + 1}: END SOLUTION is not indented like its BEGIN SOLUTION (line {begin + 1})")
    code = [(i, line) for i, line in enumerate(lines[begin + 1:end], begin + 1) if line.strip()]
    if not code:
        raise MarkerError(f"{path}:{begin + 1}: the region is empty")
    if _indent(code[0][1]) != indent:
        raise MarkerError(f"{path}:{code[0][0] + 1}: the region's first line is not indented like its markers")
    # a line of a multi-line statement may be indented less than the region (a closing bracket); a new
    # statement may not, which compiling the blanked file catches
    first, last = code[0][0] + 1, code[-1][0] + 1  # 1-based, as ast counts
    enclosing = [(name, lo, hi) for name, lo, hi in functions if lo <= first and last <= hi]
    if not enclosing:
        raise MarkerError(f"{path}:{begin + 1}: a solution region must lie inside a function's body")
    name = max(enclosing, key=lambda f: f[1])[0]  # the innermost function
    return Region(begin, end, indent, name)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


def _raise_line(indent: str, message: str, newline: str, width: int = 116) -> str:
    """`raise NotImplementedError("...")`, the message wrapped into adjacent string literals to fit `width`."""
    head = f"{indent}raise NotImplementedError("
    one = f"{head}{_quote(message)})"
    if len(one) <= width:
        return one + newline
    chunks = textwrap.wrap(message, width=max(20, width - len(head) - 3), break_long_words=False,
                           break_on_hyphens=False)
    chunks = [c + " " for c in chunks[:-1]] + chunks[-1:]
    pad = " " * len(head)
    return newline.join((head if i == 0 else pad) + _quote(c) for i, c in enumerate(chunks)) + ")" + newline


def blank(source: str, regions: list[tuple[Region, str]], keep: list[Region] = ()) -> str:
    """The source with each (region, message) replaced by `raise NotImplementedError(message)`.

    Regions in `keep` keep their code and lose only their two marker lines. Every region of the file must be
    in one of the two lists (a leftover marker would show where a solution was).
    """
    lines = source.splitlines(keepends=True)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    out: list[str] = []
    edits = {r.begin: (r, msg) for r, msg in regions}
    edits.update({r.begin: (r, None) for r in keep})
    i = 0
    while i < len(lines):
        if i not in edits:
            out.append(lines[i])
            i += 1
            continue
        r, msg = edits[i]
        if msg is None:
            out.extend(lines[r.begin + 1:r.end])
        else:
            out.append(_raise_line(r.indent, msg, newline))
        i = r.end + 1
    return "".join(out)


__all__ = ["MarkerError", "Region", "blank", "find_regions"]
