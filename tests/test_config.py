from dataclasses import dataclass, field

import pytest

from ncfinetune.recipes.config import parse_config, parse_overrides
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


# -- --help from the dataclass, differences, the command-line wrapper ---------------------------
@dataclass
class Documented:
    # a heading: a blank line separates it from the field below

    plain: int = 1  # the comment on the field's line
    # the comment lines directly above a field
    # describe it, joined into one line
    above: float | None = None
    helped: list[int] | None = field(default=None, metadata={"help": "metadata wins"})  # not this
    bare: str = "x"


def test_field_help_comes_from_metadata_then_comments():
    from ncfinetune.recipes.config import field_help

    assert field_help(Documented) == {
        "plain": "the comment on the field's line",
        "above": "the comment lines directly above a field describe it, joined into one line",
        "helped": "metadata wins",
        "bare": "",
    }


def test_help_lists_every_key_with_type_default_and_description(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("plain: 7\n")
    with pytest.raises(SystemExit) as e:
        parse_config(Documented, ["--config", str(f), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: test_config.py [--config FILE.yaml]")
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  --")}
    assert list(lines) == ["--plain", "--above", "--helped", "--bare", "--debug"]
    assert lines["--plain"].split()[1:4] == ["int", "7", "the"]  # the file's value is the default
    assert lines["--above"].split()[1:3] == ["float|null", "null"]
    assert lines["--helped"].split()[1:] == ["list[int]|null", "null", "metadata", "wins"]
    with pytest.raises(SystemExit):
        parse_config(Documented, ["-h"])


def test_help_prints_on_rank_zero_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        parse_config(Documented, ["--help"])
    assert capsys.readouterr().out == ""


def test_config_differences_lists_key_saved_now():
    from ncfinetune.recipes.config import config_differences

    saved = {"plain": 1, "above": 0.5, "helped": [1, 2], "bare": "x"}
    now = Documented(plain=2, above=0.5, helped=[1, 3], bare="x")
    assert config_differences(saved, now) == ["plain: 1 -> 2", "helped: 1,2 -> 1,3"]
    assert config_differences(saved, now, ignore=["plain"]) == ["helped: 1,2 -> 1,3"]
    # a key an older config file lacks counts as its default
    assert config_differences({}, Documented(above=0.1)) == ["above: null -> 0.1"]


def test_run_cli_prints_the_message_and_exits_2(capsys, monkeypatch):
    from ncfinetune.recipes.config import run_cli
    from ncfinetune.errors import DataError

    def main(argv):
        assert "--debug" not in argv
        raise DataError("no such dataset; use digits")

    with pytest.raises(SystemExit) as e:
        run_cli(main, ["--x", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no such dataset; use digits\n") and "Traceback" not in err
    with pytest.raises(DataError):  # --debug: the exception itself, with its traceback
        run_cli(main, ["--debug"])
    monkeypatch.setenv("RANK", "1")  # another process of the launch: exits 2 without printing
    with pytest.raises(SystemExit) as e:
        run_cli(main, [])
    assert e.value.code == 2 and capsys.readouterr().err == ""
    assert run_cli(lambda argv: argv, ["--a", "1"]) == ["--a", "1"]
