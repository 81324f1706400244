"""`--config FILE`: a YAML file of option values for one command, so a nightly job need not spell out twenty
flags. Keys are option names (`max_new_tokens` or `max-new-tokens`) or argument names (`corpus`); flags take
`true`/`false`; repeatable options take a list. The file only supplies defaults (click's default_map), so
anything given on the command line overrides it. Unknown keys and wrongly typed values are refused with
the file, the key and the closest valid key, before the command starts.
"""
from __future__ import annotations

import difflib
from pathlib import Path

import click

from extractor.errors import InputError

HELP = ("YAML file of option values keyed by option name (max_new_tokens or max-new-tokens; flags as true); "
        "options given on the command line override it.")


def add_config_option(command: click.Command) -> None:
    """Give `command` a --config option (once; the command group calls this for run, eval, compare, train)."""
    if any(p.name == "config" for p in command.params):
        return
    # Eager, so the file is read before any other parameter looks up its default.
    command.params.append(click.Option(["--config"], type=click.Path(dir_okay=False), is_eager=True,
                                       expose_value=False, callback=_apply, help=HELP))


def _apply(ctx: click.Context, _param, value) -> None:
    if value is None:
        return
    path = Path(value)
    data = _read(path)
    keys = _keys(ctx.command)
    defaults = {}
    for key, raw in data.items():
        name = str(key).replace("-", "_")
        param = keys.get(name)
        if param is None:
            close = difflib.get_close_matches(name, keys, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise InputError(f"{path}: unknown key '{key}'{hint} (valid: {', '.join(sorted(keys))})")
        defaults[param.name] = _value(ctx, param, raw, f"{path}: {key}")
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


def _read(path: Path) -> dict:
    import yaml
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"--config {path}: cannot read ({exc.strerror or exc}); check the path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def _keys(command: click.Command) -> dict[str, click.Parameter]:
    """Every name a key may use: options' long names without dashes, arguments' names."""
    keys = {}
    for param in command.params:
        if not param.expose_value or getattr(param, "hidden", False):
            continue
        if isinstance(param, click.Argument):
            keys[param.name] = param
            continue
        for opt in param.opts + param.secondary_opts:
            if opt.startswith("--"):
                keys[opt[2:].replace("-", "_")] = param
    return keys


def _value(ctx: click.Context, param: click.Parameter, raw, where: str):
    is_flag = isinstance(param, click.Option) and param.is_flag
    if is_flag and not isinstance(raw, bool):
        raise InputError(f"{where}: a flag takes true or false, not {raw!r}")
    if isinstance(param, click.Option) and not is_flag and raw is True and isinstance(param.flag_value, str):
        raw = param.flag_value  # an option that may stand alone (--ray): `true` means given without a value
    many = param.multiple or param.nargs == -1
    if many and not isinstance(raw, list):
        raw = [raw]
    elif not many and isinstance(raw, (list, dict)):
        raise InputError(f"{where}: expected one value, not a {type(raw).__name__}")
    if isinstance(raw, list) and any(isinstance(v, (list, dict)) for v in raw):
        raise InputError(f"{where}: expected a list of plain values")
    try:
        return param.type_cast_value(ctx, raw)
    except click.BadParameter as exc:
        raise InputError(f"{where}: {exc.message}") from None
