"""``thinkfast submit``: run any thinkfast subcommand as a Ray job on a cluster.

    thinkfast submit --address http://HEAD:8265 [--working-dir .] [--pip PKG ...]
                     [--env K=V ...] [--no-wait] -- embed --corpus s3://... --out s3://...

The job goes through the Ray Jobs API (``JobSubmissionClient``) rather than Ray Client
because jobs outlive the submitting laptop, keep their logs on the cluster, and run the
driver next to the data. The runtime env ships this checkout as ``working_dir`` (minus
the virtual env, git history, test data and benchmark results) so the cluster runs the
code you have, and forwards the AWS / Hugging Face variables that point S3 clients at
the right endpoint (values are sent to the cluster, never logged). The command waits,
streams the job's logs, and exits with the job's status: 0 when it SUCCEEDED, otherwise
the driver's exit code (or 1) after one line with the job's error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence, TextIO

from thinkfast.errors import ThinkfastError

logger = logging.getLogger(__name__)

# gitignore-style patterns (relative to the working dir) never shipped to the cluster, on
# top of the checkout's .gitignore, which Ray honours: Ray caps a working_dir upload
# (hundreds of MiB) and the venv alone is ~2 GB.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    # no trailing "/": Ray matches each directory's path without one, so "dir/" would
    # still walk the directory (slow for a venv) and ship it if empty
    ".venv",
    "venv",
    ".git",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    ".pytest_cache",
    ".ipynb_checkpoints",
    "tests/data",
    "benchmarks/results",
    "build",
    "dist",
)

# Inside a job Ray refuses a driver's ``ray.init(runtime_env=...)`` whose env vars overlap
# the job's. init_ray already leaves out the variables the job sets; this documented switch
# also lets a stage that passes its own runtime_env (or an older checkout) merge with it.
_MERGE_RUNTIME_ENV = {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}

_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobSubmissionError(ThinkfastError):
    """The job could not be submitted (bad flags, unreachable dashboard, bad working dir)."""


@dataclass(frozen=True)
class JobResult:
    """What became of a submitted job."""

    job_id: str  # the submission id (``raysubmit_...`` unless one was given)
    status: str  # PENDING / RUNNING (with --no-wait) or SUCCEEDED / FAILED / STOPPED
    message: str  # Ray's status message; for a failure it includes the last logs
    driver_exit_code: int | None  # the entrypoint's exit code once it has finished
    logs: str  # the job's full logs when the job finished, "" with --no-wait

    @property
    def exit_code(self) -> int:
        """The code ``thinkfast submit`` exits with: 0 only for SUCCEEDED."""
        if self.status == "SUCCEEDED":
            return 0
        if self.status in ("PENDING", "RUNNING"):
            return 0  # --no-wait: submission itself succeeded
        return self.driver_exit_code or 1

    @property
    def error_line(self) -> str:
        """One line that says why the job failed, preferring thinkfast's own error line."""
        for text in (self.logs, self.message):
            for line in reversed(text.splitlines()):
                if line.startswith("thinkfast ") and ": error:" in line:
                    return line.strip()
        for text in (self.logs, self.message):
            for line in reversed(text.splitlines()):
                stripped = line.strip()
                if stripped and not stripped.startswith(("File ", "^", "~")):
                    return stripped
        return self.message.splitlines()[0] if self.message else f"job {self.status}"


def subcommand_names() -> list[str]:
    """The subcommands a job may run (everything but ``submit`` itself)."""
    from thinkfast_pipelines.cli import COMMANDS

    return [name for name in COMMANDS if name != "submit"]


def _split_command(command: Sequence[str]) -> tuple[list[str], list[str]]:
    """(dispatcher flags such as ``-v``, ``[SUBCOMMAND, FLAGS...]``); argparse keeps the
    ``--`` that separates submit's own flags from the job's command, so it is dropped."""
    command = list(command)
    if command and command[0] == "--":
        command = command[1:]
    global_flags = []
    while command and command[0] in ("-v", "--verbose"):
        global_flags.append(command.pop(0))
    return global_flags, command


def build_entrypoint(command: Sequence[str], python: str = "python") -> str:
    """The shell command the job runs: ``python -m thinkfast_pipelines.cli SUBCOMMAND FLAGS...``.

    ``python -m`` (not the ``thinkfast`` script) so the shipped working dir, which is the
    job's cwd, is what gets imported even where the package is installed differently."""
    global_flags, command = _split_command(command)
    if not command:
        raise JobSubmissionError("no subcommand given: use `thinkfast submit --address URL -- SUBCOMMAND [FLAGS...]`")
    names = subcommand_names()
    if command[0] == "submit":
        raise JobSubmissionError("a job cannot run `submit` itself")
    if command[0] not in names:
        raise JobSubmissionError(f"unknown subcommand {command[0]!r}; expected one of: {', '.join(names)}")
    return f"{python} -m thinkfast_pipelines.cli {shlex.join(global_flags + command)}"


def parse_env(pairs: Sequence[str], flag: str = "--env") -> dict[str, str]:
    """``["K=V", ...]`` -> dict; a pair without ``=`` or with an empty key is an error."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise JobSubmissionError(f"{flag} expects KEY=VALUE, got {pair!r}")
        env[key.strip()] = value
    return env


def parse_resources(pairs: Sequence[str]) -> dict[str, float]:
    """``["worker_node=1", ...]`` -> ``{"worker_node": 1.0}`` for the driver's placement."""
    resources: dict[str, float] = {}
    for key, value in parse_env(pairs, flag="--entrypoint-resource").items():
        try:
            resources[key] = float(value)
        except ValueError:
            raise JobSubmissionError(f"--entrypoint-resource {key}={value!r}: the amount must be a number") from None
        if resources[key] <= 0:
            raise JobSubmissionError(f"--entrypoint-resource {key}: the amount must be positive")
    return resources


def build_runtime_env(
    working_dir: str | None = ".",
    pip: Sequence[str] = (),
    env: dict[str, str] | None = None,
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
) -> dict[str, Any]:
    """The job's runtime env: shipped checkout, extra pip packages, forwarded + given env vars.

    ``working_dir=None`` ships nothing (the cluster image already has the code)."""
    from thinkfast_pipelines.ray_utils import SECRET_ENV, worker_env

    secrets = sorted(set(env or {}) & set(SECRET_ENV))
    if secrets:
        raise JobSubmissionError(
            f"--env {secrets[0]}: credentials are not sent in a job's runtime env (Ray writes it into its logs); "
            "give the cluster's nodes their own credentials (instance role, IRSA, a credentials file)"
        )
    runtime_env: dict[str, Any] = {}
    if working_dir is not None:
        path = os.path.abspath(working_dir)
        if not os.path.isfile(os.path.join(path, "pipelines", "cli.py")):
            raise JobSubmissionError(
                f"--working-dir {working_dir!r} is not a thinkfast checkout (no pipelines/cli.py in {path})"
            )
        runtime_env["working_dir"] = path
        runtime_env["excludes"] = list(excludes)
        runtime_env["py_modules"] = [_stage_pipelines_package(path)]
    if pip:
        runtime_env["pip"] = list(pip)
    runtime_env["env_vars"] = {**worker_env(), **_MERGE_RUNTIME_ENV, **(env or {})}
    return runtime_env


def _stage_pipelines_package(checkout: str) -> str:
    """A copy of ``CHECKOUT/pipelines`` named ``thinkfast_pipelines``, for ``py_modules``.

    The folder installs under that import name (pyproject's package-dir); a shipped
    checkout is not installed on the cluster, so the job would find ``thinkfast`` (the
    cwd) but not ``thinkfast_pipelines``. Ray uploads the copy at submission; it is removed
    when this process exits."""
    import atexit
    import shutil
    import tempfile

    staging = tempfile.mkdtemp(prefix="thinkfast-submit-")
    atexit.register(shutil.rmtree, staging, True)
    target = os.path.join(staging, "thinkfast_pipelines")
    shutil.copytree(os.path.join(checkout, "pipelines"), target,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def _client(address: str):
    """A connected ``JobSubmissionClient``; an unreachable dashboard is a clear error."""
    from ray.job_submission import JobSubmissionClient

    if "://" not in address:
        address = "http://" + address
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise JobSubmissionError(f"cannot reach the Ray Jobs API at {address}: {exc}") from exc


def _stream_logs(client: Any, job_id: str, out: TextIO) -> None:
    """Copy the job's log chunks to ``out`` as they arrive (returns when the job ends)."""

    async def follow() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(follow())
    except RuntimeError as exc:  # the websocket dropped; the final status still decides
        logger.warning("log stream for %s ended early: %s", job_id, exc)


def wait_for_job(client: Any, job_id: str, timeout_s: float | None = None, poll_s: float = 0.5) -> Any:
    """Poll until the job is terminal; returns its ``JobDetails``."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(job_id)
        if str(info.status) in _TERMINAL:
            return info
        if deadline is not None and time.monotonic() > deadline:
            raise JobSubmissionError(f"job {job_id} still {info.status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def submit(
    address: str,
    command: Sequence[str],
    working_dir: str | None = ".",
    pip: Sequence[str] = (),
    env: dict[str, str] | None = None,
    wait: bool = True,
    submission_id: str | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_resources: dict[str, float] | None = None,
    timeout_s: float | None = None,
    log_stream: TextIO | None = None,
) -> JobResult:
    """Submit ``thinkfast COMMAND...`` to the cluster whose dashboard is ``address``.

    With ``wait`` the job's logs go to ``log_stream`` (stdout by default) until it ends.
    Returns a ``JobResult``; a job that ran and failed is a result, not an exception,
    so callers can read its status and logs."""
    entrypoint = build_entrypoint(command)
    runtime_env = build_runtime_env(working_dir, pip, env)
    client = _client(address)
    logger.info("submitting to %s: %s", address, entrypoint)
    try:
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=submission_id,
            entrypoint_num_cpus=entrypoint_num_cpus,
            entrypoint_resources=entrypoint_resources or None,
            metadata={"thinkfast_command": _split_command(command)[1][0]},
        )
    except (RuntimeError, ValueError) as exc:
        raise JobSubmissionError(f"the cluster refused the job: {exc}") from exc
    logger.info("job %s submitted (ray job logs --address %s -f %s)", job_id, address, job_id)
    if not wait:
        status = str(client.get_job_status(job_id))
        return JobResult(job_id, status, "", None, "")
    try:
        _stream_logs(client, job_id, log_stream or sys.stdout)
    except KeyboardInterrupt:
        logger.warning("stopped following job %s; it keeps running (ray job stop --address %s %s)", job_id, address, job_id)
        raise
    info = wait_for_job(client, job_id, timeout_s)
    return JobResult(
        job_id=job_id,
        status=str(info.status),
        message=info.message or "",
        driver_exit_code=info.driver_exit_code,
        logs=client.get_job_logs(job_id),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS"),
        help="the cluster's Ray dashboard / Jobs API, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)",
    )
    parser.add_argument(
        "--working-dir", default=".", help="thinkfast checkout shipped as the job's working_dir (default: .)"
    )
    parser.add_argument(
        "--no-working-dir",
        action="store_true",
        help="ship nothing: the cluster's image already has thinkfast installed",
    )
    parser.add_argument("--pip", action="append", default=[], metavar="PKG", help="extra pip package for the job (repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="environment variable for the job (repeatable)")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return once submitted")
    parser.add_argument("--submission-id", default=None, help="job id to use (default: generated by Ray)")
    parser.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the driver")
    parser.add_argument(
        "--entrypoint-resource",
        action="append",
        default=[],
        metavar="NAME=AMOUNT",
        help="custom resource the driver needs, to place it on a node type (repeatable)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    # dest is not "command": the dispatcher's subparsers already store the subcommand there
    parser.add_argument(
        "job_command",
        nargs=argparse.REMAINDER,
        metavar="-- SUBCOMMAND [FLAGS...]",
        help="the thinkfast subcommand the job runs, after `--`",
    )


def run(args: argparse.Namespace) -> int:
    if not args.address:
        raise JobSubmissionError("--address is required (or set RAY_API_SERVER_ADDRESS), e.g. http://HEAD:8265")
    result = submit(
        address=args.address,
        command=args.job_command,
        working_dir=None if args.no_working_dir else args.working_dir,
        pip=args.pip,
        env=parse_env(args.env),
        wait=not args.no_wait,
        submission_id=args.submission_id,
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        entrypoint_resources=parse_resources(args.entrypoint_resource),
        timeout_s=args.timeout,
    )
    if args.no_wait:
        print(result.job_id)
        return 0
    if result.exit_code == 0:
        print(f"thinkfast submit: job {result.job_id} SUCCEEDED", file=sys.stderr)
    else:
        print(f"thinkfast submit: error: job {result.job_id} {result.status}: {result.error_line}", file=sys.stderr)
    return result.exit_code
