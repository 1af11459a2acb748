"""Recipe configs: dataclasses + YAML + ``--key value`` overrides; no config framework.

``parse_config(Cls, argv)`` reads an optional ``--config FILE.yaml``, applies command-line
overrides on top, converts each value to the field's type, and validates. Every problem found
(unknown key, wrong type, invalid value) is collected and raised as one :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ncfinetune.errors import ConfigError
from ncfinetune.hub import DEFAULT_BACKBONE


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
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
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


def parse_config(cls: type, argv: list[str] | None = None, defaults_file: str | None = None):
    """Build a ``cls`` dataclass from an optional YAML file plus command-line overrides.

    Args:
        cls: a dataclass whose fields have defaults; its ``validate()`` (if any) returns a list of
            problems.
        argv: command-line arguments (without the program name).
        defaults_file: YAML file used when ``--config`` is not given.

    Raises:
        ConfigError: listing every problem found.
    """
    config_file, cli, problems = parse_overrides(list(argv or []))
    config_file = config_file or defaults_file
    types_ = _field_types(cls)
    values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {config_file} does not exist.")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {config_file} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file} must be a mapping of key: value.")
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
            + f"\nValid keys: {', '.join(types_)}."
        )
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as a plain dict (saved with each run)."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


@dataclasses.dataclass
class DownstreamConfig:
    """The backbone and downstream-data keys shared by ``recipes/finetune.py`` and
    ``recipes/select_block.py`` (each recipe's config extends it), and how both load them.

    ``per_class`` draws a class-balanced, seeded subset of the training split; the split itself
    (``test_fraction``, seeded) is the same in both recipes, so a block selected by one is
    selected on the training rows the other trains on.
    """

    # backbone: a bundled name, or any timm name with pretrained (hub) or checkpoint (local file)
    model: str = DEFAULT_BACKBONE
    pretrained: bool = False
    checkpoint: str | None = None
    # data
    dataset: str = "digits"
    data_dir: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    classes: list[int] | None = None
    per_class: int | None = None
    test_fraction: float = 0.2
    image_size: int | None = None
    seed: int = 0

    def validate(self) -> list[str]:
        p = []
        if self.pretrained and self.checkpoint:
            p.append("give pretrained or checkpoint, not both")
        if not 0 < self.test_fraction < 1:
            p.append(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        return p

    def load_data(self):
        """The dataset (``ncfinetune.data.ImageData``), restricted to ``classes`` if given."""
        from ncfinetune import data as nd

        data = nd.load_image_dataset(
            self.dataset,
            image_column=self.image_column,
            label_column=self.label_column,
            data_dir=self.data_dir,
            test_fraction=self.test_fraction,
            seed=self.seed,
        )
        return nd.select_classes(data, self.classes) if self.classes else data

    def load_model(self, num_classes: int):
        """The backbone with a fresh ``num_classes``-way classifier."""
        from ncfinetune.hub import create_backbone

        return create_backbone(
            self.model, num_classes, pretrained=self.pretrained, checkpoint=self.checkpoint
        )
