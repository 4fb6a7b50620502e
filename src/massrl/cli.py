"""The `massrl` command: one sub-command per module in massrl.commands."""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from massrl.config import ConfigError

# Each module defines NAME, HELP, configure(parser) and run(args) -> int.
COMMANDS = ("pretrain", "augviz", "knn", "linear", "umap", "export")


def _load(name: str):
    return importlib.import_module(f"massrl.commands.{name}")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="massrl",
        description="Self-supervised pre-training with multiple augmentation strategies "
        "(MASSRL), BYOL and SimCLR.",
        epilog="Every command takes -c FILE.yaml and KEY=VALUE overrides; "
        "`massrl COMMAND --help` lists its keys and defaults.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parsers = {}
    for name in COMMANDS:
        module = _load(name)
        p = sub.add_parser(
            module.NAME, help=module.HELP, description=module.HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.configure(p)
        p.set_defaults(_run=module.run, command=module.NAME)
        parsers[module.NAME] = p
    return parser, parsers


def os_error_message(exc: OSError) -> str:
    """`strerror: path`, and for a full disk what to do about it."""
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    text = f"{exc.strerror}: {where}" if exc.strerror and where else str(exc)
    if exc.errno == errno.ENOSPC:
        text += " (free some space, or write elsewhere: output_dir=, --out)"
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, parsers = build_parser()
    if argv and argv[0] in parsers:
        # intermixed: options may stand between KEY=VALUE overrides (`ckpt=X --out f.png k=20`)
        args = parsers[argv[0]].parse_intermixed_args(argv[1:])
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except ConfigError as exc:
        text = str(exc).replace("massrl <command>", f"massrl {args.command}")
        print(f"massrl {args.command}: {text}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path that cannot be written or read, a full disk
        print(f"massrl {args.command}: {os_error_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"massrl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
