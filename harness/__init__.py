"""Test harness for distckpt: simulated multi-node worlds, mini trainers, scenarios.

Submodules:

- :mod:`harness.world` -- a pool of warm rank processes that run a function as a
  ``torch.distributed`` world with the environment torchrun gives real jobs.
- :mod:`harness.scenario` -- scenario files (TOML) parsed into frozen objects.
- :mod:`harness.trainers` -- tiny real trainers, one per parallel layout.
- :mod:`harness.oracle` -- the files and writers a scenario must produce,
  derived from its topology alone.
- :mod:`harness.runner` -- runs scenarios and checks bit-exact resume.
- :mod:`harness.worker` -- the same scenarios under a real launcher (torchrun).
"""

from __future__ import annotations
