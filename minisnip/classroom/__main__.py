"""The command line: `python -m minisnip.classroom {make,grade} ...` (`--help` on each).

Exit status: 0 done, 2 usage error (bad arguments, a folder it refuses, an unknown part), 1 any other failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ClassroomError, UsageError
from .parts import part_names

EPILOG = """examples:
  python -m minisnip.classroom make --out assignment                       # every part
  python -m minisnip.classroom make --out week3 --parts attention keep_heads
  python -m minisnip.classroom grade assignment                            # prints scores, writes grade.json
  python -m minisnip.classroom grade submissions/alice --autograder assignment/autograder --out alice.json"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: exit status 2, no traceback
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m minisnip.classroom", epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Classroom assignments from minisnip's solution markers, and their autograder.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("make", help="write a student copy, HANDOUT.md and the autograder into a folder")
    p.add_argument("--out", type=Path, required=True,
                   help="new or empty folder, or one an earlier `make` wrote (only its files are replaced)")
    p.add_argument("--parts", nargs="+", metavar="PART",
                   help=f"parts students write (default: all): {', '.join(part_names())}")
    g = sub.add_parser("grade", help="grade a student copy: a score per part and in total, also as JSON")
    g.add_argument("folder", type=Path, help="the student copy (a folder `make` wrote)")
    g.add_argument("--out", type=Path, default=None, help="JSON report (default: FOLDER/grade.json)")
    g.add_argument("--parts", nargs="+", metavar="PART", help="grade only these parts")
    g.add_argument("--autograder", type=Path, default=None,
                   help="autograder folder to use (default: FOLDER/autograder; pass the instructor's copy)")
    g.add_argument("--time-limit", type=float, default=60.0,
                   help="seconds per part once it has imported the library (60)")
    g.add_argument("--jobs", type=int, default=None, help="parts graded at the same time (default: up to 4)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "make":
            from .make import make
            manifest = make(args.out, args.parts)
            blanked = [p["name"] for p in manifest["parts"] if p["blanked"]]
            print(f"wrote {args.out}: {len(manifest['files'])} files; students write {', '.join(blanked)}; "
                  f"see {args.out / 'HANDOUT.md'}")
            return 0
        from .grade import format_report, grade, write_report
        if args.jobs is not None and args.jobs < 1:
            raise UsageError("--jobs must be at least 1")
        report = grade(args.folder, autograder=args.autograder, parts=args.parts, time_limit=args.time_limit,
                       jobs=args.jobs)
        path = write_report(report, args.out if args.out is not None else args.folder / "grade.json")
        print(format_report(report))
        print(f"wrote {path}")
        return 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ClassroomError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a command line reports, it does not dump a traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
