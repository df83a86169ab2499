"""Classroom assignments made from the library itself, with an autograder.

The code students write is marked inside minisnip with nbgrader's comment lines `# BEGIN SOLUTION` /
`# END SOLUTION`, so the reference solution is the code the library's tests prove. Two commands:

    python -m minisnip.classroom make --out DIR [--parts NAME ...]   student copy + HANDOUT.md + autograder/
    python -m minisnip.classroom grade DIR [--out FILE]              a score per part and in total, as JSON too

markers.py finds and blanks regions, parts.py is the table of parts, make.py writes an assignment, grade.py
grades one, runner.py is the autograder's per-part runner, graders/ holds each part's checks. See
docs/classroom.md.
"""

from .errors import ClassroomError, UsageError
from .grade import format_report, grade
from .make import make
from .parts import PARTS, Part

__all__ = ["PARTS", "ClassroomError", "Part", "UsageError", "format_report", "grade", "make"]
