"""One rank process of a :class:`~distckpt.testing.gloo.GlooWorld` (``python -m``).

Joins the gloo world through the file store named by ``DISTCKPT_KIT_STORE``,
then answers one JSON command per stdin line with one JSON line on stdout
until stdin closes. Its stdout carries nothing else.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from ..collectives import TorchComm
from ..patterns import pattern_from_record
from ._rankside import COORDINATOR_TIMEOUT, rank_step
from .strategies import StateSpec


def main() -> int:
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but results on the channel
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.FileStore(os.environ["DISTCKPT_KIT_STORE"], world)  # type: ignore[attr-defined]
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    comm = TorchComm(COORDINATOR_TIMEOUT)
    subgroups: dict[tuple[int, ...], Any] = {}
    for line in sys.stdin:
        command = json.loads(line)
        try:
            result = _serve(command, rank, comm, subgroups)
        except Exception as exc:  # a kit bug or a pattern that cannot be rebuilt: report, keep serving
            result = {"error": type(exc).__name__, "failures": {str(rank): str(exc)}, "phase": None,
                      "message": traceback.format_exc(limit=5)}
        out.write(json.dumps(result) + "\n")
        out.flush()
    dist.destroy_process_group()
    return 0


def _serve(command: dict[str, Any], rank: int, comm: TorchComm, subgroups: dict[tuple[int, ...], Any]) -> dict[str, Any]:
    if command["op"] == "ping":
        return {"rank": rank}
    for module in command["modules"]:
        importlib.import_module(module)
    pattern = pattern_from_record(command["pattern"]["kind"], command["pattern"]["params"])
    nodes = command["nodes"]
    os.environ["GROUP_RANK"] = str(nodes[rank])
    groups: dict[str, Any] = {}
    for name in sorted(command["groups"]):  # same order on every rank: new_group is collective
        for members in command["groups"][name]:
            key = tuple(members)
            if key not in subgroups:
                subgroups[key] = dist.new_group(list(key), backend="gloo")
            if rank in key:
                groups[name] = subgroups[key]
    sets = [tuple(s) for s in command["sets"]]
    spec = StateSpec.from_json(command["spec"])
    return rank_step(rank, pattern, sets, spec, command["out"], command["step"], comm, groups)


if __name__ == "__main__":
    sys.exit(main())
