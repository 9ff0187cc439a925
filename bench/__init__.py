"""Benchmarks of the project: ``python -m bench`` (or ``tox -e bench``) runs them all.

Each ``bench_<topic>.py`` exposes ``run(quick=False) -> list[dict]``; every record compares a
figure with a baseline measured in the same run (``ratio`` = baseline / value for times, so
> 1 means faster than the baseline).
"""
