"""The demo behind ``make run``: it deletes only output folders it created itself."""

from __future__ import annotations

import pytest

from kaedama import demo


def test_demo_refuses_a_non_empty_folder_it_did_not_create(tmp_path, capsys):
    mine = tmp_path / "precious"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert demo.main(["--out", str(mine)]) == 2
    assert "did not create" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    (tmp_path / "file").write_text("x")
    assert demo.main(["--out", str(tmp_path / "file")]) == 2
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("exists", [False, True])
def test_demo_marks_a_new_or_empty_folder_and_clears_only_its_own(tmp_path, exists):
    out = tmp_path / "demo"
    if exists:
        out.mkdir()
    demo.prepare_output(out, fresh=True)
    assert (out / demo.MARKER).is_file()
    (out / "train").mkdir()
    (out / "train" / "old.pt").write_bytes(b"previous run")
    demo.prepare_output(out, fresh=True)  # its own folder: cleared for the new run
    assert sorted(p.name for p in out.iterdir()) == [demo.MARKER]
    (out / "keep.txt").write_text("kept")
    demo.prepare_output(out, fresh=False)
    assert (out / "keep.txt").is_file()


def test_demo_fine_tunes_lite0_from_bundled_imagenet_weights(tmp_path):
    """The pipeline's train step, as the demo sets it, is a valid kaedama train call that
    starts from the ImageNet weights the train extra installs (resolved offline, no hub)."""
    import argparse

    from kaedama.commands import train as command
    from kaedama.train.weights import BUNDLED, resolve_source

    config = demo.DemoConfig()
    argv = ["m.jsonl", "--out", str(tmp_path), "--model", config.model, "--pretrained"]
    argv += ["--img-size", str(config.img_size), "--epochs", str(config.epochs)]
    for item in demo.train_options(config):  # as components/stages.py passes them
        argv += ["--set", item]
    parser = argparse.ArgumentParser()
    command.configure(parser)
    cfg = command.config_from_args(parser.parse_args(argv))
    assert (cfg.model, cfg.pretrained) == ("tf_efficientnet_lite0", True)
    assert (cfg.hflip, cfg.lr, cfg.img_size) == (0.0, config.lr, config.img_size)
    if BUNDLED[cfg.model].installed():
        assert resolve_source(cfg.model, pretrained=True).kind == "package"
