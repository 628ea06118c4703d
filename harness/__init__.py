"""Test harness for distckpt: mini trainers, scenarios and the runner that judges them.

The worlds they run in (a pool of warm rank processes with the environment
torchrun gives real jobs) are test infrastructure shared with the test suite:
:mod:`distckpt.testing.pool`. Submodules:

- :mod:`harness.scenario` -- scenario files (TOML) parsed into frozen objects;
  :mod:`harness.patterns` imports the modules that register a scenario's own
  sharing patterns and builds pattern objects.
- :mod:`harness.trainers` -- tiny real trainers, one per parallel layout, built
  on :mod:`harness.models` and :mod:`harness.data`.
- :mod:`harness.session` -- what a rank does in the reference, save and resume worlds.
- :mod:`harness.oracle` -- the files and writers a checkpoint must hold, from
  plain data (nodes, group partitions, pattern kind and params); the one oracle
  of the harness and of ``tests/property``.
- :mod:`harness.runner` -- runs scenarios and judges them; :mod:`harness.report`
  formats the table; ``python -m harness`` is the main job.
- :mod:`harness.worker` -- the same scenarios under a real launcher (torchrun).
"""

from __future__ import annotations
