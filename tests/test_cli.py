"""`bilm --help` and every subcommand's help are complete, with the same flag names throughout."""
import argparse

import pytest

from bilm.cli import build_parser, main

# What a flag means -> the one name every subcommand uses for it.
CANONICAL = {"output": "--out", "out": "--out", "config": "--config", "data": "--data",
             "checkpoint": "--checkpoint", "options": "--options", "weights": "--weights",
             "device": "--device", "batch_size": "--batch-size"}


def subcommands():
    parser, _ = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_subcommand_is_documented():
    names = set(subcommands())
    assert names == {"prepare", "train", "evaluate", "export", "embed", "dump-token-embeddings", "import-bilm-tf",
                     "convert-checkpoint", "export-onnx", "score"}
    for name, sub in subcommands().items():
        assert sub.description, f"bilm {name} has no description"
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"bilm {name} {action.option_strings[0]} has no help text"


def test_shared_flags_have_the_same_names():
    for name, sub in subcommands().items():
        for action in sub._actions:
            canonical = CANONICAL.get(action.dest)
            if canonical is not None and action.option_strings:
                assert canonical in action.option_strings, (
                    f"bilm {name}: {action.option_strings} should be spelled {canonical}")


@pytest.mark.parametrize("argv", [["--help"], *[[name, "--help"] for name in
                                                 ["prepare", "train", "evaluate", "export", "embed",
                                                  "dump-token-embeddings", "import-bilm-tf", "export-onnx",
                                                  "score"]]])
def test_help_prints_and_exits_cleanly(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: bilm" in capsys.readouterr().out
