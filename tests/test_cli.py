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
                     "convert-checkpoint", "export-onnx", "score", "probe"}
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


def _run_with_failing_command(error: str):
    """``bilm export`` whose work raises ``error`` (Python source), run as a user runs bilm: its
    exit status and stderr."""
    import os
    import subprocess
    import sys

    code = ("import sys, warnings, bilm.cli as cli, bilm.core.errors\n"
            "build = cli.build_parser\n"
            "def build_parser():\n"
            "    parser, handlers = build()\n"
            f"    def failing(args):\n        raise {error}\n"
            "    handlers['export'] = failing\n"
            "    return parser, handlers\n"
            "cli.build_parser = build_parser\n"
            "sys.exit(cli.main(['export', '--checkpoint', 'run', '--out', 'out']))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": root})
    return done.returncode, done.stderr


@pytest.mark.parametrize("error", ["ValueError('a bug')", "KeyError('a bug')", "TypeError('a bug')"])
def test_a_bug_is_not_reported_as_a_user_error(error):
    returncode, stderr = _run_with_failing_command(error)
    assert returncode != 0, stderr
    assert "Traceback (most recent call last)" in stderr and "a bug" in stderr
    assert "bilm export: error:" not in stderr


@pytest.mark.parametrize("error,line", [
    ("bilm.core.errors.InputError('run/x.pt: not a checkpoint')", "bilm export: error: run/x.pt: not a checkpoint"),
    ("FileNotFoundError('no checkpoint in run')", "bilm export: error: no checkpoint in run"),
    ("OSError(28, 'No space left on device', 'out/weights.hdf5')",
     "bilm export: error: out/weights.hdf5: No space left on device"),
    ("bilm.core.errors.CheckpointWriteError(28, 'No space left on device', 'run/c.pt')",
     "bilm export: error: run/c.pt: No space left on device")])
def test_user_errors_are_one_line(error, line):
    returncode, stderr = _run_with_failing_command(error)
    assert returncode == 1 and stderr.strip() == line, stderr


def test_every_user_facing_error_derives_from_bilm_error():
    from bilm.core.errors import BilmError
    from bilm.formats.bilmtf import TFCheckpointError
    from bilm.runs.checkpoint import CheckpointError, CheckpointRefused
    from bilm.runs.config import ConfigError
    from bilm.commands.continue_tf import TFStartError
    from bilm.core.errors import CheckpointWriteError, InputError, MissingExtra, RunDirectoryLocked
    from bilm.inference.onnx_runtime import OnnxModelError
    from bilm.core.options import OptionsError
    from bilm.modules.published import ModelUnavailable
    from bilm.core.schema import FieldError, SchemaError
    from bilm.core.vocab import VocabularyError
    from bilm.formats.weights import WeightFileError
    from data_tools.prepare import PrepareError
    for cls in (TFCheckpointError, CheckpointError, CheckpointRefused, ConfigError, TFStartError, CheckpointWriteError,
                InputError, MissingExtra, RunDirectoryLocked, OnnxModelError, OptionsError, ModelUnavailable,
                FieldError, SchemaError, VocabularyError, WeightFileError, PrepareError):
        assert issubclass(cls, BilmError), cls


# Every subcommand that draws a progress bar can be told not to (logs, scripts, CI).
WITH_PROGRESS_BARS = ["prepare", "train", "evaluate", "embed", "dump-token-embeddings", "score", "probe"]


@pytest.mark.parametrize("name", WITH_PROGRESS_BARS)
def test_commands_with_a_progress_bar_take_no_progress(name):
    assert any("--no-progress" in action.option_strings for action in subcommands()[name]._actions), name


def test_no_progress_silences_the_embed_and_dump_bars(tmp_path, capsys):
    import os

    model = os.path.join(os.path.dirname(__file__), "fixtures", "bilm-tf", "model")
    files = ["--options", os.path.join(model, "options.json"), "--weights", os.path.join(model, "lm_weights.hdf5")]
    (tmp_path / "in.txt").write_text("The cat sat .\nA dog ran .\n")
    (tmp_path / "vocab.txt").write_text("<S>\n</S>\n<UNK>\nThe\ncat\n")
    for quiet in (False, True):
        flag = ["--no-progress"] if quiet else []
        assert main(["embed", *files, "--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "e.h5"),
                     "--force", *flag]) == 0
        assert main(["dump-token-embeddings", *files, "--vocab", str(tmp_path / "vocab.txt"), "--out",
                     str(tmp_path / f"t{quiet}.h5"), *flag]) == 0
        err = capsys.readouterr().err
        assert [bar in err for bar in ("embed:", "tokens:")] == [not quiet, not quiet], err


def test_bilm_warnings_read_as_the_cli_s_other_messages():
    """Under the CLI, a warning of bilm's own prints as "warning: ...", without Python's file:line and
    source line; another library's keeps Python's format."""
    status, err = _run_with_failing_command(
        "(warnings.warn_explicit('ours', UserWarning, __import__('bilm.training.checkpointer').training."
        "checkpointer.__file__, 1), warnings.warn_explicit('theirs', UserWarning, '/elsewhere/lib.py', 7), "
        "bilm.core.errors.InputError('stop'))[-1]")
    assert status == 1
    assert err.splitlines() == ["warning: ours", "/elsewhere/lib.py:7: UserWarning: theirs",
                                "bilm export: error: stop"], err


def test_train_on_raw_text_says_to_prepare_it_first(tmp_path, capsys):
    import os

    text = tmp_path / "notes.txt"
    text.write_text("Some raw text, as a user has it.\n")
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")
    assert main(["train", "--config", config, "--data", str(text), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--data {text}: no manifest.json, so no vocabulary: prepare the text first " \
        f"(bilm prepare {text} --out DIR, then --data DIR/manifest.json)" in err, err
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_train_on_a_manifest_without_its_vocab_key_is_one_error(tmp_path, capsys):
    import json
    import os

    (tmp_path / "c.txt").write_text("a b c .\nb c d .\n" * 20)
    assert main(["prepare", str(tmp_path / "c.txt"), "--out", str(tmp_path / "data"), "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    del manifest["vocab"]
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest))
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")
    capsys.readouterr()
    assert main(["train", "--config", config, "--data", str(tmp_path / "data" / "manifest.json"), "--out",
                 str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "manifest.json: key 'vocab' must name the vocabulary file (or give --vocab)" in err


def test_a_real_bilm_warning_prints_as_one_warning_line(tmp_path):
    """End to end, the warning of a resume with another batch size: `warning: ...` on stderr, no
    Python file:line, no source line."""
    import os
    import subprocess
    import sys

    from train_helpers import ROOT, TRAIN_DATA, TRAIN_VOCAB

    def bilm_train(*sets):
        argv = [sys.executable, "-m", "bilm.cli", "train", "--config", os.path.join(ROOT, "configs", "tiny.yaml"),
                "--data", TRAIN_DATA, "--vocab", TRAIN_VOCAB, "--out", str(tmp_path / "run"), "--resume",
                "--no-progress", "--set", "train.eval_every_steps=0", *[a for s in sets for a in ("--set", s)]]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        return done.stderr

    bilm_train("train.max_steps=2", "train.batch_size=4")
    err = bilm_train("train.max_steps=3", "train.batch_size=2")
    lines = [line for line in err.splitlines() if "data reader changed" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "batch_size 4 -> 2" in lines[0], err
    assert "UserWarning" not in err and "warnings.warn" not in err, err
