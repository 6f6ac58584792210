"""The base of errors a user can fix: what went wrong and what to do, shown as ``problem; fix``."""

from __future__ import annotations


class FixableError(Exception):
    """An error with a ``problem`` and its ``fix`` (the message is ``"problem; fix"``)."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}")
