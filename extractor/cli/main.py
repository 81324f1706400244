"""The `extractor` command group. Subcommands live one per module; none imports torch at import time."""
from __future__ import annotations

import sys

import click

from extractor import __version__
from extractor.errors import ExtractorError, error_file_for_me

# name -> "module:attribute"; modules are imported only when their command runs or help is shown.
COMMANDS = {
    "tasks": "extractor.cli.tasks_cmd:tasks",
    "data": "extractor.cli.data_cmd:data",
    "run": "extractor.cli.run_cmd:run",
    "train": "extractor.cli.train_cmd:train",
    "eval": "extractor.cli.eval_cmd:eval_",
    "compare": "extractor.cli.compare_cmd:compare",
    "demo": "extractor.cli.demo_cmd:demo",
    "validate": "extractor.cli.validate_cmd:validate",
    "bench": "extractor.cli.bench_cmd:bench",
}
# Commands a nightly job spells out at length: they also take --config FILE (extractor/cli/config_file.py).
CONFIGURABLE = {"run", "eval", "compare", "train"}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        command = getattr(__import__(module, fromlist=[attr]), attr)
        if name in CONFIGURABLE:
            from extractor.cli.config_file import add_config_option
            add_config_option(command)
        return command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ExtractorError as exc:
            _report(f"error: {exc}")
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            _report("interrupted")
            sys.exit(130)


def _report(line: str) -> None:
    """The command's last word: to stderr, or where a --gpus parent collects it (errors.ERROR_FILE_ENV)."""
    path = error_file_for_me()
    if path:
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(line)
            return
        except OSError:  # the parent's folder is gone: say it here after all
            pass
    click.echo(line, err=True)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="extractor")
def cli():
    """Batch LLM information extraction and evaluation.

    \b
    Example:
      extractor tasks
      extractor data synth-jd --n 1000 --out corpus.jsonl --gold gold.jsonl

    \b
    Shell completion (commands, options, task names):
      eval "$(_EXTRACTOR_COMPLETE=bash_source extractor)"   # in ~/.bashrc
      eval "$(_EXTRACTOR_COMPLETE=zsh_source extractor)"    # in ~/.zshrc
      _EXTRACTOR_COMPLETE=fish_source extractor | source    # in ~/.config/fish/completions/extractor.fish
    """


def main():
    cli(prog_name="extractor")
