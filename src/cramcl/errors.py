"""Errors that map to the CLI's exit codes (2 = bad input, 1 = internal error)."""
from __future__ import annotations


class BadInputError(Exception):
    """Bad config, data or arguments. Carries one line per problem.

    Each problem names the file, the record (index or id) where there is one, and what is wrong,
    e.g. ``"data/shape/train.json: record 3 (id 'a7'): image 'x.png' not found"``.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class TrainingFault(Exception):
    """Training went wrong in a way no input check could foresee (a NaN or infinite loss, gradient or
    weight). Exit 1 with one line naming the task, the step and what was not finite; no checkpoint holding
    the fault is written, so the last good one stays the resume point."""
