"""Recipe configs: dataclasses + YAML + ``--key value`` overrides; no config framework.

``parse_config(Cls, argv)`` reads an optional ``--config FILE.yaml``, applies command-line
overrides on top, converts each value to the field's type, and validates. Every problem found
(unknown key, wrong type, invalid value) is collected and raised as one :class:`ConfigError`.
``--help`` prints every key with its type, default and description, generated from the
dataclass: a field's ``metadata={"help": ...}``, else the comment on its line, else the comment
lines directly above it (a comment separated from the next field by a blank line is a section
heading, not a description). :func:`run_cli` runs a recipe's ``main`` so that an ncfinetune
error prints its message and exits with status 2 (``--debug``: the full traceback).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import math
import os
import sys
import tokenize
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ncfinetune.errors import ConfigError, NcFinetuneError
from ncfinetune.backbones.hub import DEFAULT_BACKBONE
from ncfinetune.training.device import (
    LOOP_PRECISIONS,
    default_device,
    loop_precision,
    precision_problem,
    resolve_precision,
)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _convert(value: Any, tp: Any, from_cli: bool) -> Any:
    """Convert ``value`` to type ``tp`` (None, bool, int, float, str, list[int], unions)."""
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


def parse_overrides(argv: list[str]) -> tuple[str | None, dict[str, str], list[str]]:
    """Split ``argv`` into (config file, {key: raw value}, problems).

    Accepts ``--key value``, ``--key=value`` and bare ``--flag`` (meaning true). Dashes in keys
    become underscores.
    """
    config_file, values, problems = None, {}, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            problems.append(f"unexpected argument {arg!r} (use --key value)")
            i += 1
            continue
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                val, i = argv[i + 1], i + 1
            else:
                val = "true"
        if key == "config":
            config_file = val
        else:
            values[key] = val
        i += 1
    return config_file, values, problems


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last silently, so ``epochs: 3`` followed by ``epochs: 30`` would train 30)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1}); keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The ``key: value`` mapping of a YAML config file (raises :class:`ConfigError`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.")
    try:
        loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}  # noqa: S506 (safe)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"config file {path} must be a mapping of key: value, got a YAML "
            f"{type(loaded).__name__}. Write one 'key: value' per line (see --help)."
        )
    return loaded


def wants_help(argv: Iterable[str]) -> bool:
    """Whether ``argv`` asks for the help text (``--help`` or ``-h``)."""
    return any(a in ("--help", "-h") or a.startswith("--help=") for a in argv)


def parse_config(
    cls: type,
    argv: list[str] | None = None,
    defaults_file: str | None = None,
    base: Mapping[str, Any] | None = None,
):
    """Build a ``cls`` dataclass from an optional YAML file plus command-line overrides.

    Args:
        cls: a dataclass whose fields have defaults; its ``validate()`` (if any) returns a list of
            problems.
        argv: command-line arguments (without the program name). ``--help`` (or ``-h``) prints
            :func:`config_help` (defaults as the YAML file sets them) and exits with status 0.
        defaults_file: YAML file used when ``--config`` is not given.
        base: values that replace the YAML file's and are replaced by the command line's (a
            resumed run's saved config).

    Raises:
        ConfigError: listing every problem found.
    """
    argv = list(argv or [])
    config_file, cli, problems = parse_overrides([a for a in argv if a != "-h"])
    config_file = config_file or defaults_file
    types_ = _field_types(cls)
    values: dict[str, Any] = {}
    loaded = read_config_file(config_file) if config_file else {}
    loaded.update(base or {})
    if wants_help(argv):
        if is_main_process():
            print(config_help(cls, loaded, config_file), flush=True)
        raise SystemExit(0)
    for key, val in loaded.items():
        values[key] = (val, False)
    for key, val in cli.items():
        values[key] = (val, True)
    kwargs = {}
    for key, (val, from_cli) in values.items():
        if key not in types_:
            near = difflib.get_close_matches(key, list(types_), n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            problems.append(f"unknown key {key!r}{hint}")
            continue
        try:
            kwargs[key] = _convert(val, types_[key], from_cli)
        except (TypeError, ValueError) as e:
            problems.append(f"{key}: {e}")
    if not problems:
        config = cls(**kwargs)
        problems = config.validate() if hasattr(config, "validate") else []
    if problems:
        where = f" (from {config_file} and the command line)" if config_file else ""
        raise ConfigError(
            f"{len(problems)} problem(s) in the config{where}:\n  - "
            + "\n  - ".join(problems)
            + f"\nValid keys: {', '.join(types_)} (--help describes each)."
        )
    return config


def _source_file(cls: type) -> str | None:
    """The file defining ``cls``; also for classes of scripts run by ``runpy`` (whose module is
    gone from ``sys.modules`` afterwards): the file of any function defined in the class."""
    try:
        return inspect.getsourcefile(cls)
    except (TypeError, OSError):
        pass
    for value in vars(cls).values():
        code = getattr(getattr(value, "__func__", value), "__code__", None)
        if code is not None and os.path.isfile(code.co_filename):
            return code.co_filename
    return None


_TOOL_COMMENTS = ("fmt:", "noqa", "type:", "pragma")


def _comment_help(cls: type) -> dict[str, str]:
    """Field descriptions written as comments in the class body of ``cls`` (not its bases)."""
    file = _source_file(cls)
    if file is None or not os.path.isfile(file):
        return {}
    source = Path(file).read_text()
    node = next(
        (
            n
            for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.ClassDef) and n.name == cls.__name__
        ),
        None,
    )
    if node is None:
        return {}
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    comments = {k: v for k, v in comments.items() if v and not v.startswith(_TOOL_COMMENTS)}
    lines = source.splitlines()
    found = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        text = [comments[i] for i in range(stmt.lineno, stmt.end_lineno + 1) if i in comments]
        if not text:  # the comment lines directly above (a blank line ends a heading)
            i = stmt.lineno - 1
            while i >= 1 and lines[i - 1].strip().startswith("#"):
                if i in comments:
                    text.insert(0, comments[i])
                i -= 1
        if text:
            found[stmt.target.id] = " ".join(text)
    return found


def field_help(cls: type) -> dict[str, str]:
    """Each field of dataclass ``cls`` -> its one-line description: ``metadata["help"]``, else
    the comment on the field's line, else the comment lines directly above it (base classes
    included); "" when there is none."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            found.update(_comment_help(klass))
    return {
        f.name: str(f.metadata.get("help") or found.get(f.name, ""))
        for f in dataclasses.fields(cls)
    }


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


def _script_doc(cls: type) -> tuple[str, str]:
    """(file name, first paragraph of its docstring) of the file defining ``cls``."""
    file = _source_file(cls)
    if file is None or not os.path.isfile(file):
        return "", ""
    doc = ast.get_docstring(ast.parse(Path(file).read_text())) or ""
    return Path(file).name, doc.split("\n\n")[0].strip()


def config_help(
    cls: type, defaults: Mapping[str, Any] | None = None, defaults_from: str | None = None
) -> str:
    """The ``--help`` text of a recipe config: usage, the recipe's summary, and one line per key
    with its type, default and description.

    Args:
        cls: the config dataclass.
        defaults: values that replace the dataclass defaults (a YAML config file's).
        defaults_from: where ``defaults`` come from, for the heading.
    """
    defaults = dict(defaults or {})
    types_, helps = _field_types(cls), field_help(cls)
    rows = [
        (
            f"--{f.name}",
            _type_name(types_[f.name]),
            show_value(defaults[f.name] if f.name in defaults else _field_default(f)),
            helps[f.name],
        )
        for f in dataclasses.fields(cls)
    ]
    rows.append(("--debug", "flag", "off", "on an error, show the full traceback"))
    width = [min(max(len(r[i]) for r in rows), cap) for i, cap in enumerate((24, 16, 20))]
    lines = []
    for name, tp, default, text in rows:
        head = f"  {name:<{width[0]}}  {tp:<{width[1]}}  {default:<{width[2]}}"
        lines.append(f"{head}  {text}".rstrip())
    prog, doc = _script_doc(cls)
    source = f"; defaults from {defaults_from}" if defaults_from else ""
    return (
        f"usage: {prog or cls.__name__} [--config FILE.yaml] [--KEY VALUE ...] [--debug]\n\n"
        + (f"{doc}\n\n" if doc else "")
        + f"keys (--KEY VALUE, --KEY=VALUE, or KEY: VALUE in the YAML file{source}):\n"
        + f"  {'key':<{width[0]}}  {'type':<{width[1]}}  {'default':<{width[2]}}  description\n"
        + "\n".join(lines)
        + "\n\nnull means unset (auto where the description says so); lists are "
        "comma-separated (--classes 5,6,7)."
    )


def config_differences(
    saved: Mapping[str, Any],
    now: Any,
    *,
    ignore: Iterable[str] = (),
) -> list[str]:
    """``"key: saved -> now"`` for every field of the config ``now`` whose value differs from
    ``saved`` (a mapping read from a run's ``config.yaml``), in field order. A key the saved
    file lacks (written by an older version) counts as its dataclass default."""
    skip = set(ignore)
    diffs = []
    for f in dataclasses.fields(now):
        if f.name in skip:
            continue
        before = saved.get(f.name, _field_default(f))
        after = getattr(now, f.name)
        if isinstance(before, tuple):
            before = list(before)
        if before != after or isinstance(before, bool) != isinstance(after, bool):
            diffs.append(f"{f.name}: {show_value(before)} -> {show_value(after)}")
    return diffs


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
    except NcFinetuneError as err:
        if debug:
            raise
        if is_main_process():
            print(f"error: {err}\n(--debug shows the traceback)", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as a plain dict (saved with each run)."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def bound_problems(config: Any, **bounds: str) -> list[str]:
    """Problems with numeric keys of ``config``: ``bounds`` maps a key to a rule, one of
    ``">=0"``, ``">=1"``, ``">0"``, ``"[0,1)"``, ``"(0,100]"``; a None value always passes (the
    keys' null means auto or not set)."""
    rules = {
        ">=0": lambda v: v >= 0,
        ">=1": lambda v: v >= 1,
        ">0": lambda v: v > 0,
        "[0,1)": lambda v: 0 <= v < 1,
        "(0,100]": lambda v: 0 < v <= 100,
    }
    problems = []
    for key, rule in bounds.items():
        value = getattr(config, key)
        if value is not None and not isinstance(value, str) and not rules[rule](value):
            what = {">=0": ">= 0", ">=1": ">= 1", ">0": "> 0"}.get(rule, f"in {rule}")
            problems.append(f"{key} must be {what}, got {value}")
    return problems


def model_problems(model: str, checkpoint: str | None = None) -> list[str]:
    """A problem when ``model`` names no backbone ``create_backbone`` can build, or the
    ``checkpoint`` file is missing (checked before anything loads)."""
    import timm

    from ncfinetune.backbones.hub import bundled_backbones

    problems = []
    bundled = bundled_backbones()
    if not (model in bundled or (Path(model) / "backbone.json").is_file() or timm.is_model(model)):
        close = difflib.get_close_matches(model, [*bundled, *timm.list_models()], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        problems.append(
            f"model {model!r} is not a bundled backbone ({', '.join(bundled)}), a folder with "
            f"backbone.json from recipes/pretrain.py, or a timm architecture{hint}"
        )
    if checkpoint is not None and not Path(checkpoint).is_file():
        problems.append(f"checkpoint {checkpoint} is not a file: pass a local weights file")
    return problems


SEED_MAX = 2**32 - 1
"""Largest seed every generator a run seeds accepts (numpy's legacy seeding is 32-bit)."""


def seed_problems(seed: int, key: str = "seed") -> list[str]:
    """A problem when ``seed`` is outside what torch, numpy and random all accept."""
    if not 0 <= seed <= SEED_MAX:
        return [f"{key} must be in [0, 2**32 - 1] (what numpy accepts), got {seed}"]
    return []


def output_problems(key: str, path: str | None, *, folder: bool = True) -> list[str]:
    """Problems writing to ``path`` (the value of config key ``key``), found before any data
    or model is loaded: a file where a folder is needed (or the reverse), a parent that is a
    file, or no permission to create or write it."""
    if path is None:
        return []
    target = Path(path)
    if folder and target.exists() and not target.is_dir():
        return [
            f"{key} {path} is a file, not a folder: pass a folder path (the run writes "
            "several files into it)"
        ]
    if not folder and target.is_dir():
        return [f"{key} {path} is a folder: pass a file path, e.g. {target / 'predictions.csv'}"]
    existing = next((a for a in (target, *target.parents) if a.exists()), Path("."))
    if not existing.is_dir():
        return [f"{key} {path} cannot be created: {existing} is a file, not a folder"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [
            f"{key} {path} cannot be written: no write permission on {existing}; pick a "
            "folder you can write to"
        ]
    return []


@dataclasses.dataclass
class DownstreamConfig:
    """The backbone and downstream-data keys shared by ``recipes/finetune.py`` and
    ``recipes/select_block.py`` (each recipe's config extends it), and how both load them.

    ``per_class`` draws a class-balanced, seeded subset of the training split; the split itself
    (``test_fraction``, seeded) is the same in both recipes, so a block selected by one is
    selected on the training rows the other trains on.
    """

    # backbone: a bundled name, a recipes/pretrain.py folder, or a timm name with pretrained or
    # checkpoint
    model: str = DEFAULT_BACKBONE
    pretrained: bool = False  # timm name: download its pretrained weights (hub)
    checkpoint: str | None = None  # timm name: a local weights file for it
    # data
    dataset: str = "digits"  # digits | fashion_mnist | a folder | a .csv/.parquet file | a hub name
    data_dir: str | None = None  # fashion_mnist: folder of the IDX files; hub: its data_dir
    image_column: str | None = None  # null = detected
    label_column: str | None = None  # null = detected
    classes: list[int] | None = None  # keep these classes, renumbered 0..K-1 (null = all)
    # .csv/.parquet: allow image paths outside the table's folder (absolute, ../, symlinks out)
    allow_outside_paths: bool = False
    # check every image at load time and leave out unreadable ones (counted in the data line)
    skip_unreadable: bool = False
    per_class: int | None = None  # class-balanced, seeded, nested training subset (null = all)
    test_fraction: float = 0.2  # test share held out when the source has no test split
    image_size: int | None = None  # input size in pixels (null = the backbone's)
    seed: int = 0  # seeds the split, the subset, the classifier's init and the shuffling

    def validate(self) -> list[str]:
        p = []
        if self.pretrained and self.checkpoint:
            p.append("give pretrained or checkpoint, not both")
        if not 0 < self.test_fraction < 1:
            p.append(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        p += model_problems(self.model, self.checkpoint)
        p += seed_problems(self.seed)
        p += bound_problems(self, per_class=">=1", image_size=">=1")
        if self.classes is not None:
            if len(set(self.classes)) < 2:
                p.append(f"classes must name at least 2 classes, got {self.classes}")
            if len(set(self.classes)) != len(self.classes):
                p.append(f"classes lists a class twice: {self.classes}")
            if any(c < 0 for c in self.classes):
                p.append(f"classes are label indices >= 0, got {self.classes}")
        return p

    def load_data(self):
        """The dataset (``ncfinetune.data.loaders.ImageData``), restricted to ``classes`` if given."""
        import ncfinetune.data as nd
        data = nd.load_image_dataset(
            self.dataset,
            image_column=self.image_column,
            label_column=self.label_column,
            data_dir=self.data_dir,
            test_fraction=self.test_fraction,
            seed=self.seed,
            allow_outside_paths=self.allow_outside_paths,
            skip_unreadable=self.skip_unreadable,
        )
        return nd.select_classes(data, self.classes) if self.classes else data

    def load_model(self, num_classes: int):
        """The backbone with a fresh ``num_classes``-way classifier."""
        from ncfinetune.backbones.hub import create_backbone

        return create_backbone(
            self.model, num_classes, pretrained=self.pretrained, checkpoint=self.checkpoint
        )


@dataclasses.dataclass
class TunedConfig:
    """The keys shared by ``recipes/eval.py`` and ``recipes/predict.py``: the tuned folder,
    how to rebuild its base backbone, and how to run it (see :mod:`ncfinetune.inference`)."""

    tuned: str = "runs/finetune/tuned"  # a folder written by recipes/finetune.py (its tuned/)
    # the base backbone: null = the one the folder records (base_model); a bundled name, a
    # recipes/pretrain.py folder or a timm name
    model: str | None = None
    pretrained: bool | None = None  # timm base: download its hub weights (null = as recorded)
    checkpoint: str | None = None  # timm base: a local weights file (null = as recorded)
    verify_base: bool = True  # check the base weights' fingerprint (false: warn on a mismatch)
    image_size: int | None = None  # null = the size it was tuned at, else the backbone's
    batch_size: int = 256  # images per forward pass
    # no (fp32) | bf16 | auto (bf16 where the device has it natively); null = accelerate's
    # choice (ACCELERATE_MIXED_PRECISION; fp16: fp32)
    mixed_precision: str | None = "no"
    device: str | None = None  # null = cuda when available, else cpu

    def validate(self) -> list[str]:
        p = []
        if problem := precision_problem(self.mixed_precision, ("auto", *LOOP_PRECISIONS)):
            p.append(problem)
        if self.batch_size < 1:
            p.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.image_size is not None and self.image_size < 1:
            p.append(f"image_size must be >= 1 or null, got {self.image_size}")
        if not Path(self.tuned).is_dir():
            p.append(
                f"tuned {self.tuned} is not a folder: pass the tuned/ folder a finetune run "
                "wrote (e.g. runs/finetune/tuned)"
            )
        return p

    def load_kwargs(self) -> dict[str, Any]:
        """Arguments for ``ncfinetune.inference.load_tuned_folder`` (and predict/evaluate)."""
        return {
            "base_model": self.model,
            "pretrained": self.pretrained,
            "checkpoint": self.checkpoint,
            "verify_base": self.verify_base,
        }

    def run_kwargs(self) -> dict[str, Any]:
        """Image size, batch, precision (``auto`` resolved for the device) and device."""
        device = default_device(self.device)
        return {
            "image_size": self.image_size,
            "batch_size": self.batch_size,
            "precision": loop_precision(resolve_precision(self.mixed_precision, device)),
            "device": device,
        }
