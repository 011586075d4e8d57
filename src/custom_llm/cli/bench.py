"""``custom-llm bench``: side-by-side benchmarks against Hugging Face (see :mod:`custom_llm.bench`)."""

from __future__ import annotations

import sys


def register(sub) -> None:
    from ..bench.runner import CASES, DEFAULT_CASES

    parser = sub.add_parser("bench", help="benchmark against Hugging Face transformers",
                            description="Run each case for our implementation and the Hugging Face reference "
                                        "alternately in one process and report medians; ratio = ours / ref.")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default: cpu)")
    parser.add_argument("--cases", default=None,
                        help=f"comma-separated cases out of {', '.join(CASES)} (default: {', '.join(DEFAULT_CASES)})")
    parser.add_argument("--json", action="store_true",
                        help='one JSON object per line: {"case", "ours", "ref", "ratio", "unit", "device", "config"}')
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per side (default: 3 CPU, 5 CUDA)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repetition (a smoke test)")
    compiling = parser.add_mutually_exclusive_group()
    compiling.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                           help="do not torch.compile our model (compiled by default on CUDA)")
    compiling.add_argument("--compile", dest="compile", action="store_true",
                           help="torch.compile our training blocks and decode step on the CPU too (adds minutes of "
                                "compilation on a small machine; the timings exclude it)")
    parser.add_argument("--ref-compile", action="store_true",
                        help="also torch.compile the Hugging Face reference in training cases")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, one per core); 1 is steadier on a busy machine")
    parser.add_argument("--data", default=None,
                        help="tinyshakespeare.txt for the shakespeare_char case (default: ../shared/data beside the "
                             "checkout or the working directory); for the speculative case, a folder with target/ "
                             "and draft/ checkpoints")
    parser.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..bench import CASES, format_table, run_benchmarks
    from ..errors import UserError

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1 (got {args.threads})")
        torch.set_num_threads(args.threads)
    cases = None
    if args.cases is not None:
        cases = [c.strip() for c in args.cases.split(",") if c.strip()]
        if not cases:
            raise UserError(f"--cases {args.cases!r} names no case; choose from {', '.join(CASES)}")
    results = []
    for result in run_benchmarks(cases, args.device, repeats=args.repeats, quick=args.quick,
                                 compile=args.compile, ref_compile=args.ref_compile, data=args.data):
        results.append(result)
        if args.json:
            print(result.to_json(), flush=True)
        else:
            ratio = "-" if result.ratio is None else f"{result.ratio:.2f}x"
            print(f"[{result.case}] ours {result.ours:.4g} {result.unit}, ratio {ratio}", file=sys.stderr, flush=True)
    if not args.json:
        print(format_table(results))
    return 0
