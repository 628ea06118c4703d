"""Aggregation of the ranks' raw timings, goals, the stdout tables and the PNG chart."""

from __future__ import annotations

import statistics
from typing import Any

from .workloads import fmt_bytes, mesh_shape

ALTERNATIVES = ("torch.save-all", "torch.save-writers", "dcp")
LABELS = {
    "physical": "physical limit",
    "distckpt": "distckpt",
    "distckpt-nohash": "distckpt, no checksum",
    "distckpt-quick": "distckpt +validate quick",
    "distckpt-tensor": "distckpt +validate tensor",
    "distckpt-full": "distckpt +validate full",
    "torch.save-all": "torch.save, every rank",
    "torch.save-writers": "torch.save, set writers",
    "dcp": "torch DCP (FileSystem)",
    "distckpt-copyload": "distckpt, load via copy",
    "distckpt-bcast": "distckpt, read + broadcast",
    "distckpt-balanced": "distckpt, balanced writes",
    "distckpt-whole": "distckpt, whole files",
    "distckpt-direct": "distckpt, direct_io",
    "distckpt-async": "distckpt async_save",
    "distckpt-async-budget": "distckpt async, 1/4 budget",
    "distckpt-async-staged": "distckpt async, bg staging",
    "proto-async": "proto: async save",
}
PATTERNS = {"big": "REPLICATED", "small": "REPLICATED", "hybrid": 'PER_GROUP("dp")', "rng": "PER_RANK",
            "huge": "REPLICATED"}


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _slowest(per_rank: list[list[dict[str, Any]]], warmup: int, key: str = "s") -> list[float]:
    reps = len(per_rank[0])
    return [max(r[i].get(key, 0.0) for r in per_rank) for i in range(warmup, reps)]


def _phases(per_rank: list[list[dict[str, Any]]], warmup: int) -> dict[str, float] | None:
    """Median over repetitions of the slowest rank's time in each distckpt phase."""
    if not all("phases" in x for p in per_rank for x in p[warmup:]) or not per_rank[0][warmup:]:
        return None
    names = list(per_rank[0][warmup]["phases"])
    reps = len(per_rank[0])
    return {n: _median([max(p[i]["phases"].get(n, 0.0) for p in per_rank) for i in range(warmup, reps)])
            for n in names}


def aggregate(workload: str, world: int, nodes: int, scale: float, warmup: int,
              ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One case from every rank's raw result; the world ran as ``nodes`` nodes of ``world // nodes`` ranks."""
    r0 = ranks[0]
    methods: dict[str, dict[str, Any]] = {}
    for m in r0["methods"]:
        row: dict[str, Any] = {"label": LABELS.get(m, m)}
        if m in r0["saves"]:
            per = [r["saves"][m] for r in ranks]
            reps = _slowest(per, warmup)
            row.update(save_s=_median(reps), save_reps=reps, written=r0["written"].get(m), files=r0["files"].get(m),
                       save_peak_rss=max(x["peak"] for p in per for x in p[warmup:]),
                       save_rss_delta=max(x["peak"] - x["base"] for p in per for x in p[warmup:]))
            if m in ("proto-async", "distckpt-async", "distckpt-async-budget", "distckpt-async-staged"):
                row["blocking_reps"] = _slowest(per, warmup, "blocking_s")
                row["blocking_s"] = _median(row["blocking_reps"])
                if m == "distckpt-async-staged":
                    row["staged_reps"] = _slowest(per, warmup, "staged_s")
                    row["staged_s"] = _median(row["staged_reps"])
            row["save_phases"] = _phases(per, warmup)
        if m in r0["loads"]:
            per = [r["loads"][m] for r in ranks]
            reps = _slowest(per, warmup)
            row.update(load_s=_median(reps), load_reps=reps,
                       load_peak_rss=max(x["peak"] for p in per for x in p[warmup:]),
                       load_rss_delta=max(x["peak"] - x["base"] for p in per for x in p[warmup:]))
            row["load_phases"] = _phases(per, warmup)
            if m != "physical":
                row["verified"] = all(r["verified"].get(m, False) for r in ranks)
        methods[m] = row
    case: dict[str, Any] = {
        "workload": workload, "world": world, "nodes": nodes, "procs_per_node": world // nodes,
        "pattern": PATTERNS.get(workload, ""),
        "mesh": "dp{}xtp{}".format(*mesh_shape(world)) if workload == "hybrid" else None,
        "scale": scale, "rank_bytes": r0["rank_bytes"], "rank_tensors": r0["rank_tensors"],
        "unique_bytes": r0["unique"], "cold_reads": bool(r0.get("cold")),
        "hash_write_s": max(r["hash"]["write_s"] for r in ranks),
        "hash_read_s": max(r["hash"]["read_s"] for r in ranks),
        "copy_write_s": max(r.get("copy_s", 0.0) for r in ranks),
        "methods": methods,
    }
    _ratios(case)
    return case


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b != b or a != a or b <= 0:
        return None
    return a / b


def _ratios(case: dict[str, Any]) -> None:
    ms = case["methods"]
    phys = ms.get("physical", {})
    for row in ms.values():
        row["save_x_phys"] = _ratio(row.get("save_s"), phys.get("save_s"))
        row["load_x_phys"] = _ratio(row.get("load_s"), phys.get("load_s"))
        row["written_x_unique"] = _ratio(row.get("written"), case["unique_bytes"])
        row["save_MBps"] = _ratio(case["unique_bytes"] / 1e6, row.get("save_s"))
        row["load_MBps"] = _ratio(case["unique_bytes"] / 1e6, row.get("load_s"))
    d = ms.get("distckpt", {})
    # speedup_vs[alt] = alt time / distckpt time: > 1 means distckpt is faster.
    d["speedup_vs"] = {
        alt: {"save": _ratio(ms[alt].get("save_s"), d.get("save_s")),
              "load": _ratio(ms[alt].get("load_s"), d.get("load_s"))}
        for alt in (*ALTERNATIVES, "physical") if alt in ms
    }
    over: dict[str, Any] = {}
    for level in ("quick", "tensor", "full"):
        v = ms.get(f"distckpt-{level}")
        if v is not None:
            over[f"validate_{level}"] = _minus1(_ratio(v.get("save_s"), d.get("save_s")))
            # The validate phase's own time (slowest rank), immune to the disk's noise.
            over[f"validate_{level}_phase"] = _ratio((v.get("save_phases") or {}).get("validate"), d.get("save_s"))
    nh = ms.get("distckpt-nohash")
    if nh is not None:
        over["checksum_save"] = _minus1(_ratio(d.get("save_s"), nh.get("save_s")))
        over["checksum_load"] = _minus1(_ratio(d.get("load_s"), nh.get("load_s")))
    over["xxh3_est_save"] = _ratio(case["hash_write_s"], d.get("save_s"))
    over["xxh3_est_load"] = _ratio(case["hash_read_s"], d.get("load_s"))
    case["overheads"] = over
    case["variants"] = _variant_ratios(ms)
    pa = ms.get("distckpt-async") or ms.get("proto-async")
    if pa is not None:
        case["async_blocking_x_sync"] = _ratio(pa.get("blocking_s"), d.get("save_s"))
        case["async_impl"] = "library" if "distckpt-async" in ms else "bench prototype"


def _variant_ratios(ms: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Each distckpt variant's time / the default distckpt row's (> 1 = the variant is slower)."""
    d = ms.get("distckpt", {})

    def x(m: str, what: str) -> float | None:
        return _ratio(ms.get(m, {}).get(f"{what}_s"), d.get(f"{what}_s"))

    return {"copyload_load": x("distckpt-copyload", "load"), "bcast_load": x("distckpt-bcast", "load"),
            "balanced_save": x("distckpt-balanced", "save"), "balanced_load": x("distckpt-balanced", "load"),
            "whole_save": x("distckpt-whole", "save"), "whole_load": x("distckpt-whole", "load")}


def _minus1(x: float | None) -> float | None:
    return None if x is None else x - 1.0


def case_name(c: dict[str, Any]) -> str:
    """``big/w4``, or ``big/w4/n2`` for a world of 4 ranks run as 2 nodes."""
    nodes = c.get("nodes", 1)
    return f"{c['workload']}/w{c['world']}" + (f"/n{nodes}" if nodes > 1 else "")


def layout(c: dict[str, Any]) -> str:
    """``2 nodes x 4 ranks``: how the case's world was laid out."""
    nodes = c.get("nodes", 1)
    ppn = c["world"] // nodes
    return f"{nodes} node{'s' * (nodes > 1)} x {ppn} rank{'s' * (ppn > 1)}"


# ------------------------------------------------------------------- goals

def _reps(c: dict[str, Any], m: str, what: str) -> list[float]:
    return list(c["methods"].get(m, {}).get(f"{what}_reps") or [])


def _rep_ratios(c: dict[str, Any], num: str, den: str, what: str) -> list[float]:
    """Repetition by repetition (the methods run interleaved): ``num`` time / ``den`` time."""
    return [a / b for a, b in zip(_reps(c, num, what), _reps(c, den, what), strict=False) if b > 0]


def _stats(xs: list[float]) -> tuple[float, float, float] | None:
    return (min(xs), statistics.median(xs), max(xs)) if xs else None


def goals15(cases: list[dict[str, Any]], paper: dict[str, Any] | None = None,
            floor: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The goals of issue 15, each judged on the median of its cases' repetitions (worst case
    shown), with min / median / max over every repetition of every case it covers; the scale
    goals come from ``paper`` (:func:`bench.paper.run`'s result), when it was measured."""
    out: list[dict[str, Any]] = []

    def goal(name: str, target: str, per_case: list[tuple[str, list[float]]], limit: float | None,
             higher_is_better: bool = False, min_floor: float | None = None, note: str = "") -> None:
        per_case = [(n, xs) for n, xs in per_case if xs]
        if not per_case:
            out.append({"goal": name, "target": target, "met": None, "worst": None, "case": None,
                        "stats": None, "note": note or "not measured"})
            return
        medians = [(statistics.median(xs), n) for n, xs in per_case]
        v, case = (min if higher_is_better else max)(medians)
        met: bool | None = None if limit is None else v >= limit if higher_is_better else v <= limit
        every = [x for _, xs in per_case for x in xs]
        if min_floor is not None and min(every) < min_floor:
            met = False
        out.append({"goal": name, "target": target, "met": met, "worst": v, "case": case,
                    "stats": _stats(every), "note": note})

    def us_per_tensor(c: dict[str, Any], what: str) -> list[float]:
        return [1e6 * t / c["rank_tensors"] for t in _reps(c, "distckpt", what)]

    small1 = [c for c in cases if c["workload"] == "small" and c["world"] == 1]
    small = [c for c in cases if c["workload"] == "small"]
    big1 = [c for c in cases if c["workload"] == "big" and c["world"] == 1]
    big124 = [c for c in cases if c["workload"] == "big" and c["world"] in (1, 2, 4)]
    huge = [c for c in cases if c["workload"] == "huge"]
    goal("small w1: save <= 12 us per tensor", "<= 12 us",
         [(case_name(c), us_per_tensor(c, "save")) for c in small1], 12.0)
    goal("small w1: save <= 1.5x raw write of the same bytes", "<= 1.5",
         [(case_name(c), _rep_ratios(c, "distckpt", "physical", "save")) for c in small1], 1.5)
    goal("small w1: load <= 4 us per tensor", "<= 4 us",
         [(case_name(c), us_per_tensor(c, "load")) for c in small1], 4.0)
    goal("small w1: load <= 3x raw read of the same bytes", "<= 3",
         [(case_name(c), _rep_ratios(c, "distckpt", "physical", "load")) for c in small1], 3.0)
    out.extend(_floor_rows(floor))
    goal("small: >= 10x faster than DCP, save (every world)", ">= 10",
         [(case_name(c), _rep_ratios(c, "dcp", "distckpt", "save")) for c in small], 10.0, True)
    goal("small: >= 10x faster than DCP, load (every world)", ">= 10",
         [(case_name(c), _rep_ratios(c, "dcp", "distckpt", "load")) for c in small], 10.0, True)
    goal("big w1: save <= 1.1x fsync'd single-writer limit", "<= 1.1",
         [(case_name(c), _rep_ratios(c, "distckpt", "physical", "save")) for c in big1], 1.1)
    goal("big w1: load <= 1.25x raw read into torch buffers", "<= 1.25",
         [(case_name(c), _rep_ratios(c, "distckpt", "physical", "load")) for c in big1], 1.25)
    goal("big w1,2,4: save >= 1.2x faster than DCP (median), no rep < 1.0", ">= 1.2",
         [(case_name(c), _rep_ratios(c, "dcp", "distckpt", "save")) for c in big124], 1.2, True, min_floor=1.0)
    goal("big w1,2,4, direct_io=True: save >= 1.2x faster than DCP, no rep < 1.0", ">= 1.2",
         [(case_name(c), _rep_ratios(c, "dcp", "distckpt-direct", "save")) for c in big124], 1.2, True,
         min_floor=1.0, note="O_DIRECT writes: the page cache's stalls from one save to the next are gone")
    for alt in ("dcp", "torch.save-writers"):
        for what in ("save", "load"):
            goal(f"huge: faster than {LABELS[alt]}, {what}", "> 1",
                 [(case_name(c), _rep_ratios(c, alt, "distckpt", what)) for c in huge], 1.0, True)
    async_cases = [c for c in cases if c["workload"] != "rng"]
    goal("async: blocking <= 25% of a sync save, every world", "<= 0.25",
         [(case_name(c), _async_ratios(c)) for c in async_cases], 0.25)
    goal("async: one bare copy of the bytes a rank writes / sync save", "(shown)",
         [(case_name(c), [c["copy_write_s"] / s for s in _reps(c, "distckpt", "save") if s > 0])
          for c in async_cases if c.get("copy_write_s") and _async_ratios(c)], None,
         note="not a goal: the floor of the row above, which copies the whole state before returning")
    goal("async, background staging: call returns <= 25% of a sync save", "<= 0.25",
         [(case_name(c), _async_ratios(c, "distckpt-async-staged")) for c in async_cases], 0.25,
         note="the copy goes on after the call, overlapping the trainer's forward and backward")
    goal("async, background staging: staged (wait_staged at once) / sync save", "(shown)",
         [(case_name(c), _async_ratios(c, "distckpt-async-staged", "staged")) for c in async_cases], None,
         note="not a goal: the copy's own time, what a trainer with no forward/backward to overlap waits")
    out.extend(_scale_goals(paper))
    return out


def _floor_rows(floor: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Two rows shown beside the small-load goals, not judged: the floor of a safe Python load
    (:func:`bench.micro.load_floor`, in-process) per tensor and against the raw read it measured
    in the same process. Nothing when the run did not measure it."""
    if not floor:
        return []
    raw = floor["raw read of the files, one buffer"][1]
    note = ("not a goal: bench.micro floor, in-process and warm; builds no state dict and calls no "
            "load_state_dict")
    return [
        {"goal": "small w1: floor of a safe Python load, us per tensor", "target": "(shown)", "met": None,
         "worst": 1e6 * floor["floor"] / floor["tensors"], "case": "in-process", "stats": None, "note": note},
        {"goal": "small w1: floor of a safe Python load / raw read", "target": "(shown)", "met": None,
         "worst": floor["floor"] / raw if raw > 0 else None, "case": "in-process", "stats": None,
         "note": f"distckpt in the same process: {floor['distckpt load_checkpoint'][1] / floor['floor']:.2f}x the floor"},
    ]


def _scale_goals(paper: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The scale goals of issue 15 from the paper bench: bytes a rank receives in the plan phase
    at 16,384 ranks (on the wire when the paper bench reports it, otherwise the pickled payload,
    said in the note), topology + plan + manifest at 65,536 ranks, and whether writing plus
    parsing the manifest grows linearly (time per file at 65,536 over time per file at 16,384)."""
    plans = {p["world"]: p for p in (paper or {}).get("plans", [])}
    mib = 1024 * 1024
    out: list[dict[str, Any]] = []

    def row(name: str, target: str, value: float | None, limit: float, stats: Any = None, case: str | None = None,
            note: str = "") -> None:
        met = None if value is None else value <= limit
        out.append({"goal": name, "target": target, "met": met, "worst": value, "case": case if value is not None
                    else None, "stats": stats, "note": note if value is not None else "not measured"})

    p16 = plans.get(16384)
    wire = p16 and p16.get("plan_phase_wire_per_rank")
    payload = p16 and p16.get("plan_phase_received_per_rank")
    row("scale: plan-phase bytes received per rank at 16,384 ranks (MiB)", "<= 2 MiB",
        (wire or payload) / mib if (wire or payload) else None, 2.0, case="paper/16384",
        note="on the wire (transport framing and padding included)" if wire
        else "pickled payload only: the paper bench did not report wire bytes")
    p65 = plans.get(65536)
    st = (p65 or {}).get("stats", {}).get("topology_plan_manifest_s")
    best = (p65 or {}).get("topology_plan_manifest_s")
    row("scale: topology + plan + manifest at 65,536 ranks (s)", "< 1 s",
        st["median"] if st else best, 1.0, (st["min"], st["median"], st["max"]) if st else None, "paper/65536",
        note="" if st else "best repetition only: this run kept no per-repetition figures")
    if p16 and p65:
        def per_file(p: dict[str, Any]) -> float:
            return (p["to_json_s"] + p["from_json_s"]) / p["files"]
        row("scale: manifest write+parse per file, 65,536 vs 16,384 ranks", "<= 1.25",
            per_file(p65) / per_file(p16), 1.25, case="paper", note="best of the repetitions at each size")
    else:
        row("scale: manifest write+parse per file, 65,536 vs 16,384 ranks", "<= 1.25", None, 1.25)
    return out


def _async_ratios(c: dict[str, Any], m: str | None = None, what: str = "blocking") -> list[float]:
    """Per repetition: an async row's blocking (or staged) time / the sync save's time; the row is
    ``distckpt-async`` (or the bench's prototype) unless ``m`` names one."""
    if m is None:
        m = "distckpt-async" if "distckpt-async" in c["methods"] else "proto-async"
    blocking = c["methods"].get(m, {}).get(f"{what}_reps") or []
    return [b / s for b, s in zip(blocking, _reps(c, "distckpt", "save"), strict=False) if s > 0]



def goals(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def worst(name: str, target: str, values: list[tuple[float, str]], limit: float, higher_is_better: bool = False,
              note: str = "") -> None:
        values = [(v, c) for v, c in values if v is not None]
        if not values:
            out.append({"goal": name, "target": target, "met": None, "worst": None, "case": None, "note": "not measured"})
            return
        v, c = (min if higher_is_better else max)(values)
        met = v >= limit if higher_is_better else v <= limit
        out.append({"goal": name, "target": target, "met": met, "worst": v, "case": c, "note": note})

    def d(c: dict[str, Any]) -> dict[str, Any]:
        return c["methods"].get("distckpt", {})

    worst("save big <= 1.25x physical write", "<= 1.25", [(d(c).get("save_x_phys"), case_name(c)) for c in cases
                                                           if c["workload"] == "big"], 1.25)
    worst("save small <= 2x physical write", "<= 2.0", [(d(c).get("save_x_phys"), case_name(c)) for c in cases
                                                         if c["workload"] == "small"], 2.0)
    worst("faster than DCP, save, every case", "speed-up > 1",
          [(d(c)["speedup_vs"].get("dcp", {}).get("save"), case_name(c)) for c in cases], 1.0, True)
    worst("faster than DCP, load, every case", "speed-up > 1",
          [(d(c)["speedup_vs"].get("dcp", {}).get("load"), case_name(c)) for c in cases], 1.0, True)
    worst(">= 5x faster than DCP on small, save", "speed-up >= 5",
          [(d(c)["speedup_vs"].get("dcp", {}).get("save"), case_name(c)) for c in cases if c["workload"] == "small"],
          5.0, True)
    worst(">= 5x faster than DCP on small, load", "speed-up >= 5",
          [(d(c)["speedup_vs"].get("dcp", {}).get("load"), case_name(c)) for c in cases if c["workload"] == "small"],
          5.0, True)
    worst("load <= 1.25x physical read (big, small, hybrid)", "<= 1.25",
          [(d(c).get("load_x_phys"), case_name(c)) for c in cases if c["workload"] != "rng"], 1.25,
          note="rng (a few KiB per rank) is all fixed cost and is reported, not judged")
    worst("load <= 1.25x physical read, world 1 only", "<= 1.25",
          [(d(c).get("load_x_phys"), case_name(c)) for c in cases if c["workload"] != "rng" and c["world"] == 1], 1.25)
    worst("TENSOR validation adds <= 10% to a save (difference of medians)", "<= 0.10",
          [(c["overheads"].get("validate_tensor"), case_name(c)) for c in cases if c["workload"] != "rng"], 0.10)
    worst("TENSOR validation adds <= 10% to a save (validate phase / save)", "<= 0.10",
          [(c["overheads"].get("validate_tensor_phase"), case_name(c)) for c in cases if c["workload"] != "rng"], 0.10)
    worst("checksums add <= 5% to a save (no-hash run)", "<= 0.05",
          [(c["overheads"].get("checksum_save"), case_name(c)) for c in cases if c["workload"] != "rng"], 0.05)
    worst("checksums add <= 5% to a save (xxh3 timed on the same bytes)", "<= 0.05",
          [(c["overheads"].get("xxh3_est_save"), case_name(c)) for c in cases if c["workload"] != "rng"], 0.05)
    worst("checksums add <= 5% to a load (xxh3 timed on the same bytes)", "<= 0.05",
          [(c["overheads"].get("xxh3_est_load"), case_name(c)) for c in cases if c["workload"] != "rng"], 0.05,
          note="not a goal of the issue; shown for completeness")
    rep = [c for c in cases if c["pattern"] == "REPLICATED"]
    worst("REPLICATED writes one copy (bytes written / unique tensor bytes)", "<= 1.05",
          [(d(c).get("written_x_unique"), case_name(c)) for c in rep], 1.05,
          note="the excess is the safetensors header, typed skeleton and manifest")
    spreads = []
    for w in ("big", "small"):
        # per unique byte: the memory budget may shrink the state of the larger worlds
        ratios = [d(c).get("written_x_unique") for c in rep if c["workload"] == w and d(c).get("written_x_unique")]
        if len(ratios) > 1:
            spreads.append((max(ratios) / min(ratios) - 1, f"{w}/all worlds"))
    worst("REPLICATED bytes written per unique byte independent of world size", "<= 0.01", spreads, 0.01)
    impl = {c.get("async_impl") for c in cases if c.get("async_impl")}
    worst("async save blocks <= 25% of a sync save (big)", "<= 0.25",
          [(c.get("async_blocking_x_sync"), case_name(c)) for c in cases if c["workload"] == "big"], 0.25,
          note="measured on the bench prototype, not on the library's async_save" if impl == {"bench prototype"}
          else "")
    return out


# ------------------------------------------------------------------- text

def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None or x != x else fmt.format(x)


def case_table(c: dict[str, Any]) -> str:
    title = (f"== {c['workload']}  world={c['world']} ({layout(c)})  {c['pattern']}"
             + (f" {c['mesh']}" if c["mesh"] else "")
             + f"  scale={c['scale']:.3g}  state/rank={fmt_bytes(c['rank_bytes'])} in {c['rank_tensors']} tensors"
             + f"  unique={fmt_bytes(c['unique_bytes'])}  reads={'cold' if c['cold_reads'] else 'warm'}")
    head = (f"{'method':<26}{'save s':>9}{'x phys':>8}{'MB/s':>8}{'load s':>9}{'x phys':>8}{'MB/s':>8}"
            f"{'written':>11}{'files':>6}{'x uniq':>8}{'peakRSS save/load MiB':>23}{'dRSS s/l':>12}  ok")
    lines = [title, head]
    for _m, r in c["methods"].items():
        rss = (f"{_f(r.get('save_peak_rss') and r['save_peak_rss'] / 2**20, '{:.0f}')}/"
               f"{_f(r.get('load_peak_rss') and r['load_peak_rss'] / 2**20, '{:.0f}')}")
        drss = (f"{_f((r.get('save_rss_delta') is not None and r['save_rss_delta'] / 2**20) or None, '{:.0f}')}/"
                f"{_f((r.get('load_rss_delta') is not None and r['load_rss_delta'] / 2**20) or None, '{:.0f}')}")
        ok = {True: "yes", False: "NO", None: ""}[r.get("verified")]
        extra = f"  blocking {_f(r['blocking_s'])} s" if "blocking_s" in r else ""
        extra += f", staged {_f(r['staged_s'])} s" if "staged_s" in r else ""
        lines.append(
            f"{r['label']:<26}{_f(r.get('save_s')):>9}{_f(r.get('save_x_phys'), '{:.2f}'):>8}"
            f"{_f(r.get('save_MBps'), '{:.0f}'):>8}{_f(r.get('load_s')):>9}{_f(r.get('load_x_phys'), '{:.2f}'):>8}"
            f"{_f(r.get('load_MBps'), '{:.0f}'):>8}"
            f"{(fmt_bytes(r['written']) if r.get('written') is not None else '-'):>11}"
            f"{_f(r.get('files'), '{:.0f}'):>6}"
            f"{_f(r.get('written_x_unique'), '{:.3f}'):>8}{rss:>23}{drss:>12}  {ok}{extra}")
    return "\n".join(lines)


def summary_tables(cases: list[dict[str, Any]]) -> str:
    lines = ["", "== distckpt speed-up over each alternative (alternative time / distckpt time; > 1 = distckpt faster)",
             f"{'case':<14}" + "".join(f"{LABELS[a] + ' save/load':>36}" for a in ALTERNATIVES)
             + f"{'x physical save/load':>24}"]
    for c in cases:
        sv = c["methods"].get("distckpt", {}).get("speedup_vs", {})
        cells = "".join(f"{_f(sv.get(a, {}).get('save'), '{:.2f}') + ' / ' + _f(sv.get(a, {}).get('load'), '{:.2f}'):>36}"
                        for a in ALTERNATIVES)
        d = c["methods"].get("distckpt", {})
        phys = _f(d.get("save_x_phys"), "{:.2f}") + " / " + _f(d.get("load_x_phys"), "{:.2f}")
        lines.append(f"{case_name(c):<14}{cells}{phys:>24}")
    lines += ["", "== where a distckpt save / load spends its time (slowest rank per phase, median, ms; "
              "a phase ends with its all-gather)",
              f"{'case':<14}{'save total':>11}{'plan':>8}{'validate':>10}{'write':>8}{'commit':>8}   "
              f"{'(tensor: validate)':>18}{'load total':>12}{'resolve':>9}{'read':>8}"]
    for c in cases:
        d = c["methods"].get("distckpt", {})
        sp, lp = d.get("save_phases") or {}, d.get("load_phases") or {}
        tv = (c["methods"].get("distckpt-tensor", {}).get("save_phases") or {}).get("validate")

        def ms(x: float | None) -> str:
            return _f(None if x is None else 1e3 * x, "{:.1f}")

        lines.append(f"{case_name(c):<14}{ms(d.get('save_s')):>11}{ms(sp.get('plan')):>8}"
                     f"{ms(sp.get('validate')):>10}{ms(sp.get('write')):>8}{ms(sp.get('commit')):>8}   {ms(tv):>18}"
                     f"{ms(d.get('load_s')):>12}{ms(lp.get('resolve')):>9}{ms(lp.get('read')):>8}")
    lines += ["", "== cost of validation and checksums (fraction added to a distckpt save or load; differences of "
              "medians are at the mercy of the disk's noise, 'tensor phase' and 'xxh3' are direct measurements)",
              f"{'case':<14}{'quick':>8}{'tensor':>8}{'full':>8}{'tensor phase':>14}{'cksum save':>12}{'cksum load':>12}"
              f"{'xxh3 save':>11}{'xxh3 load':>11}{'async blk/sync':>16}"]
    for c in cases:
        o = c["overheads"]

        def pct(x: float | None) -> str:
            return _f(None if x is None else 100 * x, "{:+.1f}%")

        lines.append(f"{case_name(c):<14}{pct(o.get('validate_quick')):>8}"
                     f"{pct(o.get('validate_tensor')):>8}{pct(o.get('validate_full')):>8}"
                     f"{pct(o.get('validate_tensor_phase')):>14}"
                     f"{pct(o.get('checksum_save')):>12}{pct(o.get('checksum_load')):>12}"
                     f"{pct(o.get('xxh3_est_save')):>11}{pct(o.get('xxh3_est_load')):>11}"
                     f"{_f(c.get('async_blocking_x_sync'), '{:.2f}'):>16}")
    return "\n".join([*lines, *_variants_table(cases)])


def _variants_table(cases: list[dict[str, Any]]) -> list[str]:
    """The distckpt variants against the default distckpt row (time / default time; > 1 = slower)."""
    if not any(c.get("variants") and any(v is not None for v in c["variants"].values()) for c in cases):
        return []
    lines = ["", "== distckpt options (variant time / default distckpt time; > 1 = the default is faster; "
             "balanced = min_part_bytes 1 MiB, whole = no parts)",
             f"{'case':<14}{'load via copy':>15}{'read + bcast':>14}{'balanced save':>15}{'balanced load':>15}"
             f"{'whole save':>12}{'whole load':>12}{'files balanced/default/whole':>30}"]
    for c in cases:
        v, ms = c.get("variants") or {}, c["methods"]
        files = " / ".join(_f(ms.get(m, {}).get("files"), "{:.0f}")
                           for m in ("distckpt-balanced", "distckpt", "distckpt-whole"))
        lines.append(f"{case_name(c):<14}{_f(v.get('copyload_load'), '{:.2f}'):>15}{_f(v.get('bcast_load'), '{:.2f}'):>14}"
                     f"{_f(v.get('balanced_save'), '{:.2f}'):>15}{_f(v.get('balanced_load'), '{:.2f}'):>15}"
                     f"{_f(v.get('whole_save'), '{:.2f}'):>12}{_f(v.get('whole_load'), '{:.2f}'):>12}{files:>30}")
    return lines


def goals_table(gs: list[dict[str, Any]], title: str = "goals of issue 5", loads: list[float] | None = None) -> str:
    lines = ["", f"== {title}" + (f" (load average over the cases: min {min(loads):.2f}, median "
                                  f"{statistics.median(loads):.2f}, max {max(loads):.2f})" if loads else ""),
             f"{'goal':<66}{'target':>15}{'measured':>10}  {'min / median / max':<26}{'case':<18}met"]
    for g in gs:
        met = {True: "MET", False: "NOT MET", None: "n/a"}[g["met"]]
        st = g.get("stats")
        spread = " / ".join(_f(x, "{:.2f}") for x in st) if st else "-"
        lines.append(f"{g['goal']:<66}{g['target']:>15}{_f(g['worst'], '{:.3f}'):>10}  {spread:<26}"
                     f"{g['case'] or '-'!s:<18}{met}" + (f"  ({g['note']})" if g.get("note") else ""))
    return "\n".join(lines)


def _resolve_bytes(r: dict[str, Any]) -> float:
    """What a load's resolve phase delivers to each rank: the reports' all-gather and the manifest's
    broadcast (results before session 8 sized an all_gather_object of the manifest instead)."""
    return float(r.get("resolve_received_per_rank", r.get("resolve_gather_received_per_rank", 0)))


def paper_table(p: dict[str, Any]) -> str:
    lines = ["", "== scale on paper (in-process; DP x PP x TP mesh, 8 ranks/node, 6 components)",
             f"{'ranks':>7}{'mesh':>14}{'files':>7}{'topology':>10}{'plan':>9}{'manifest':>10}{'to_json':>9}"
             f"{'from_json':>10}{'all 5':>9}{'manifest':>11}{'plan gather rx/rank':>21}{'(before)':>11}"
             f"{'resolve rx/rank':>17}"]
    for r in p["plans"]:
        mesh = "{dp}x{pp}x{tp}".format(**r["mesh"])
        lines.append(f"{r['world']:>7}{mesh:>14}{r['files']:>7}{r['topology_s'] * 1e3:>8.1f}ms{r['plan_s'] * 1e3:>7.1f}ms"
                     f"{r['manifest_build_s'] * 1e3:>8.1f}ms{r['to_json_s'] * 1e3:>7.1f}ms{r['from_json_s'] * 1e3:>8.1f}ms"
                     f"{r.get('topology_plan_manifest_s', float('nan')) * 1e3:>7.0f}ms"
                     f"{fmt_bytes(r['manifest_bytes']):>11}{fmt_bytes(r['plan_gather_received_per_rank']):>21}"
                     f"{fmt_bytes(r.get('plan_gather_received_per_rank_before', 0)):>11}"
                     f"{fmt_bytes(_resolve_bytes(r)):>17}")
    for r in p["plans"]:
        if "plan_phase_received_per_rank" in r:
            lines.append(f"{r['world']:>7} ranks: plan phase received per rank (report + plan digest all-gathers, "
                         f"decision broadcast) {fmt_bytes(r['plan_phase_received_per_rank'])}")
        for name, st in r.get("stats", {}).items():
            lines.append(f"{'':>9}{name:<26} min {st['min'] * 1e3:8.1f} ms  median {st['median'] * 1e3:8.1f} ms  "
                         f"max {st['max'] * 1e3:8.1f} ms  ({r.get('repeats', '?')} repetitions)")
    col = p["collectives"]
    lines.append(f"collectives per rank (world {col['world']}): "
                 + "; ".join(f"{n} components: " + ", ".join(f"{k}={v}" for k, v in row.items())
                             for n, row in col["by_components"].items())
                 + f"  -> constant in the number of components: {col['constant']}")
    if "payload_10k_tensors_validated" in col:
        lines.append("largest per-rank payload of each all-gather, validated save of 10,000 tensors: "
                     + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in col["payload_10k_tensors_validated"].items())
                     + "; received per rank at 16,384 ranks: "
                     + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in col["payload_rx_per_rank_at_16384"].items()))
    return "\n".join(lines)


# ------------------------------------------------------------------- chart

def chart(cases: list[dict[str, Any]], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    methods = [m for m in ("distckpt", "distckpt-tensor", "torch.save-all", "torch.save-writers", "dcp",
                           "distckpt-copyload", "distckpt-bcast", "distckpt-balanced", "distckpt-whole")
               if any(m in c["methods"] for c in cases)]
    names = [case_name(c).replace("/", "\n") for c in cases]
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 0.9 * len(cases) + 3), 9), sharex=True)
    width = 0.8 / max(1, len(methods))
    for ax, what in zip(axes, ("save", "load"), strict=False):
        for i, m in enumerate(methods):
            ys = [c["methods"].get(m, {}).get(f"{what}_x_phys") or 0 for c in cases]
            xs = [k + (i - len(methods) / 2 + 0.5) * width for k in range(len(cases))]
            ax.bar(xs, ys, width=width, label=LABELS.get(m, m))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(1.25, color="red", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")
        ax.set_ylabel(f"{what} time / physical limit")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, ncol=4)
    axes[1].set_xticks(range(len(cases)))
    axes[1].set_xticklabels(names, fontsize=8)
    axes[0].set_title("distckpt and alternatives, time relative to one sequential write/read of the unique bytes "
                      "(lower is better; dashed = 1.25x goal)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
