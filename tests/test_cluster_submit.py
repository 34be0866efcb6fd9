"""``thinkfast submit`` without a cluster: entrypoint, runtime env, what gets shipped,
how a finished job maps to an exit code, and clear errors for bad input."""

from __future__ import annotations

import os

import zipfile
from pathlib import Path

import pytest

from thinkfast_pipelines.cluster import submit as sub
from thinkfast_pipelines.cli import main
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_entrypoint_runs_the_subcommand_through_python_m_and_quotes_flags():
    entry = sub.build_entrypoint(["--", "embed", "--corpus", "s3://b/my corpus", "--out", "s3://b/o"])
    assert entry == "python -m thinkfast_pipelines.cli embed --corpus 's3://b/my corpus' --out s3://b/o"
    assert sub.build_entrypoint(["-v", "index", "--out", "o"]) == "python -m thinkfast_pipelines.cli -v index --out o"


@pytest.mark.parametrize(
    "command, message",
    [([], "no subcommand"), (["--"], "no subcommand"), (["submit", "--address", "x"], "cannot run `submit`"), (["frobnicate"], "unknown subcommand"), (["-v"], "no subcommand")],
)
def test_entrypoint_rejects_bad_commands(command, message):
    with pytest.raises(sub.JobSubmissionError, match=message):
        sub.build_entrypoint(command)


def test_parse_env_pairs_and_errors():
    assert sub.parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(sub.JobSubmissionError, match="KEY=VALUE"):
        sub.parse_env(["NOEQUALS"])
    with pytest.raises(sub.JobSubmissionError, match="KEY=VALUE"):
        sub.parse_env(["=v"])


def test_runtime_env_ships_checkout_and_forwards_aws_settings_not_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1234")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    env = sub.build_runtime_env(str(ROOT), pip=["tqdm"], env={"X": "1"})
    assert env["working_dir"] == str(ROOT)
    assert {".venv", ".git", "tests/data", "benchmarks/results"} <= set(env["excludes"])
    assert env["pip"] == ["tqdm"]
    assert env["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:1234"
    # Ray writes runtime envs verbatim into its logs: credentials never travel in one
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env["env_vars"])
    assert env["env_vars"]["X"] == "1"
    assert env["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
    # the shipped checkout is importable under the installed name on an uninstalled cluster
    (staged,) = env["py_modules"]
    assert os.path.basename(staged) == "thinkfast_pipelines" and os.path.isfile(os.path.join(staged, "cli.py"))
    with pytest.raises(sub.JobSubmissionError, match="credentials"):
        sub.build_runtime_env(None, env={"AWS_SECRET_ACCESS_KEY": "s"})
    assert "working_dir" not in sub.build_runtime_env(None)


def test_runtime_env_rejects_a_dir_that_is_not_a_checkout(tmp_path):
    with pytest.raises(sub.JobSubmissionError, match="not a thinkfast checkout"):
        sub.build_runtime_env(str(tmp_path))


def test_shipped_package_has_the_code_and_none_of_the_excluded_dirs(tmp_path):
    """Package the checkout exactly as Ray's job client does and look inside."""
    from ray._private.runtime_env.packaging import create_package

    env = sub.build_runtime_env(str(ROOT))
    target = tmp_path / "pkg.zip"
    create_package(env["working_dir"], target, include_gitignore=True, excludes=env["excludes"])
    names = zipfile.ZipFile(target).namelist()
    assert "pipelines/cli.py" in names and "thinkfast/errors.py" in names and "pyproject.toml" in names
    for prefix in (".venv/", ".git/", "tests/data/", "benchmarks/results/"):
        assert not any(n.startswith(prefix) for n in names), prefix
    assert not any("__pycache__" in n for n in names)
    assert target.stat().st_size < 50 * 1024 * 1024  # far below Ray's upload cap


def _result(status: str, code: int | None, logs: str = "", message: str = "") -> sub.JobResult:
    return sub.JobResult("raysubmit_x", status, message, code, logs)


def test_job_result_exit_codes_and_error_line():
    assert _result("SUCCEEDED", 0).exit_code == 0
    failed = _result(
        "FAILED",
        2,
        logs="starting\nthinkfast embed: error: corpus not found: s3://b/missing\n",
        message="Job entrypoint command failed with exit code 2, last available logs ...",
    )
    assert failed.exit_code == 2
    assert failed.error_line == "thinkfast embed: error: corpus not found: s3://b/missing"
    crashed = _result("FAILED", 1, logs='Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom\n')
    assert crashed.exit_code == 1 and crashed.error_line == "ValueError: boom"
    stopped = _result("STOPPED", None, message="Job was intentionally stopped.")
    assert stopped.exit_code == 1 and stopped.error_line == "Job was intentionally stopped."


def test_cli_unreachable_dashboard_is_one_clear_error(capsys):
    code = main(["submit", "--address", f"http://127.0.0.1:{free_port()}", "--", "embed", "--help"])
    assert code == 2
    assert "thinkfast submit: error: cannot reach the Ray Jobs API" in capsys.readouterr().err


def test_cli_requires_an_address(capsys, monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert main(["submit", "--", "embed", "--help"]) == 2
    assert "--address is required" in capsys.readouterr().err


def test_entrypoint_resources_parse_and_reject_bad_amounts():
    assert sub.parse_resources(["worker_node=1", "accel=0.5"]) == {"worker_node": 1.0, "accel": 0.5}
    with pytest.raises(sub.JobSubmissionError, match="--entrypoint-resource expects KEY=VALUE"):
        sub.parse_resources(["worker_node"])
    with pytest.raises(sub.JobSubmissionError, match="must be a number"):
        sub.parse_resources(["worker_node=one"])
    with pytest.raises(sub.JobSubmissionError, match="must be positive"):
        sub.parse_resources(["worker_node=0"])


class _FakeJobs:
    """Stands in for JobSubmissionClient: records the submission, replays a job's life."""

    def __init__(self, final_status: str, exit_code: int | None, chunks: list[str]) -> None:
        self.final_status, self.exit_code, self.chunks = final_status, exit_code, chunks
        self.submitted: dict = {}
        self.polls = 0

    def submit_job(self, **kwargs):
        self.submitted = kwargs
        return kwargs.get("submission_id") or "raysubmit_fake"

    async def tail_job_logs(self, job_id):
        for chunk in self.chunks:
            yield chunk

    def get_job_info(self, job_id):
        from types import SimpleNamespace

        self.polls += 1
        status = "RUNNING" if self.polls < 2 else self.final_status  # terminal on the 2nd poll
        return SimpleNamespace(status=status, message=f"job {status}", driver_exit_code=self.exit_code)

    def get_job_status(self, job_id):
        return "PENDING"

    def get_job_logs(self, job_id):
        return "".join(self.chunks)


def test_submit_streams_logs_waits_and_returns_the_jobs_outcome(monkeypatch):
    import io

    fake = _FakeJobs("FAILED", 2, ["Running entrypoint\n", "thinkfast index: error: no embeddings at s3://b/e\n"])
    monkeypatch.setattr(sub, "_client", lambda address: fake)
    monkeypatch.setattr(sub.time, "sleep", lambda s: None)
    out = io.StringIO()
    result = sub.submit("http://127.0.0.1:8265", ["--", "index", "--embeddings", "s3://b/e", "--out", "s3://b/i"],
                        working_dir=str(ROOT), entrypoint_resources={"worker_node": 1.0}, log_stream=out)  # fmt: skip
    assert out.getvalue() == "".join(fake.chunks)  # every chunk, in order
    assert (result.status, result.exit_code) == ("FAILED", 2)
    assert result.error_line == "thinkfast index: error: no embeddings at s3://b/e"
    assert fake.submitted["entrypoint"] == "python -m thinkfast_pipelines.cli index --embeddings s3://b/e --out s3://b/i"
    assert fake.submitted["runtime_env"]["working_dir"] == str(ROOT)
    assert fake.submitted["entrypoint_resources"] == {"worker_node": 1.0}
    assert fake.submitted["metadata"] == {"thinkfast_command": "index"}


def test_submit_no_wait_returns_at_once(monkeypatch, capsys):
    fake = _FakeJobs("SUCCEEDED", 0, ["never streamed\n"])
    monkeypatch.setattr(sub, "_client", lambda address: fake)
    code = main(["submit", "--address", "http://127.0.0.1:8265", "--no-wait", "--submission-id", "tf-1", "--", "synth", "--out", "s3://b/c", "--images", "4"])
    assert code == 0
    assert capsys.readouterr().out.strip() == "tf-1"
    assert fake.polls == 0  # nothing waited for
