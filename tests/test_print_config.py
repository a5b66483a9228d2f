"""`--print-config`: the resolved config as YAML that loads back to the same config, every key with its meaning."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from aip.config import Config, load_config
from aip.config_doc import render_config
from aip.train import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
OVERRIDES = ["train.lr=0.01", "disc.hidden=[4, 8]", "model.checkpoint_rename={'.a.': '.b.'}", "export.formats=[onnx]"]


def _sections(node: object, prefix: str = ""):
    """(dotted key, dataclass field) for every field of the config, sections and leaves."""
    for f in dataclasses.fields(node):
        yield f"{prefix}{f.name}", f
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _sections(value, f"{prefix}{f.name}.")


def _printed(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(["--print-config", *argv]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def test_the_output_loads_back_to_the_same_config(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    out = _printed(capsys, ["--config", str(CONFIGS / "debug.yaml"), "--set", *OVERRIDES])
    assert list(tmp_path.iterdir()) == []  # no run directory, no runs/
    (tmp_path / "printed.yaml").write_text(out)
    want = load_config(CONFIGS / "debug.yaml", OVERRIDES)
    assert load_config(tmp_path / "printed.yaml").to_dict() == want.to_dict()
    assert want.name == "debug" and want.train.lr == 0.01  # the file's name and the --set values, not defaults


def test_defaults_print_without_a_config(tmp_path: Path, capsys) -> None:
    (tmp_path / "defaults.yaml").write_text(_printed(capsys, []))
    assert load_config(tmp_path / "defaults.yaml").to_dict() == Config().to_dict()


def test_set_values_show_under_their_section(capsys) -> None:
    lines = _printed(capsys, ["--config", str(CONFIGS / "debug.yaml"), "--set", *OVERRIDES]).splitlines()
    section = {line.rstrip(":") for line in lines if line and not line.startswith((" ", "#"))}
    assert {"model", "train", "disc", "export"} <= section
    train = lines.index("train:")
    assert "  lr: 0.01" in lines[train : lines.index("prune:")]
    assert "  hidden: [4, 8]" in lines and "  checkpoint_rename: {.a.: .b.}" in lines and "  formats: [onnx]" in lines


def test_every_key_has_its_one_line_meaning_above_it() -> None:
    cfg = Config()
    fields = dict(_sections(cfg))
    missing = [key for key, f in fields.items() if not f.metadata.get("help", "").strip()]
    assert missing == [], f"fields without help: {missing}"
    lines = render_config(cfg).splitlines()
    path: list[str] = []
    keys = []
    for i, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        path[depth:] = [line.strip().split(":", 1)[0]]
        key = ".".join(path)
        keys.append(key)
        comment = lines[i - 1].strip()
        assert comment == f"# {' '.join(fields[key].metadata['help'].split())}", key
    assert keys == list(fields)  # every key of the config, in its order, each once


def test_help_names_it(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--print-config" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--set", "prune.criterion=magic"], "error: prune.criterion: 'magic' is not allowed"),
        (["--set", "export.formats=[pt2, tflite]"], "error: export.formats[1]: 'tflite' is not allowed"),
        (["--resume", "auto"], "error: --print-config prints --config with --set"),
    ],
)
def test_a_bad_config_is_one_error_line(capsys, argv: list[str], fragment: str) -> None:
    assert main(["--print-config", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(fragment) and err.count("\n") == 1
