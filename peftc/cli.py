"""The `peftc` command line: one-line errors (tracebacks with --verbose); exit 0 ok, 2 usage/spec error, 1 failure."""

from __future__ import annotations

import argparse
import sys
import traceback

from .errors import PeftcError, SpecError


class UsageError(PeftcError):
    """Bad command-line usage (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would exit 2 with usage text; keep our one-line format
        raise UsageError(message)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(steps=args.steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="peftc", description="A compiler for parameter-efficient fine-tuning of PyTorch models.")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="compile a built-in small Llama with LoRA and train it briefly")
    demo.add_argument("--steps", type=int, default=50)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = "--verbose" in argv
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        print("peftc: interrupted", file=sys.stderr)
        return 1
    except (UsageError, SpecError) as e:
        if verbose:
            traceback.print_exc()
        print(f"peftc: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # every other failure: one line, exit 1
        if verbose:
            traceback.print_exc()
        print(f"peftc: error: {type(e).__name__ + ': ' if not isinstance(e, PeftcError) else ''}{e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
