"""The `pyllm` command: a thin argparse layer over the library.

Not where work is done: each subcommand builds its config and calls into pyllm.
"""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from pyllm import kernels

    print(f"pyllm kernels: isa={kernels.get_isa()} (available: {', '.join(kernels.available_isas())}), "
          f"threads={kernels.get_num_threads()}")
    if args.peak:
        print(f"measured fp32 FMA peak: {kernels.measure_fma_peak(1.0):.1f} GFLOP/s")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from pyllm import bench, kernels

    if args.threads:
        kernels.set_num_threads(args.threads)
    print(f"pyllm kernels vs numpy: isa={kernels.get_isa()}, threads={kernels.get_num_threads()} "
          f"(numpy uses its BLAS's own threads)", flush=True)
    print(bench.format_table(bench.run(scale=args.scale, min_time=args.min_time)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyllm", description="A readable LLM stack with C++ kernels.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="show the SIMD level and thread count the kernels use")
    info.add_argument("--peak", action="store_true", help="also measure the fp32 FMA peak")
    info.set_defaults(func=_cmd_info)
    bench = sub.add_parser("bench", help="time the C++ kernels against their numpy twins (about a minute)")
    bench.add_argument("--threads", type=int, default=0, help="kernel threads (default: all cores)")
    bench.add_argument("--scale", type=float, default=1.0,
                       help="shrink (<1) or grow the GPT-2-small shapes (default 1.0)")
    bench.add_argument("--min-time", type=float, default=0.5,
                       help="seconds spent timing each side of each kernel (default 0.5)")
    bench.set_defaults(func=_cmd_bench)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
