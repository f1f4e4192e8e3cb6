"""The command line never prints a traceback for a user's mistake: one line, exit 2; Ctrl-C
leaves nothing half-written and says how to resume; a torn log line does not block --resume."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from fused_losses.cli import main as cli_main
from fused_losses.trainer import loop

from .trainer_helpers import losses, tiny_args


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


@pytest.fixture
def no_model(monkeypatch):
    """Mistakes on the command line are found before the model is built."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the command line was checked")
    monkeypatch.setattr(loop, "build_model", refuse)


@pytest.mark.parametrize("flags,message", [
    ({"min_lr_ratio": -0.1}, "--min-lr-ratio must be a finite number >= 0, got -0.1"),
    ({"lr": "nan"}, "--lr must be a finite number >= 0, got nan"),
    ({"lr": "inf"}, "--lr must be a finite number >= 0, got inf"),
    ({"beta": "inf"}, "--beta must be a finite number >= 0, got inf"),
    ({"grad_clip": "nan"}, "--grad-clip must be a finite number >= 0, got nan"),
    ({"grad_accum": 0}, "--grad-accum must be >= 1, got 0"),
    ({"threads": -1}, "--threads must be in [1, "),
    ({"loss_kwargs": '{"max_wieght": 5}'},
     "--loss-kwargs 'max_wieght': not an option of sft_loss"),
    ({"loss_kwargs": '{"beta": NaN}'}, "--loss-kwargs is not valid JSON (NaN is not a finite"),
    ({"loss_type": "ipo"}, "--loss-type: not an option of sft_loss"),
    ({"train_size": 0}, "--train-size must be >= 1, got 0"),
    ({"threads": 100000}, "--threads must be in [1, "),  # torch's thread pool segfaulted
    ({"reward_model": "sft-model"}, "--reward-model is read only by --objective reinforce, "
                                    "not sft"),
    ({"bogus_flag": 1}, "unrecognized arguments: --bogus-flag 1"),
])
def test_bad_flags_are_one_line_before_anything_is_built(tmp_path, capsys, no_model, flags,
                                                         message):
    assert loop.main(tiny_args(tmp_path / "run", "sft", **flags)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err  # not argparse's usage
    assert not (tmp_path / "run").exists()


def test_output_dir_that_is_a_file_or_under_one(tmp_path, capsys, no_model):
    path = tmp_path / "file.txt"
    path.write_text("not a directory")
    assert loop.main(tiny_args(path, "sft")) == 2
    assert f"--output-dir {path} is a file" in one_line_error(capsys)
    assert loop.main(tiny_args(path / "run", "sft")) == 2
    assert f"--output-dir {path / 'run'} is under {path}, which is a file" \
        in one_line_error(capsys)
    assert loop.main(tiny_args(tmp_path / "run", "sft", tokenizer_cache=path / "cache")) == 2
    assert f"--tokenizer-cache {path / 'cache'} is under {path}, which is a file" \
        in one_line_error(capsys)
    assert path.read_text() == "not a directory"


@pytest.fixture
def quiet_transformers():
    """transformers warns about a bad config on its own logger, whose handler may hold a
    stream another test captured; only our line is under test."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    yield
    logging.set_verbosity(verbosity)


@pytest.mark.parametrize("config,message", [
    ('{"model_type": "nope"}', "unknown model_type 'nope'"),
    ('[1, 2]', "needs a JSON object with a 'model_type'"),
    ('{"model_type": "llama", "hidden_size": "big"}', "cannot build this model"),
    ('{"model_type": "llama", "hidden_size": 30, "num_attention_heads": 4}',
     "cannot build this model"),
    ('{"model_type": "llama", "vocab_size": -5}', "cannot build this model"),
    # a logit multiplier the trainer does not read from the config: a different loss
    ('{"model_type": "falcon_h1", "vocab_size": 1024, "hidden_size": 16, '
     '"intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, '
     '"num_key_value_heads": 1, "mamba_d_ssm": 16, "mamba_n_heads": 2, "mamba_d_head": 8, '
     '"mamba_d_state": 8, "mamba_n_groups": 1, "lm_head_multiplier": 0.5}',
     "transforms its head's output"),
])
def test_invalid_model_config_is_one_line(tmp_path, capsys, quiet_transformers, config,
                                          message):
    assert loop.main(["--objective", "sft", "--output-dir", str(tmp_path / "run"),
                      "--model-config", config, "--no-progress"]) == 2
    line = one_line_error(capsys)
    assert line.startswith("fused-losses train: error: --model-config") and message in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,message", [
    (["--gpu-mem", "inf"], "--gpu-mem must be a finite number of GiB, got inf"),
    (["--reserve", "nan"], "--reserve must be a finite number of GiB, got nan"),
    (["--plot", "/no/such/folder/plan.png"], "folder /no/such/folder does not exist"),
])
def test_plan_mistakes_are_one_line(capsys, argv, message):
    assert cli_main(["plan", "--model", "llama3-8b", *argv]) == 2
    assert message in one_line_error(capsys)


def test_plan_plot_is_a_file_not_a_folder(tmp_path, capsys):
    assert cli_main(["plan", "--model", "llama3-8b", "--plot", str(tmp_path)]) == 2
    assert "is a directory" in one_line_error(capsys)


def test_ctrl_c_leaves_whole_files_and_says_how_to_resume(tmp_path, tok_cache):
    out = tmp_path / "run"
    # far more steps than run before the signal: on a loaded machine this process may be
    # descheduled for seconds after the 6th line, and 16 steps were then done (exit 0)
    flags = dict(max_steps=10_000, save_every=4, max_length=200)
    # SIGINT's default action in the run even where this suite runs with it ignored (a
    # background job: the run would inherit SIG_IGN and never see the Ctrl-C)
    proc = subprocess.Popen([sys.executable, "-m", "fused_losses.train",
                             *tiny_args(out, "dpo", **flags)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # past the first checkpoint
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 6:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before Ctrl-C: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "interrupted after" in line and "checkpoint.pt holds step" in line, line
    assert line.endswith("--resume"), line
    assert not list(out.glob("*.tmp*"))  # nothing half-written is left behind
    saved = int(line.split("holds step ")[1].split(";")[0])
    assert saved >= 4 and saved % 4 == 0

    flags["max_steps"] = saved + 4  # --max-steps may change on resume
    loop.train(loop.parse_args(tiny_args(out, "dpo", resume=True, **flags)))
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == \
        list(range(1, saved + 5))


def test_a_torn_last_log_line_does_not_block_resume(tmp_path, tok_cache, capsys):
    out = tmp_path / "run"
    loop.train(loop.parse_args(tiny_args(out, "sft", max_steps=2)))
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "loss": 6.9')  # killed mid-write
    assert loop.main(tiny_args(out, "sft", max_steps=3, resume=True)) == 0
    assert f"dropped the torn last line of {metrics}" in capsys.readouterr().err
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3]
    assert len(losses(out)) == 3
