"""Reliability tests (issue 9): faults, bad input, overload and long runs, with nothing lost."""
