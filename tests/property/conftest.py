"""Hypothesis profiles of the property suite.

``ci`` (the default, so that the README's single test command runs it): at
least 100 examples per property, derandomized so that a run is reproducible.
``dev``: a handful of random examples for quick iteration. Select one with
``HYPOTHESIS_PROFILE=dev``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
             HealthCheck.large_base_example, HealthCheck.function_scoped_fixture]

settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=_SUPPRESS)
settings.register_profile("dev", max_examples=8, deadline=None, print_blob=True, suppress_health_check=_SUPPRESS)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
