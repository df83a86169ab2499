"""One grader per part, named like the part: `make_cases()` (run by `make` on the full library; its result is
stored as the reference values) and `test_*(data)` checks (run by `grade` on a student copy, in the order
written; each raises AssertionError with a message that says what is wrong). `make` copies these files into
the student folder's autograder/."""
