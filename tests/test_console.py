"""What a newcomer sees: user-facing help, a log file instead of library noise, and one
line naming the failed stage and its cause."""

from __future__ import annotations

import logging
import os

import pytest

from thinkfast.errors import CheckpointError
from thinkfast_pipelines import console


@pytest.fixture(autouse=True)
def _restore_console_env(monkeypatch):
    """console.setup writes its choices into the environment; undo them after each test."""
    for name in (console.VERBOSE_ENV, console.LOG_FILE_ENV, console.RAY_DATA_LOGGING_CONFIG):
        monkeypatch.delenv(name, raising=False)


def test_help_talks_to_users(capsys):
    from thinkfast_pipelines.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "type a sentence, get the images" in out and "thinkfast demo" in out
    assert "add_arguments" not in out and "Each subcommand lives" not in out  # no developer docstring


def test_failure_reason_finds_the_cause_inside_a_ray_traceback():
    # the shape of Ray Train's TrainingFailedError: the worker's traceback as text
    text = (
        "Training failed due to worker errors:\n[Rank 0]\nTraceback (most recent call last):\n"
        '  File "/x/io.py", line 56, in _read_checkpoint_config\n'
        "    raise CheckpointError(f\"{directory} is not a model directory\")\n"
        "thinkfast.errors.CheckpointError: runs/demo/fast_nce is not a model directory\n"
    )
    assert console.failure_reason(RuntimeError(text)) == "runs/demo/fast_nce is not a model directory"
    assert console.failure_reason(RuntimeError("x\nValueError: bad shape\n")) == "ValueError: bad shape"
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = CheckpointError("m is not a model directory")
    assert console.failure_reason(wrapped) == "m is not a model directory"
    assert console.failure_reason(OSError()) == "OSError"


def test_a_failed_demo_stage_is_one_line_with_the_log(tmp_path, monkeypatch, capsys):
    """Stage 2 fails inside the library: the terminal gets one line, the log the traceback."""
    from thinkfast_pipelines import cli, demo

    def broken_train_slow(*args, **kwargs):
        raise CheckpointError("models/slow is not a model directory")

    monkeypatch.setattr("thinkfast_pipelines.ray_utils.init_ray", lambda *a, **k: None)
    monkeypatch.setattr("thinkfast_pipelines.train.train_slow", broken_train_slow)
    monkeypatch.setattr(demo, "_stop", lambda url, owns: None)
    monkeypatch.chdir(tmp_path)
    try:
        code = cli.main(["demo", "--tiny", "--workdir", "wd"])
    finally:
        console.setup(False, None)  # back to plain logging for later tests
    err = capsys.readouterr().err.strip().splitlines()
    log = tmp_path / "wd" / "thinkfast.log"
    assert code == 1
    assert err[-1] == (f"thinkfast demo: error: stage 2/9 (train-slow) failed: models/slow is not a model "
                       f"directory (log: {log})")
    assert "Traceback" not in "\n".join(err)
    text = log.read_text()
    assert "Traceback" in text and "broken_train_slow" in text


def test_quiet_mode_sends_library_loggers_to_the_file(tmp_path, capsys):
    path = tmp_path / "logs" / "run.log"
    try:
        console.setup(False, str(path))
        noisy = logging.getLogger("ray.train")
        noisy.addHandler(logging.StreamHandler())  # what a library does at import
        console.quiet_libraries()
        noisy.warning("controller report nobody asked for")
        logging.getLogger("faiss.loader").info("Loading faiss with AVX2 support.")
    finally:
        console.setup(False, None)
    assert "controller report" not in capsys.readouterr().err
    text = path.read_text()
    assert "controller report" in text and "AVX2" in text
    assert os.environ[console.VERBOSE_ENV] == "0"


def test_native_stderr_goes_to_the_log_and_python_stderr_stays(tmp_path):
    """What C++ code (Ray's core worker) writes to fd 2 lands in the log; this process's own
    lines and its children's logging stay where they were asked to go."""
    import subprocess
    import sys

    log = tmp_path / "run.log"
    script = (
        "import os, sys\n"
        "from thinkfast_pipelines import console\n"
        f"console.setup(False, {str(log)!r})\n"
        "os.write(2, b'core_worker.cc:2465: native warning\\n')\n"
        "print('stage 1/9 done', file=sys.stderr)\n"
        "sys.stderr.write('progress 50%\\n')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "stage 1/9 done" in proc.stderr and "progress 50%" in proc.stderr
    assert "native warning" not in proc.stderr
    assert "core_worker.cc:2465: native warning" in log.read_text()


def test_verbose_mode_leaves_native_stderr_on_the_terminal(tmp_path):
    import subprocess
    import sys

    script = (
        "import os\n"
        "from thinkfast_pipelines import console\n"
        f"console.setup(True, {str(tmp_path / 'run.log')!r})\n"
        "os.write(2, b'native warning\\n')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "native warning" in proc.stderr


def test_ray_driver_notices_are_logged_not_printed(tmp_path, capsys, monkeypatch):
    """The raylet notices Ray's driver prints on its own ("(raylet) Task ... failed. There
    are infinite retries remaining") go to the log file in quiet mode."""
    from ray._private import worker as ray_worker

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # restored after
    path = tmp_path / "run.log"
    try:
        console.setup(False, str(path))
        console.route_ray_driver_messages()
        console.route_ray_driver_messages()  # idempotent: wrapped once
        assert getattr(ray_worker.print_to_stdstream, "_thinkfast", False)
        ray_worker.print_to_stdstream({"lines": ["Task ServeController.graceful_shutdown failed."],
                                       "pid": "raylet", "is_err": False}, ignore_prefix=False)
    finally:
        console.setup(False, None)
    captured = capsys.readouterr()
    assert "graceful_shutdown" not in captured.out + captured.err
    assert "(raylet) Task ServeController.graceful_shutdown failed." in path.read_text()
