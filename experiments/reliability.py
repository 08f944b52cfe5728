"""How the command line behaves on malformed input, measured: the fuzz suite's generators
(``tests/reliability/``) run for many more examples than CI does.

    python experiments/reliability.py [--examples 200] [--families h5ad_bytes,onnx] [--report FILE]

Prints one JSON line: inputs tried, tracebacks, half-written outputs (a failed command that
left a file behind), other broken promises (exit status not 2, not exactly one
``stimage: error:`` line, an input modified), how many were accepted (exit 0: a tolerated
input such as a harmless bit flip), and the mean seconds to the error. ``--report`` writes
every broken promise with its command and how the input was made (JSON lines).

Deterministic: Hypothesis is derandomised (the same inputs on every run for a given
``--examples``). Cases run in a worker process with a timeout, so a hang or a crash is
counted, not fatal. ``by_bug`` counts the broken promises each open bug documented in
``tests/reliability/known_bugs.py`` accounts for; ``unexplained`` are the rest (new bugs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "reliability"))


class Tally:
    """Counts over every case, per family, per documented bug; the report file."""

    def __init__(self, report: str | None):
        self.total, self.by_bug = Counter(), Counter()
        self.families: dict[str, Counter] = {}
        self.seconds_to_error: list[float] = []
        self.report = open(report, "w") if report else None  # noqa: SIM115 — closed in close()

    def add(self, family: str, out) -> None:
        from harness import Worker
        from known_bugs import explained

        v = out.violations()
        died = out.code in (Worker.HANG, Worker.CRASH)
        fam = self.families.setdefault(family, Counter())
        bugs = explained(out) if v else []
        for c in (self.total, fam):
            c["inputs_tried"] += 1
            c["tracebacks"] += not died and (out.traceback is not None or "Traceback" in out.stderr)
            c["hangs"] += out.code == Worker.HANG
            c["crashes"] += out.code == Worker.CRASH
            c["half_written_outputs"] += out.partial
            c["inputs_modified"] += bool(out.changed_inputs)
            c["silently_different_results"] += bool(out.different_result)
            c["exit_2"] += out.code == 2
            c["accepted_exit_0"] += out.code == 0
            c["broken_promises"] += bool(v)
            c["unexplained"] += bool(v) and not bugs
        self.by_bug.update(bugs)
        if out.code == 2:
            self.seconds_to_error.append(out.seconds)
        if v and self.report:
            self.report.write(json.dumps({"bugs": bugs, "family": out.case.family, "command": out.case.command(),
                                          "input": out.case.how, "exit": out.code, "stderr": out.error_lines[-3:],
                                          "violations": v, "traceback": out.traceback}) + "\n")
            self.report.flush()

    def close(self) -> None:
        if self.report:
            self.report.close()


def explore(name: str, world, worker, tally: Tally, base: Path, examples: int, counter: list[int]) -> None:
    """Run ``examples`` derandomised Hypothesis examples of family ``name`` through ``worker``."""
    from generators import FAMILIES, new_case_dir
    from harness import run_case
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    fam = FAMILIES[name]

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None, print_blob=False,
              phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def one(data):
        counter[0] += 1
        d = new_case_dir(base / "cases", counter[0])
        try:
            try:
                case = fam.make(world, d, data.draw)
            except Exception as e:  # noqa: BLE001 — a generator's own bug: say so, do not count it as a case
                tally.total["generator_errors"] += 1
                print(f"# generator {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
                return
            tally.add(name, run_case(case, worker))
        finally:
            shutil.rmtree(d, ignore_errors=True)

    one()
    print(f"# {name}: {dict(tally.families.get(name, {}))}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=200, help="Hypothesis examples per family")
    ap.add_argument("--families", help="comma separated (default: all)")
    ap.add_argument("--report", help="write each broken promise as a JSON line here")
    ap.add_argument("--workdir", help="where to build the fixtures (default: a temporary folder)")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds before a case counts as a hang")
    a = ap.parse_args(argv)

    from generators import FAMILIES
    from harness import Worker, pin_hypothesis
    from world import build_world

    pin_hypothesis()
    os.environ.setdefault("STIMAGE_HDF5_CHECK_SECONDS", "5")  # read_h5ad's guard against h5py loops (default 20)

    names = [n.strip() for n in a.families.split(",")] if a.families else list(FAMILIES)
    base = Path(a.workdir or tempfile.mkdtemp(prefix="stimage_reliability_"))
    t0 = time.perf_counter()
    world = build_world(base / "world", cells=any(FAMILIES[n].needs_cells for n in names))
    build_s = time.perf_counter() - t0
    tally, worker, counter = Tally(a.report), Worker(a.timeout), [0]
    try:
        for name in names:
            explore(name, world, worker, tally, base, a.examples, counter)
    finally:
        worker.close()
        tally.close()
        if not a.workdir:
            shutil.rmtree(base, ignore_errors=True)
    t = tally.total
    line = {
        "inputs_tried": t["inputs_tried"],
        "tracebacks": t["tracebacks"],
        "half_written_outputs": t["half_written_outputs"],
        "mean_seconds_to_error": round(sum(tally.seconds_to_error) / max(len(tally.seconds_to_error), 1), 3),
        "hangs": t["hangs"],
        "crashes": t["crashes"],
        "inputs_modified": t["inputs_modified"],
        "silently_different_results": t["silently_different_results"],
        "exit_2": t["exit_2"],
        "accepted_exit_0": t["accepted_exit_0"],
        "broken_promises": t["broken_promises"],
        "unexplained": t["unexplained"],
        "by_bug": dict(sorted(tally.by_bug.items())),
        "generator_errors": t["generator_errors"],
        "families": len(names),
        "examples_per_family": a.examples,
        "fixture_seconds": round(build_s, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
