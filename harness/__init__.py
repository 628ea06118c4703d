"""Test harness for distckpt: simulated multi-node worlds, mini trainers, scenarios.

Submodules:

- :mod:`harness.world` -- a pool of warm rank processes that run a function as a
  ``torch.distributed`` world with the environment torchrun gives real jobs
  (:mod:`harness._rank` is the rank-process side, :mod:`harness.probes` small
  rank functions for checking it).
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
