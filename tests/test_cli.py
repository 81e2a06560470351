"""Every command's --help renders: argparse formats help text with %, so a flag's docstring that
says "13-22%" unescaped breaks the help of every command that takes engine flags."""

import pytest

from mnemosyne.cli import build_parser

COMMANDS = [[], ["serve"], ["generate"], ["bench"], ["bench", "latency"], ["bench", "serve"], ["profile"],
            ["simulate"], ["plan"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "mnemosyne")
def test_help_renders(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mnemosyne")
    if command in (["serve"], ["generate"], ["bench", "latency"], ["profile"], ["simulate"]):
        assert "--cudnn-ragged" in out  # the engine flag whose docstring has the % signs
