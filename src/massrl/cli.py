"""The `massrl` command: one sub-command per module in massrl.commands."""

from __future__ import annotations

import argparse
import errno
import gc
import importlib
import os
import sys
import warnings
from collections.abc import Collection

import PIL

from massrl import __version__
from massrl.commands.common import data_error_message, refuse_several_processes
from massrl.config import ConfigError
from massrl.eval.config import release_output_dirs

# where a warning comes from massrl (a skipped image) or PIL (an odd file): one line each
_ONE_LINE_DIRS = tuple(os.path.dirname(os.path.abspath(f)) + os.sep
                       for f in (__file__, PIL.__file__))
_python_format_warning = warnings.formatwarning

# Each module defines NAME, HELP (its --help description), configure(parser) and run(args) -> int.
# Only the invoked command's module is imported (the evaluation commands import torch and
# Lightning): `massrl --help` lists the commands with these summaries without loading any.
COMMANDS = {
    "pretrain": "pre-train a backbone (MASSRL, BYOL, SimCLR)",
    "augviz": "draw what the augmentation strategies do to some images",
    "knn": "weighted kNN accuracy of a checkpoint's frozen features",
    "linear": "linear evaluation, or semi-supervised fine-tuning, of a checkpoint",
    "umap": "a UMAP picture of a checkpoint's features",
    "export": "export a checkpoint's backbone for timm / torchvision",
}


def _load(name: str):
    return importlib.import_module(f"massrl.commands.{name}")


def build_parser(configure: Collection[str] = tuple(COMMANDS)
                 ) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `massrl` parser, with the sub-parsers of the commands in `configure` given their
    options (the others list the command only)."""
    parser = argparse.ArgumentParser(
        prog="massrl",
        description="Self-supervised pre-training with multiple augmentation strategies "
        "(MASSRL), BYOL and SimCLR.",
        epilog="Every command takes -c FILE.yaml and KEY=VALUE overrides; "
        "`massrl COMMAND --help` lists its keys and defaults.",
    )
    parser.add_argument("--version", action="version", version=f"massrl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parsers = {}
    for name, summary in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name in configure:
            module = _load(name)
            p.description = module.HELP
            module.configure(p)
            p.set_defaults(_run=module.run, command=name)
        parsers[name] = p
    return parser, parsers


def os_error_message(exc: OSError) -> str:
    """`strerror: path`, and for a full disk what to do about it."""
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    text = f"{exc.strerror}: {where}" if exc.strerror and where else str(exc)
    if exc.errno == errno.ENOSPC:
        text += " (free some space, or write elsewhere: output_dir=, --out)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        text += " (write elsewhere: output_dir=DIR, --out)"
    return text


def _failure(exc: Exception, command: str) -> tuple[int, str] | None:
    """The exit status and the one-line message of a failure every command may meet (None: a
    bug, shown with its traceback). 2: bad input (a config error; data that is missing,
    unusable or, under data.strict=true, undecodable); 1: failed while running (a file that
    cannot be written, a full disk, a loss that became NaN). The classes say which with
    `exit_status`, so that every command gives the same status for the same failure."""
    if isinstance(exc, ConfigError):
        return 2, str(exc).replace("massrl <command>", f"massrl {command}")
    status = getattr(exc, "exit_status", None)
    if status is not None:
        return status, data_error_message(exc)
    if isinstance(exc, OSError):  # a path that cannot be written or read, a full disk
        return 1, os_error_message(exc)
    return None


def _format_warning(message: Warning | str, category: type[Warning], filename: str,
                    lineno: int, line: str | None = None) -> str:
    """massrl's own warnings (a skipped image, ...) and PIL's (an odd file) as one line each,
    without the source line Python's format adds; other libraries' as Python formats them."""
    if category.__module__.startswith(("massrl", "PIL")) or filename.startswith(_ONE_LINE_DIRS):
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


def run() -> None:
    """The `massrl` command (its console script and `python -m massrl`): main, then the exit."""
    code = main()
    # The interpreter's last garbage collections walk every object torch, Lightning and numba
    # made: 3-5 s between the run directory's line and the prompt, for nothing, as the process
    # is ending. Frozen, those objects are left to the OS (refcounting still frees what it
    # can); massrl has closed its files by now. Not in main(): a Python caller's process goes on.
    gc.freeze()
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # a file name that is not UTF-8 (Linux names are bytes) is printed with \x escapes, not a
    # UnicodeEncodeError in the middle of a run (put back for a Python caller afterwards)
    streams = [s for s in (sys.stdout, sys.stderr) if hasattr(s, "reconfigure")]
    before = [s.errors for s in streams]
    for stream in streams:
        stream.reconfigure(errors="backslashreplace")
    try:
        return _main(argv)
    finally:
        for stream, errors in zip(streams, before, strict=True):
            stream.reconfigure(errors=errors)


def _main(argv: list[str]) -> int:
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser, parsers = build_parser([command] if command else [])
    if command is not None:
        # intermixed: options may stand between KEY=VALUE overrides (`ckpt=X --out f.png k=20`)
        args = parsers[argv[0]].parse_intermixed_args(argv[1:])
    else:  # no command, or options first: nothing to run but help or a usage error
        args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    try:
        previous, warnings.formatwarning = warnings.formatwarning, _format_warning
        try:
            refuse_several_processes(args.command)
            return int(args._run(args) or 0)
        finally:
            warnings.formatwarning = previous
            release_output_dirs()  # an evaluation's default folder that stayed empty
    except Exception as exc:
        failure = _failure(exc, args.command)
        if failure is None:
            raise
        status, text = failure
        print(f"massrl {args.command}: {text}", file=sys.stderr)
        return status
    except KeyboardInterrupt:
        print(f"massrl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
