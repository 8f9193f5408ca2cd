"""``superclip fit|validate|test|export|import``: the console entry point.

Dispatches before anything heavy is imported (``superclip --help`` and ``superclip export --help`` never
import Lightning), and turns errors into exit statuses: 0 success, 1 a failed run, 2 a usage or
configuration error, 128 + the signal number for a run stopped by SIGTERM (143) or SIGINT (130) with
``last.ckpt`` written (``superclip_pl.train.signals``), and 141 (SIGPIPE), silently, when the reader of
stdout goes away (``superclip --help | head -1``). A user error (a bad config value, path, column or
checkpoint) prints one line on stderr, naming the key, the value and what to do; ``SUPERCLIP_TRACEBACK=1``
shows its traceback too. Programming errors keep theirs.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys

from superclip_pl.errors import BadDataStop, DivergedStop, SignalStop, UserError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
COMMANDS = {
    "fit": "train a model (superclip fit --config FILE; --ckpt_path CKPT resumes)",
    "validate": "evaluate a checkpoint on data.val and the evaluation callbacks (writes metrics.json)",
    "test": "evaluate a checkpoint on data.test and the evaluation callbacks (writes metrics.json)",
    "predict": "embed data.predict's images and captions into files (one per rank) with a checkpoint",
    "export": "checkpoint -> a transformers CLIPModel directory, or open_clip files",
    "import": "open_clip / reference SuperCLIP checkpoint -> a directory to fine-tune from",
    "recipes": "list the shipped configs (--config NAME runs one), or copy them: --copy DIR",
}
USAGE = "usage: superclip {" + ",".join(COMMANDS) + "} [-h] ..."
HELP = "\n".join(
    [
        USAGE,
        "",
        "Train, evaluate and export SuperCLIP models (CLIP + vocabulary classifier).",
        "",
        "commands:",
        *(f"  {name:<9} {what}" for name, what in COMMANDS.items()),
        "",
        "`superclip COMMAND --help` lists a command's options; `superclip fit --data.help",
        "superclip_pl.ImageTextDataModule` those of the data module. Exit status: 0 success, 1 failed run,",
        "2 usage or configuration error, 143 / 130 stopped by SIGTERM / SIGINT with last.ckpt written",
        "(SUPERCLIP_TRACEBACK=1 shows the traceback of an error).",
    ]
)


def build_cli(args: list[str] | None = None, run: bool = True):
    """The ``SuperCLIPCLI`` (Lightning) for ``args``; tests call it in-process and read its trainer,
    model and data module. With ``run=False`` the arguments carry no subcommand and the CLI only
    parses and instantiates. Errors propagate (``main`` turns them into exit statuses)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from superclip_pl.cli.quiet import quiet

    quiet()
    from superclip_pl.cli.lightning_cli import make_cli

    return make_cli(args, run)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    if isinstance(err, KeyError):  # str(KeyError) quotes its message
        text = str(err.args[0]) if err.args else ""
    return text.splitlines()[0] if text else type(err).__name__


def _dispatch(argv: list[str], from_sys_argv: bool) -> None:
    command = argv[0] if argv else None
    if command == "export":
        from superclip_pl.cli.commands import run_export

        run_export(argv[1:])
    elif command == "import":
        from superclip_pl.cli.commands import run_import

        run_import(argv[1:])
    elif command == "recipes":
        from superclip_pl.cli.recipes import run_recipes

        run_recipes(argv[1:])
    elif command in ("fit", "validate", "test", "predict"):
        from superclip_pl.cli.recipes import with_recipes

        argv = with_recipes(argv)  # --config debug: the shipped recipe
        if from_sys_argv:  # LightningCLI reads sys.argv itself
            sys.argv[1:] = argv
        build_cli(None if from_sys_argv else argv)
    elif command in ("-h", "--help"):
        print(HELP)
    else:
        what = f"unknown command {command!r}" if command else "a command is required"
        raise UserError(f"{what}; choose one of {', '.join(COMMANDS)} (superclip --help)")


def main(args: list[str] | None = None) -> int:
    """``superclip ...``: the exit status (the console script and ``python -m superclip_pl`` exit with it)."""
    argv = sys.argv[1:] if args is None else list(args)
    command = argv[0] if argv and not argv[0].startswith("-") else None
    prog = f"superclip {command}" if command in COMMANDS else "superclip"
    try:
        _dispatch(argv, args is None)
    except SystemExit as exit_:  # argparse / jsonargparse: --help (0) or a usage error (2, already printed)
        if type(exit_).__name__ == "SIGTERMException":  # Lightning's, outside training (setup, evaluation)
            print(f"{prog}: stopped by SIGTERM", file=sys.stderr)
            return 128 + signal.SIGTERM
        code = exit_.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `superclip --help | head`: the reader left; end as `yes | head` does, quietly
        _silence_stdout()
        return 128 + signal.SIGPIPE
    except SignalStop as stop:  # SIGTERM / SIGINT: stopped at a step's end with last.ckpt written
        if not stop.quiet:
            print(f"{prog}: {stop}; resume with: {resume_command(argv)}", file=sys.stderr)
        return 128 + stop.signum
    except (BadDataStop, DivergedStop, UserError, ValueError, OSError) as err:
        # bad values, paths, columns, checkpoints: the message names the key and the fix
        if os.environ.get("SUPERCLIP_TRACEBACK") == "1":
            raise
        print(f"{prog}: error: {_first_line(err)}", file=sys.stderr)
        return EXIT_FAILED if isinstance(err, BadDataStop | DivergedStop) else EXIT_USAGE
    finally:
        _close_process_group()
    return EXIT_OK


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not hit the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def resume_command(argv: list[str]) -> str:
    """The command line that continues a stopped run: this one, with ``--ckpt_path last``."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            args.append(arg)
    return shlex.join(["superclip", *args, "--ckpt_path", "last"])


def _close_process_group() -> None:
    """Destroy the DDP process group a run left (Lightning keeps it): a gloo group still alive at
    interpreter exit can abort the process ("terminate called without an active exception") after a
    complete run, turning exit 0 into a signal."""
    dist = sys.modules.get("torch.distributed")  # never import torch just for this (help, export)
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
