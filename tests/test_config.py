from dataclasses import dataclass

import pytest

from ncfinetune.errors import ConfigError
from ncfinetune.recipes.config import key, parse_config, section


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


def test_a_list_given_as_separate_words_says_how_to_write_it():
    with pytest.raises(ConfigError) as e:
        parse_config(Toy, ["--classes", "5", "6", "7"])
    msg = str(e.value)
    assert msg.startswith("2 problem(s) in the config")
    assert (
        "unexpected argument '6' (use --key value; a list is one value, comma-separated: "
        "--classes 5,6,7)" in msg
    )


def test_validate_runs_after_types(tmp_path):
    with pytest.raises(ConfigError, match="lr must be > 0, got -1.0"):
        parse_config(Toy, ["--lr", "-1"])


def test_bad_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(Toy, ["--config", str(tmp_path / "nope.yaml")])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_config(Toy, ["--config", str(tmp_path / "list.yaml")])


def test_command_line_forms():
    # --key value, --key=value, a bare --flag (true), dashes for underscores, a value that
    # starts with a dash
    cfg = parse_config(Toy, ["--lr", "1", "--epochs=2", "--flag", "--block", "-1", "--name=-x"])
    assert (cfg.lr, cfg.epochs, cfg.flag, cfg.block, cfg.name) == (1.0, 2, True, "-1", "-x")
    assert parse_config(Toy, ["--flag", "--limit", "3"]).limit == 3


# -- sections: nested dataclasses, a flat command line, YAML by section or flat -----------------
@dataclass
class Method:
    """How the model is tuned."""

    method: str = key("scl", "the method")
    block: str | None = key("4", "the block")

    def validate(self):
        return [] if self.method in ("scl", "layer") else [f"method {self.method!r} is unknown"]


@dataclass
class Optim:
    """The optimiser."""

    lr: float = key(0.1, "the learning rate")
    classes: list[int] = key([1, 2], "a list default, copied per instance")


@dataclass
class Sectioned:
    method: Method = section(Method)
    optim: Optim = section(Optim)


def test_sections_take_flat_command_line_keys_and_sectioned_or_flat_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method:\n  block: 2\noptim: {lr: 0.5}\nmethod_x: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'method_x'"):
        parse_config(Sectioned, ["--config", str(f)])
    f.write_text("method:\n  block: 2\nlr: 0.5\n")  # a section and a flat key
    cfg = parse_config(Sectioned, ["--config", str(f), "--method", "layer"])
    assert (cfg.method.method, cfg.method.block, cfg.optim.lr) == ("layer", "2", 0.5)
    assert cfg.optim.classes == [1, 2] and cfg.optim.classes is not Sectioned().optim.classes
    f.write_text("optim:\n  block: 2\n")
    with pytest.raises(ConfigError, match=r"key 'block' belongs in section method, not optim"):
        parse_config(Sectioned, ["--config", str(f)])
    with pytest.raises(ConfigError) as e:  # each section validates; every problem in one error
        parse_config(Sectioned, ["--method", "nope", "--lr", "x"])
    assert "lr: expected a number, got 'x'" in str(e.value)
    with pytest.raises(ConfigError, match=r"(?s)1 problem.*method 'nope' is unknown"):
        parse_config(Sectioned, ["--method", "nope"])


def test_saved_sectioned_config_round_trips_and_differences_are_by_key(tmp_path):
    from ncfinetune.recipes.config import config_differences, save_config

    cfg = parse_config(Sectioned, ["--lr", "0.2"])
    save_config(cfg, tmp_path / "config.yaml")
    assert (tmp_path / "config.yaml").read_text().startswith("method:\n  method: scl\n")
    again = parse_config(Sectioned, ["--config", str(tmp_path / "config.yaml")])
    assert again == cfg
    now = parse_config(Sectioned, ["--lr", "0.3", "--block", "1"])
    import yaml

    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config_differences(saved, now) == ["block: 4 -> 1", "lr: 0.2 -> 0.3"]
    assert config_differences({"lr": 0.3, "block": "1"}, now) == []  # a flat saved file


def test_help_is_grouped_by_section(capsys):
    with pytest.raises(SystemExit):
        parse_config(Sectioned, ["--help"])
    out = capsys.readouterr().out
    assert (
        out.index("method:\n  How the model is tuned.")
        < out.index("--block")
        < out.index("optim:\n  The optimiser.")
        < out.index("--lr")
    )


# -- --help from the dataclass, differences, the command-line wrapper ---------------------------
@dataclass
class Documented:
    plain: int = key(1, "the help of the field")
    above: float | None = key(None, "described, with a % sign")
    helped: list[int] | None = key(None, "metadata wins")
    bare: str = "x"


def test_help_lists_every_key_with_type_default_and_description(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("plain: 7\n")
    with pytest.raises(SystemExit) as e:
        parse_config(Documented, ["--config", str(f), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: test_config [--config FILE.yaml] [--KEY VALUE ...] [--debug]")
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  --")}
    assert list(lines) == ["--config", "--debug", "--plain", "--above", "--helped", "--bare"]
    assert lines["--plain"].split()[1:] == "int the help of the field (default: 7)".split()
    assert (
        lines["--above"].split()[1:]
        == "float|null described, with a % sign (default: null)".split()
    )
    assert lines["--helped"].split()[1:] == "list[int]|null metadata wins (default: null)".split()
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
    from ncfinetune.errors import DataError
    from ncfinetune.recipes.config import run_cli

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


def test_the_tuning_section_is_checked_by_the_method_registry(monkeypatch):
    import warnings
    from typing import ClassVar

    from ncfinetune.recipes.sections import TuningSection
    from ncfinetune.tuning import methods

    assert TuningSection(method="lora", block=None).validate() == []
    assert TuningSection(method="layer", block=None).validate() == [
        "method 'layer' needs a block (index, name or auto)"
    ]
    assert (
        "method 'adapter' is not one of linear, layer, scl"
        in TuningSection("adapter").validate()[0]
    )

    @dataclass
    class ProbeOnly(methods.LinearConfig):  # a method registered later is valid at once
        name: ClassVar[str] = "probe-only"

    monkeypatch.setitem(methods.METHODS, "probe-only", ProbeOnly)
    assert TuningSection(method="probe-only", block=None).validate() == []
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        used = TuningSection(method="probe-only", block="3").without_unused()
    assert used.block is None and used.settings() == {"bn": None}
