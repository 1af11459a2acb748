from dataclasses import dataclass

import pytest

from ncfinetune.config import parse_config, parse_overrides
from ncfinetune.errors import ConfigError


@dataclass
class Toy:
    name: str = "a"
    lr: float = 0.1
    epochs: int = 3
    flag: bool = False
    block: str | None = "4"
    classes: list[int] | None = None
    limit: int | None = None

    def validate(self):
        return [f"lr must be > 0, got {self.lr}"] if self.lr <= 0 else []


def test_yaml_then_cli_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.5\nepochs: 7\nclasses: [5, 6]\n")
    cfg = parse_config(Toy, ["--config", str(f), "--epochs", "9", "--flag", "--block=layer3.0"])
    assert (cfg.lr, cfg.epochs, cfg.flag, cfg.block, cfg.classes) == (
        0.5,
        9,
        True,
        "layer3.0",
        [5, 6],
    )
    cfg = parse_config(Toy, ["--classes", "5,6,7", "--limit", "none", "--block", "null"])
    assert cfg.classes == [5, 6, 7] and cfg.limit is None and cfg.block is None


def test_every_problem_is_listed_in_one_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_config(Toy, ["--epochs", "2.5", "--flag", "maybe", "--lrr", "1", "stray"])
    msg = str(e.value)
    assert msg.startswith("4 problem(s) in the config")
    assert "epochs: expected an integer, got '2.5'" in msg
    assert "flag: expected true/false, got 'maybe'" in msg
    assert "unknown key 'lrr' (did you mean lr?)" in msg
    assert "unexpected argument 'stray'" in msg
    assert "Valid keys: name, lr, epochs" in msg


def test_validate_runs_after_types(tmp_path):
    with pytest.raises(ConfigError, match="lr must be > 0, got -1.0"):
        parse_config(Toy, ["--lr", "-1"])


def test_bad_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(Toy, ["--config", str(tmp_path / "nope.yaml")])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_config(Toy, ["--config", str(tmp_path / "list.yaml")])


def test_parse_overrides_forms():
    assert parse_overrides(["--a", "1", "--b=2", "--c", "--d-e", "x"]) == (
        None,
        {"a": "1", "b": "2", "c": "true", "d_e": "x"},
        [],
    )
