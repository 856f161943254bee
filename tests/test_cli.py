"""The ``kaedama`` command: stage listing, help, not-built stages, config flags."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from kaedama import cli
from kaedama.config import ConfigError, add_config_arguments, build_config, parse_overrides


def _kaedama(*args, cwd=None):
    exe = os.path.join(os.path.dirname(sys.executable), "kaedama")
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_help_lists_every_stage_from_any_directory(tmp_path):
    result = _kaedama("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for stage in ("dedup", "split", "train", "evaluate", "export", "serve", "predict", "pipeline"):
        assert stage in result.stdout


def test_unbuilt_stage_says_so_and_fails(capsys):
    unbuilt = [s for s in cli.STAGES if cli._load(s) is None]
    if not unbuilt:
        pytest.skip("every stage is built")
    assert cli.main([unbuilt[0]]) == cli.NOT_BUILT_EXIT
    assert "not built yet" in capsys.readouterr().err


def test_no_stage_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "STAGE" in capsys.readouterr().out


@dataclass(frozen=True)
class _Cfg:
    name: str = field(default="resnet18", metadata={"help": "model"})
    lr: float = 0.1
    epochs: int = 3
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = (1, 2)
    hidden: str = field(default="x", metadata={"cli": False})


def _parser():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, _Cfg)
    return parser


def test_flags_mirror_fields_and_layers_apply_in_order(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.5\nepochs: 7\nsizes: [4, 5]\n")
    args = _parser().parse_args(["--epochs", "9", "--flag", "--mode", "b"])
    cfg = build_config(
        _Cfg, file=str(cfg_file), overrides=parse_overrides(["lr=0.25", "name=vit"]), args=args
    )
    # defaults < file < --set < explicit flags
    assert cfg == _Cfg(name="vit", lr=0.25, epochs=9, flag=True, mode="b", sizes=(4, 5))
    assert "--hidden" not in _parser().format_help()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"nope": "1"}, "unknown _Cfg field 'nope'"),
        ({"epochs": "three"}, "epochs"),
        ({"mode": "c"}, "not one of"),
        ({"flag": "maybe"}, "true/false"),
    ],
)
def test_bad_values_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(_Cfg, overrides=overrides)


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])


def test_a_bad_set_value_is_a_clean_error_naming_the_help(tmp_path, capsys):
    code = cli.main(["split", str(tmp_path / "m.jsonl"), "--out", str(tmp_path), "--set", "x=1"])
    assert code == 1
    err = capsys.readouterr().err
    assert "unknown SplitConfig field 'x'" in err
    assert "kaedama split --help" in err
    assert "Traceback" not in err
