"""Prints the kernel benchmarks (a pytest-benchmark --benchmark-json file) as a markdown table.

Not a benchmark runner and not a comparison across runs: one JSON in, one table out. Every time is the
MEDIAN over the benchmark's rounds (robust to the
scheduling noise of a shared machine) (the same statistic the GFLOP/s in bench_kernels.py divide by).

    python benchmarks/report.py bench.json            # the table
    python benchmarks/report.py bench.json --check    # ... and exit 1 if a row misses its target
"""

from __future__ import annotations

import argparse
import json
import sys


def fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def num(x) -> str:
    """Three significant digits, without switching to exponents for large values."""
    return "–" if x is None else f"{x:.0f}" if abs(x) >= 100 else f"{x:#.3g}"


def load_rows(benchmarks: list[dict], read_gbps=None) -> list[dict]:
    """One row per group, in run order, with both sides' median time, GFLOP/s and % of peak (for a
    decode row, its bytes read per second and % of the measured read bandwidth, read_gbps)."""
    groups: dict[str, dict] = {}
    for b in benchmarks:
        info = b.get("extra_info", {})
        if "impl" not in info:   # not one of bench_kernels.py's benchmarks
            continue
        row = groups.setdefault(b["group"], {"group": b["group"], "target": info.get("target")})
        side = "pyllm" if info["impl"] == "pyllm" else "numpy"  # numpy, or the named peer
        if side == "numpy":
            row["baseline"] = info["impl"]
        mbps = info["bytes"] / b["stats"]["median"] / 1e6 if info.get("bytes") else None
        decode = bool(mbps and info.get("tokens"))   # tokens whose weights and cache stream from memory
        row[side] = {"median": b["stats"]["median"], "gflops": info.get("gflops"),
                     "pct_peak": (100 * mbps / 1e3 / read_gbps if decode and read_gbps else info.get("pct_peak")),
                     "mbps": mbps, "decode": decode,
                     "tokps": info["tokens"] / b["stats"]["median"] if info.get("tokens") else None,
                     "peak_mb": info.get("peak_mb")}
        if info.get("note"):   # what the timings alone do not say (bench_serve.py: latencies)
            row["note"] = "; ".join(filter(None, [row.get("note"), f"{info['impl']}: {info['note']}"]))
        if info.get("numpy_blas_threads"):
            row["note"] = f"numpy on {info['numpy_blas_threads']} BLAS thread(s), its faster setting"
    for row in groups.values():
        ours, theirs = row.get("pyllm"), row.get("numpy")
        if ours and theirs and ours.get("peak_mb") and theirs.get("peak_mb"):
            row["note"] = f"peak RSS {ours['peak_mb']:.0f} MB vs {theirs['peak_mb']:.0f} MB"
        row["speedup"] = theirs["median"] / ours["median"] if ours and theirs else None
        row["met"] = (row["speedup"] >= row["target"]
                      if row["speedup"] is not None and row["target"] is not None else None)
    return list(groups.values())


def header(machine: dict) -> list[str]:
    f = machine.get("pyllm_bench", {})
    peak = f.get("fma_peak_gflops")
    lines = [
        f"CPU: {f.get('cpu_model', 'unknown')} · threads: {f.get('threads', '?')} "
        f"(numpy's BLAS: {f.get('numpy_blas_threads', '?')}) · pyllm ISA: {f.get('isa', '?')} · "
        f"measured FMA peak: {fmt(peak, '.1f')} GFLOP/s · measured read bandwidth: "
        f"{fmt(f.get('read_bandwidth_gbps'), '.1f')} GB/s · numpy {f.get('numpy_version', '?')} "
        f"({f.get('numpy_blas', '?')})",
        "",
        "Times are medians over each benchmark's rounds; speedup = baseline time / pyllm time; "
        "a row meets its target when its speedup reaches the target column. % peak: of the FMA peak "
        "for products, of the read bandwidth for decode (the bytes a token reads: weights and KV cache; "
        "above 100% where part of them stays in the last-level cache from one token to the next).",
    ]
    if f.get("openblas_overrides"):
        lines.append(f"Warning: {f['openblas_overrides']} was set: numpy may not have run at its best.")
    return lines


def table(rows: list[dict]) -> list[str]:
    lines = ["| kernel / shape | baseline | pyllm ms | baseline ms | speedup | pyllm GFLOP/s or MB/s "
             "| baseline GFLOP/s or MB/s | % peak (pyllm / baseline) | target | met |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        name = r["group"] + (f" ({r['note']})" if r.get("note") else "")
        ours, theirs = r.get("pyllm") or {}, r.get("numpy") or {}
        ms = lambda side: num(side["median"] * 1e3 if side else None)  # noqa: E731
        peak = (f"{fmt(ours.get('pct_peak'), '.0f')}% / {fmt(theirs.get('pct_peak'), '.0f')}%"
                if ours.get("pct_peak") is not None or theirs.get("pct_peak") is not None else "–")
        met = {True: "yes", False: "**no**", None: "n/a"}[r["met"]]
        rate = lambda side: (f"{num(side['tokps'])} tok/s, {num(side['mbps'] / 1e3)} GB/s"  # noqa: E731
                             if side.get("decode")
                             else f"{num(side['mbps'])} MB/s" if side.get("mbps")
                             else f"{num(side['tokps'])} tok/s, {num(side.get('gflops'))} GFLOP/s"
                             if side.get("tokps") else num(side.get("gflops")))
        lines.append(
            f"| {name} | {r.get('baseline', 'numpy')} | {ms(ours)} | {ms(theirs)} | {fmt(r['speedup'], '.2f')}x "
            f"| {rate(ours)} | {rate(theirs)} | {peak} "
            f"| {fmt(r['target'], 'g')}x | {met} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="file written by `pytest benchmarks/ --benchmark-json=FILE`")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if any row misses its target or lacks one of its two sides")
    args = ap.parse_args(argv)
    with open(args.json) as fh:
        data = json.load(fh)
    rows = load_rows(data["benchmarks"], data.get("machine_info", {}).get("pyllm_bench", {}).get("read_bandwidth_gbps"))
    print("\n".join(header(data.get("machine_info", {})) + [""] + table(rows)))
    met = sum(r["met"] is True for r in rows)
    print(f"\n{met} of {len(rows)} rows meet their target.")
    return 1 if args.check and met < len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
