import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from components.student import StudentConfig
from components.teacher import TeacherConfig
from kd_lib.config import ConfigError, add_arguments, check, check_name, field_help, from_args, from_dict


@dataclass
class Example:
    name: str = "x"
    count: int = 1
    rate: float = 0.5
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    items: list[int] = field(default_factory=list)
    mapping: dict[str, str] = field(default_factory=dict)

    def validate(self):
        check(self.count >= 0, "count", "must be >= 0")


def test_values_are_coerced_from_strings_and_numbers():
    config = from_dict(Example, {"count": "3", "rate": 2, "flag": "true", "mode": "b", "items": "1,2",
                                 "mapping": "a=x,b=y"})
    assert (config.count, config.rate, config.flag, config.mode) == (3, 2.0, True, "b")
    assert config.items == [1, 2] and config.mapping == {"a": "x", "b": "y"}
    assert from_dict(Example, {"count": 4.0}).count == 4  # KFP passes struct numbers as floats


@pytest.mark.parametrize("data, field_name, words", [
    ({"cuont": 1}, "cuont", "unknown field"),
    ({"count": "three"}, "count", "integer"),
    ({"count": 1.5}, "count", "integer"),
    ({"rate": "fast"}, "rate", "number"),
    ({"flag": "maybe"}, "flag", "true or false"),
    ({"mode": "c"}, "mode", "one of"),
    ({"count": -1}, "count", ">= 0"),
    ({"mapping": "novalue"}, "mapping", "name=value"),
])
def test_errors_name_the_field(data, field_name, words):
    with pytest.raises(ConfigError) as err:
        from_dict(Example, data)
    assert err.value.field == field_name
    assert repr(field_name) in str(err.value) and words in str(err.value)


def test_stage_configs_check_values():
    base = {"data": "d", "out": "o"}
    with pytest.raises(ConfigError, match="'hr_size'.*not divisible by ratio 3"):
        from_dict(TeacherConfig, {**base, "hr_size": 64, "ratio": 3})
    with pytest.raises(ConfigError, match="'data'.*required"):
        from_dict(TeacherConfig, {"out": "o"})
    with pytest.raises(ConfigError, match="'assistant'.*required with method tas"):
        from_dict(StudentConfig, base)
    with pytest.raises(ConfigError, match="'teacher'.*not both"):
        from_dict(StudentConfig, {**base, "method": "kd+isrd", "teacher": "t", "assistant": "a"})
    with pytest.raises(ConfigError, match="'teacher'.*required with method 'at'"):
        from_dict(StudentConfig, {**base, "method": "at"})
    with pytest.raises(ConfigError, match="'teacher'.*not used with method 'ce'"):
        from_dict(StudentConfig, {**base, "method": "ce", "teacher": "t"})
    with pytest.raises(ConfigError, match="'milestones'"):
        from_dict(TeacherConfig, {**base, "schedule": "step"})
    with pytest.raises(ConfigError, match="'method'.*'fitnets' is not a method"):
        from_dict(StudentConfig, {**base, "method": "fitnets", "assistant": "a"})


def test_yaml_file_and_flags_flags_win(tmp_path):
    path = tmp_path / "teacher.yaml"
    path.write_text("data: d\nout: o\nepochs: 7\nlr: 0.2\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser, TeacherConfig)
    config = from_args(TeacherConfig, parser.parse_args(["--config", str(path), "--lr", "0.3"]))
    assert (config.epochs, config.lr, config.arch) == (7, 0.3, "resnet34")
    path.write_text("data: d\nout: o\nepoch: 7\n")
    with pytest.raises(ConfigError, match=r"teacher.yaml: field 'epoch': unknown field"):
        from_args(TeacherConfig, parser.parse_args(["--config", str(path)]))


@dataclass
class _Documented:
    source: str = ""
    """where the data is"""
    mode: Literal["fast", "slow"] = "fast"
    """how to go"""
    models: dict[str, str] = field(default_factory=dict)
    retries: int = field(default=2, metadata={"help": "how often to try again"})

    def validate(self) -> None:
        check(bool(self.source), "source", "is required: a URI")
        check(bool(self.models), "models", "is required: name=URI of each model")


def test_field_help_is_read_from_the_dataclass():
    assert field_help(_Documented) == {
        "source": "where the data is (REQUIRED)",
        "mode": "how to go (choices: fast, slow; default: fast)",
        "models": "(REQUIRED: name=URI of each model)",
        "retries": "how often to try again (default: 2)",
    }


def test_check_name_gives_close_matches():
    with pytest.raises(ConfigError, match=r"field 'arch': unknown architecture 'resnet19' \(close matches: resnet18"):
        check_name("resnet19", ["resnet18", "resnet34", "vit_b_16"], "arch", "architecture")
    with pytest.raises(ConfigError, match=r"none of the 2 known is close"):
        check_name("zzz", ["resnet18", "vit_b_16"], "arch", "architecture")
    check_name("resnet18", ["resnet18"], "arch", "architecture")
