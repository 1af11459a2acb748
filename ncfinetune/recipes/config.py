"""Recipe configs: dataclasses in sections, YAML defaults, then the command line (argparse).

timm's ``train.py`` pattern: ``--config FILE.yaml`` gives the defaults, ``--key value`` on the
command line overrides them, and the argparse parser is generated from the dataclass fields, one
argument group per section (``--help`` is grouped the same way and documents every key from its
``metadata["help"]``, written with :func:`key`).

A config is a dataclass whose fields are either keys or *sections*: dataclasses of keys (e.g.
``data``, ``tuning``, ``optim``, ``run``). Key names are unique across sections, so the command
line stays flat (``--lr 0.05 --block auto``); a YAML file may be sectioned (``optim: {lr: 0.05}``)
or flat (``lr: 0.05``). Values are converted to each field's type here, not by argparse, so that
every problem (unknown key, wrong type, invalid value: each section's ``validate()``) is
collected and raised as one :class:`ConfigError`; argparse would stop at the first.

Why argparse and not jsonargparse or tyro: it is the standard library (no new dependency), the
whole layer is this module, and the flat command line, the one-error-for-everything rule and the
exact messages the recipes promise would each need working around in either library.
:func:`run_cli` runs a recipe's ``main`` so that an ncfinetune error prints its message and exits
with status 2 (``--debug``: the full traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ncfinetune.errors import ConfigError, NcFinetuneError
from ncfinetune.files import disk_full, disk_full_message, write_text

_NOT_KEYS = ("config", "help", "debug")  # options of every command that are not config keys


def key(default: Any, help: str) -> Any:  # noqa: A002 (the argparse word)
    """A config key: ``default`` (a list or dict is copied per instance) documented by ``help``
    (shown by ``--help``)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"help": help}
        )
    return dataclasses.field(default=default, metadata={"help": help})


def section(cls: type) -> Any:
    """A section field: its keys come from dataclass ``cls``."""
    return dataclasses.field(default_factory=cls)


def sections(cls: type) -> list[tuple[str | None, type]]:
    """``(name, section class)`` of a config class, in order; ``(None, cls)`` holds the keys
    that are not in a section (only when there are any)."""
    hints = typing.get_type_hints(cls)
    found, top = [], False
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found.append((f.name, hints[f.name]))
        else:
            top = True
    return ([(None, cls)] if top else []) + found


def leaves(cls: type) -> dict[str, tuple[str | None, dataclasses.Field, Any]]:
    """Every key of a config class: name -> (its section or None, its field, its type)."""
    found = {}
    for name, klass in sections(cls):
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            if name is None and dataclasses.is_dataclass(hints[f.name]):
                continue
            found[f.name] = (name, f, hints[f.name])
    return found


def flat_config(config: Any) -> dict[str, Any]:
    """The config's keys and values, sections flattened (key names are unique)."""
    return {
        name: getattr(config if sec is None else getattr(config, sec), name)
        for name, (sec, _, _) in leaves(type(config)).items()
    }


def flat_values(cls: type, mapping: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """A YAML mapping (sectioned, flat or both) as ``{key: value}``; a key in the wrong section
    is added to ``problems`` (unknown keys are left for :func:`parse_config` to report)."""
    known = leaves(cls)
    names = {name for name, _ in sections(cls) if name}
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        if k in names and isinstance(v, Mapping):
            for kk, vv in v.items():
                if kk in known and known[kk][0] != k:
                    problems.append(f"key {kk!r} belongs in section {known[kk][0]}, not {k}")
                out[kk] = vv
        else:
            out[k] = v
    return out


def _convert(value: Any, tp: Any, from_cli: bool) -> Any:
    """Convert ``value`` to type ``tp`` (None, bool, int, float, str, dict, list[...], unions)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (from_cli and str(value).lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, from_cli)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(" or ".join(errors))
    if origin is list:
        (item,) = typing.get_args(tp)
        if from_cli and isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        return [_convert(v, item, from_cli) for v in value]
    if tp is dict:
        if from_cli and isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ValueError(
                    f"expected a mapping such as '{{depth: 6}}', got {value!r}"
                ) from None
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError(
                f"expected a mapping with string keys such as {{depth: 6}}, got {value!r}"
            )
        return dict(value)
    return _scalar(value, tp, from_cli)


def _scalar(value: Any, tp: Any, from_cli: bool) -> Any:
    """Convert ``value`` to a bool, int, float or str (``from_cli``: written as text)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if from_cli and str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            return int(str(value), 0) if isinstance(value, str) else int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last silently, so ``epochs: 3`` followed by ``epochs: 30`` would train 30)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            name = self.construct_object(key_node, deep=deep)
            if name in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {name!r} is given twice (lines {seen[name] + 1} and "
                    f"{key_node.start_mark.line + 1}); keep one",
                    key_node.start_mark,
                )
            seen[name] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping of a YAML config file (raises :class:`ConfigError`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at position "
            f"{e.start}); save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
        ) from e
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 (safe)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"config file {path} must be a mapping of key: value, got a YAML "
            f"{type(loaded).__name__}. Write one 'key: value' per line (see --help)."
        )
    return loaded


def _argparse_ready(argv: list[str]) -> list[str]:
    """``argv`` with each ``--key value`` written ``--key=value`` (so a value may start with a
    dash: ``--candidates -1,-2``), a bare ``--flag`` as ``--flag=true``, and dashes in key
    names as underscores."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    value, i = argv[i + 1], i + 1
                else:
                    value = "true"
            arg = f"--{name.replace('-', '_')}={value}"
        out.append(arg)
        i += 1
    return out


def wants_help(argv: Iterable[str]) -> bool:
    """Whether ``argv`` asks for the help text (``--help`` or ``-h``)."""
    return any(a in ("--help", "-h") or a.startswith("--help=") for a in argv)


def _prog(cls: type) -> str:
    module = cls.__module__
    if module.startswith("ncfinetune.recipes."):
        return f"ncfinetune {module.rsplit('.', 1)[1]}"
    return module.rsplit(".", 1)[-1]


def build_parser(
    cls: type, defaults: Mapping[str, Any] | None = None, defaults_from: str | None = None
) -> argparse.ArgumentParser:
    """The argparse parser of config class ``cls``: one group per section, one ``--key`` per
    field, its help from the field's ``metadata["help"]`` and its default as ``defaults`` (a
    YAML file's values) or the dataclass sets it."""
    module = sys.modules.get(cls.__module__)
    doc = ((module.__doc__ if module else "") or "").split("\n\n")[0].strip()
    parser = argparse.ArgumentParser(
        prog=_prog(cls),
        usage="%(prog)s [--config FILE.yaml] [--KEY VALUE ...] [--debug]",
        description=doc,
        epilog="null means unset (auto where the help says so); lists are comma-separated "
        "(--classes 5,6,7); a YAML file may group keys by section or list them flat.",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=30, width=100),
        add_help=False,
        allow_abbrev=False,
        exit_on_error=False,
    )
    general = parser.add_argument_group("options")
    general.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    source = f" (here: {defaults_from})" if defaults_from else ""
    general.add_argument("--config", metavar="FILE.yaml", help=f"YAML defaults{source}")
    general.add_argument("--debug", action="store_true", help="on an error, show the traceback")
    defaults = dict(defaults or {})
    for name, klass in sections(cls):
        doc = (klass.__doc__ or "").split("\n\n")[0] if name else ""
        group = parser.add_argument_group(name or "keys", " ".join(doc.split()) or None)
        for k, (sec, f, tp) in leaves(cls).items():
            if sec != name:
                continue
            default = defaults[k] if k in defaults else _field_default(f)
            text = f"{f.metadata.get('help', '')} (default: {show_value(default)})"
            group.add_argument(
                f"--{k}", metavar=_type_name(tp), default=argparse.SUPPRESS,
                help=text.strip().replace("%", "%%"),
            )  # fmt: skip
    return parser


def parse_config(
    cls: type,
    argv: list[str] | None = None,
    defaults_file: str | None = None,
    base: Mapping[str, Any] | None = None,
):
    """Build config ``cls`` from an optional YAML file plus command-line overrides.

    Args:
        cls: a config dataclass (keys and sections); each section's and its own ``validate()``
            (if any) returns a list of problems.
        argv: command-line arguments (without the program name). ``--help`` (or ``-h``) prints
            the help (defaults as the YAML file sets them) and exits with status 0.
        defaults_file: YAML file used when ``--config`` is not given.
        base: values that replace the YAML file's and are replaced by the command line's (a
            resumed run's saved config).

    Raises:
        ConfigError: listing every problem found.
    """
    asked_help = wants_help(argv or [])
    # --debug belongs to run_cli (the traceback), -h/--help is answered below
    argv = [a for a in _argparse_ready([a for a in argv or [] if a != "-h"])
            if not a.startswith(("--debug=", "--help="))]  # fmt: skip
    config_file = config_file_arg(argv) or defaults_file
    problems: list[str] = []
    values = flat_values(cls, read_config_file(config_file) if config_file else {}, problems)
    values.update(flat_values(cls, base or {}, problems))
    parser = build_parser(cls, values, config_file)
    if asked_help:
        if is_main_process():
            print(parser.format_help(), flush=True)
        raise SystemExit(0)
    try:
        given, extra = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise ConfigError(f"1 problem(s) in the command line:\n  - {e}") from None
    raw = {k: (v, False) for k, v in values.items()}
    raw |= {k: (v, True) for k, v in vars(given).items() if k not in _NOT_KEYS}
    for arg in extra:  # unknown keys (reported below with the others) and stray words
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            raw[name] = (value, True)
        else:
            problems.append(f"unexpected argument {arg!r} (use --key value; a list is one value, comma-separated: --classes 5,6,7)")  # fmt: skip
    kwargs = _typed(cls, raw, problems)
    if not problems:
        top = kwargs.pop(None, {})
        config = cls(
            **top, **{name: klass(**kwargs[name]) for name, klass in sections(cls) if name}
        )
        problems = config_problems(config)
    if problems:
        where = f" (from {config_file} and the command line)" if config_file else ""
        raise ConfigError(
            f"{len(problems)} problem(s) in the config{where}:\n  - "
            + "\n  - ".join(problems)
            + f"\nValid keys: {', '.join(leaves(cls))} (--help describes each)."
        )
    return config


def _typed(cls: type, raw: Mapping[str, tuple[Any, bool]], problems: list[str]) -> dict:
    """``{section: {key: value}}`` of config class ``cls`` from ``{key: (value, from the
    command line)}``, each value converted to its field's type; an unknown key or a value of
    the wrong type is added to ``problems``."""
    known = leaves(cls)
    kwargs: dict[str | None, dict[str, Any]] = {name: {} for name, _ in sections(cls)}
    for name, (value, from_cli) in raw.items():
        if name not in known:
            near = difflib.get_close_matches(name, list(known), n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            problems.append(f"unknown key {name!r}{hint}")
            continue
        try:
            kwargs[known[name][0]][name] = _convert(value, known[name][2], from_cli)
        except (TypeError, ValueError) as e:
            problems.append(f"{name}: {e}")
    return kwargs


def config_file_arg(argv: list[str]) -> str | None:
    """The ``--config`` file named in ``argv``, or None."""
    found = [a.partition("=")[2] for a in _argparse_ready(argv) if a.startswith("--config=")]
    return found[-1] if found else None


def config_problems(config: Any) -> list[str]:
    """Every problem of a built config: each section's ``validate()``, then the config's own."""
    problems = []
    for name, _ in sections(type(config)):
        part = config if name is None else getattr(config, name)
        if name is not None and hasattr(part, "validate"):
            problems += part.validate()
    return problems + (config.validate() if hasattr(config, "validate") else [])


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return "|".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def show_value(value: Any) -> str:
    """A config value as it is written on the command line (null, true, 5,6,7)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(show_value(v) for v in value) or "[]"
    return str(value)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def config_differences(
    saved: Mapping[str, Any], now: Any, *, ignore: Iterable[str] = ()
) -> list[str]:
    """``"key: saved -> now"`` for every key of the config ``now`` whose value differs from
    ``saved`` (a run's ``config.yaml``, sectioned or flat), in key order. A key the saved file
    lacks (written by an older version) counts as its default."""
    skip = set(ignore)
    before_all, after_all = flat_values(type(now), saved, []), flat_config(now)
    diffs = []
    for name, (_, f, _) in leaves(type(now)).items():
        if name in skip:
            continue
        before = before_all.get(name, _field_default(f))
        after = after_all[name]
        if isinstance(before, tuple):
            before = list(before)
        if before != after or isinstance(before, bool) != isinstance(after, bool):
            diffs.append(f"{name}: {show_value(before)} -> {show_value(after)}")
    return diffs


# How long a rank other than 0 waits before exiting on an error (see run_cli).
NON_MAIN_GRACE_S = 10.0


def is_main_process() -> bool:
    """False on every process but rank 0 of a launched run (``accelerate launch`` and torchrun
    set ``RANK``); True for a plain process. Readable before any Accelerator exists."""
    return os.environ.get("RANK", "0") == "0"


def run_cli(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> Any:
    """Run a recipe's ``main(argv)`` as a command.

    An ncfinetune error (``ConfigError``, ``DataError``, ``BlockError``, ``CheckpointError``, ...)
    prints ``error: <message>`` to stderr, once (rank 0 of a multi-process launch), and exits
    with status 2, without a traceback; ``--debug`` anywhere in ``argv`` lets it propagate
    with its full traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = any(a in ("--debug", "--debug=true") for a in argv)
    argv = [a for a in argv if a not in ("--debug", "--debug=true", "--debug=false")]
    try:
        return main(argv)
    except Exception as caught:
        err = caught
        if not isinstance(err, NcFinetuneError):  # a full disk gets one message; others raise
            if debug or not disk_full(err):
                raise
            err = NcFinetuneError(disk_full_message(err))
        if debug:
            raise
        if is_main_process():
            print(f"error: {err}\n(--debug shows the traceback)", file=sys.stderr, flush=True)
        else:
            # torchrun stops every process as soon as one exits: the other ranks give rank 0
            # time to print the message (it fails the same way and then ends them all).
            time.sleep(NON_MAIN_GRACE_S)
        raise SystemExit(2) from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as a plain dict, by section (saved with each run)."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, by section (atomically, creating the folder)."""
    write_text(path, config_text(config))


def config_text(config: Any) -> str:
    """The resolved config as YAML text, by section (what :func:`save_config` writes)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
