"""Long fuzz runs of tests/fuzz/targets.py: each target in a process of its own, under a memory
bound, for a number of inputs or minutes; a table of what happened, and every finding written out
(copy the ones you fix into tests/fuzz/regressions/<target>/ so the suite replays them).

Usage: python tools/fuzz.py [--inputs N] [--minutes M] [--memory-gb G] [--out DIR] [--seed S] [TARGET ...]
Not the suite's short pass (tests/fuzz/test_fuzz.py runs a seeded 150 inputs of each).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "fuzz"))

import targets as T  # noqa: E402


def _address_space() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) << 10
    raise RuntimeError("no VmSize in /proc/self/status")


def child(name: str, inputs: int, minutes: float, memory_gb: float | None, out: Path, seed: int) -> None:
    """One target's run, in this process: a warm-up on the seeds (the thread pool, caches and the
    server start here), then batches of inputs until the count or the time is reached, what each
    input adds to the resident set at its peak checked against T.memory_bound(its size), and the
    address space capped at what the process had after the warm-up plus twice the bound for the
    largest seed (or --memory-gb)."""
    world = T.make_world()
    T.run(world, name, 200, seed=-1 - seed)
    largest = max(len(s) for s in world.seeds[name]) + 4096   # mutations add at most a few KB
    limit = int(memory_gb * (1 << 30)) if memory_gb else _address_space() + 2 * T.memory_bound(largest)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    memory = T.MemoryProbe()
    growth = 0
    deadline = time.time() + 60 * minutes
    done = expected = 0
    slowest = 0.0
    findings = []
    start = time.time()
    batch = 0
    while done < inputs and time.time() < deadline and len(findings) < 50:
        n = min(2000, inputs - done)
        report = T.run(world, name, n, seed=seed * 1_000_003 + batch, max_findings=50 - len(findings),
                       memory=memory)
        growth = max(growth, report.largest_growth)
        batch += 1
        done += report.inputs
        expected += report.expected_errors
        slowest = max(slowest, report.slowest_s)
        for kind, detail, data in report.findings:
            digest = hashlib.sha1(data).hexdigest()[:12]
            path = out / name / f"{kind}-{digest}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            findings.append({"kind": kind, "detail": detail, "file": str(path)})
    print(json.dumps({"target": name, "inputs": done, "address_space_mb": limit >> 20,
                      "largest_growth_mb": round(growth / (1 << 20), 1) if memory.available else None, "expected_errors": expected, "findings": findings,
                      "slowest_s": slowest, "seconds": time.time() - start}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help=f"default: all ({', '.join(T.TARGETS)})")
    parser.add_argument("--inputs", type=int, default=1_000_000, help="inputs per target (default 1 000 000)")
    parser.add_argument("--minutes", type=float, default=60.0, help="at most this long per target (default 60)")
    parser.add_argument("--memory-gb", type=float, default=None,
                        help="address-space bound per target process (default: derived from the seeds' size)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/pyllm-fuzz"), help="where findings go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.inputs, args.minutes, args.memory_gb, args.out, args.seed)
        return 0
    names = args.targets or list(T.TARGETS)
    unknown = set(names) - set(T.TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}")
    rows, failed = [], False
    for name in names:
        cmd = [sys.executable, __file__, "--child", name, "--inputs", str(args.inputs), "--minutes", str(args.minutes),
               "--out", str(args.out), "--seed", str(args.seed)]
        if args.memory_gb:
            cmd += ["--memory-gb", str(args.memory_gb)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60 * args.minutes + 600)
        line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        if proc.returncode != 0 or not line.startswith("{"):
            rows.append(f"| {name} | – | – | crashed: exit {proc.returncode} | – | – | – | – |")
            print(proc.stderr[-3000:], file=sys.stderr)
            failed = True
            continue
        r = json.loads(line)
        failed |= bool(r["findings"])
        kinds = ", ".join(sorted({f["kind"] for f in r["findings"]})) or "0"
        rows.append(f"| {name} | {r['inputs']:,} | {r['expected_errors']:,} | {kinds} | {1000 * r['slowest_s']:.0f} | "
                    f"{r['inputs'] / max(r['seconds'], 1e-9):,.0f} | {r['largest_growth_mb']} | {r['address_space_mb']:,} |")
        for f in r["findings"][:5]:
            print(f"  {name}: {f['kind']}: {f['detail']} ({f['file']})", file=sys.stderr)
        print(rows[-1], flush=True)
    print("\n| target | inputs | documented errors | findings | slowest ms | inputs/s | largest growth MiB | "
          "address space MiB |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
