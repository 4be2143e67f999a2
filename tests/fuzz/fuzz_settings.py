"""Hypothesis profiles for tests/fuzz: `short` by default (the whole folder in about a
minute), `long` for `make fuzz` (HYPOTHESIS_PROFILE=long). Imported by every fuzz test.

Examples found to fail are kept in .hypothesis/ (git-ignored) and replayed first; in CI
(CI set) there is no database, so a run never depends on an earlier one.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,  # a shared machine: a slow example is not a failure
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "database": None if os.environ.get("CI") else settings.default.database,
    "print_blob": True,
}
settings.register_profile("short", max_examples=100, **_COMMON)
settings.register_profile("long", max_examples=20_000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "short"))


def examples(short: int) -> int:
    """The example count for a test whose examples are costly (a live daemon): its own
    `short` figure, scaled up in the long profile."""
    return short * 50 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else short
