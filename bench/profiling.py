"""cProfile of one distckpt save and load, in-process (world of one), for the report."""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import shutil
import tempfile
import time
from typing import Any

from .workloads import build


def profile(workload: str, scale: float, out_dir: str | None, top: int = 18) -> dict[str, Any]:
    from distckpt import CheckpointCoordinator, StateComponent

    comps = build(workload, scale, 0, 1)
    decl = [StateComponent(c.key, c.holder, c.pattern, process_group_name=c.group) for c in comps]
    tmp = tempfile.mkdtemp(prefix="distckpt-profile-", dir=out_dir)
    result: dict[str, Any] = {"workload": workload, "scale": scale}
    try:
        coord = CheckpointCoordinator(decl, output_dir=tmp)
        coord.save_checkpoint(checkpoint_id="warm")
        for what in ("save", "load"):
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            if what == "save":
                coord.save_checkpoint(checkpoint_id="profiled")
            else:
                coord.load_checkpoint(os.path.join(tmp, "checkpoints", "checkpoint-profiled"))
            prof.disable()
            wall = time.perf_counter() - t0
            text = io.StringIO()
            stats = pstats.Stats(prof, stream=text)
            stats.sort_stats("tottime").print_stats(top)
            lines = [ln for ln in text.getvalue().splitlines() if ln.strip()]
            start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
            result[what] = {"wall_s": wall, "top_tottime": lines[start:start + top + 1]}
            if out_dir:
                stats.dump_stats(os.path.join(out_dir, f"profile-{workload}-{what}.pstats"))
                with open(os.path.join(out_dir, f"profile-{workload}-{what}.txt"), "w") as f:
                    f.write(text.getvalue())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
