"""What a person sees on the terminal, and where everything else goes.

A long command shows its own lines (stages, one live progress bar, tables, results). Ray's,
Ray Train's, Ray Serve's and the libraries' log output (controller reports, checkpoint
paths, ``faiss.loader`` lines, worker output) goes to one log file whose path is printed
once; ``-v`` shows it on the terminal instead. A failure is one line naming its cause and
the log, with the traceback in the log (and on the terminal only with ``-v``).

The mode is kept in the ``THINKFAST_VERBOSE`` environment variable so that code which
starts Ray later (``init_ray``) and Ray jobs submitted from here see the same choice.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

VERBOSE_ENV = "THINKFAST_VERBOSE"
LOG_FILE_ENV = "THINKFAST_LOG_FILE"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# loggers that Ray and the libraries attach their own terminal handlers to
_NOISY = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "faiss", "faiss.loader", "filelock", "urllib3",
          "botocore", "s3fs", "werkzeug", "transformers", "httpx")


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def log_file() -> str | None:
    return os.environ.get(LOG_FILE_ENV) or None


def default_log_file(command: str) -> str:
    """``$XDG_STATE_HOME/thinkfast/logs/COMMAND-YYYYmmdd-HHMMSS.log`` (``~/.local/state`` by
    default: where the XDG convention keeps logs)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(base, "thinkfast", "logs", f"{command}-{stamp}.log")


def setup(verbose: bool, path: str | None) -> None:
    """Route logging: to ``path`` always (when given), to the terminal only if ``verbose``."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    root = logging.getLogger()
    for handler in list(root.handlers):  # ours from an earlier call only (pytest keeps its own)
        if getattr(handler, "_thinkfast", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if path:
        path = os.path.abspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        file_handler._thinkfast = True  # type: ignore[attr-defined]
        root.addHandler(file_handler)
        os.environ[LOG_FILE_ENV] = path
    if not verbose:
        _quiet_ray_data(path)
        if path:
            _native_stderr_to(path)
    if verbose or not path:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter(_FORMAT))
        stream.setLevel(logging.DEBUG if verbose else logging.WARNING)
        stream._thinkfast = True  # type: ignore[attr-defined]
        root.addHandler(stream)
    quiet_libraries()


def _native_stderr_to(path: str) -> None:
    """Send what native code writes to file descriptor 2 to the log, keeping ``sys.stderr``
    on the terminal.

    The driver's Ray core worker (C++, glog) prints warnings such as ``core_worker.cc: Actor
    ... has constructor arguments in the object store`` straight to fd 2, past Python's
    logging. Pointing fd 2 at the log file and ``sys.stderr`` at a duplicate of the original
    descriptor keeps this process's own lines (progress, results, the one-line error) on
    the terminal. Only done when ``sys.stderr`` is the process's own stream: under a test
    runner that captures output, fd 2 is the runner's to manage."""
    if sys.stderr is not sys.__stderr__ or sys.__stderr__ is None:
        return
    try:
        terminal_fd = os.dup(2)
        log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError:
        return
    sys.stderr.flush()
    encoding = getattr(sys.__stderr__, "encoding", None) or "utf-8"
    terminal = os.fdopen(terminal_fd, "w", buffering=1, encoding=encoding, errors="backslashreplace")
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stderr = terminal


def route_ray_driver_messages() -> None:
    """Log, instead of print, the messages Ray's driver pushes to the terminal unasked.

    ``ray.init(log_to_driver=False)`` stops worker output, but the driver's error listener
    still prints raylet notices (``(raylet) Task ServeController.graceful_shutdown failed
    ...``, "N worker processes have been started") to ``sys.stdout`` / ``sys.stderr``
    through ``ray._private.worker.print_to_stdstream``. Ray offers no switch for it, so in
    quiet mode that function is wrapped to send the lines to the ``ray.driver`` logger (the
    log file). Private API: if it is absent in another Ray version nothing is changed."""
    if is_verbose():
        return
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_thinkfast", False):
        return
    ray_driver = logging.getLogger("ray.driver")

    def to_log(data: dict, ignore_prefix: bool = False) -> None:
        if is_verbose():
            original(data, ignore_prefix)
            return
        level = logging.WARNING if data.get("is_err") else logging.INFO
        for line in data.get("lines", ()):
            ray_driver.log(level, "(%s) %s", data.get("pid", "ray"), line)

    to_log._thinkfast = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = to_log


# Ray Data configures its loggers from a YAML file named by this variable (its documented
# switch); quiet mode names one without Ray Data's terminal handler
RAY_DATA_LOGGING_CONFIG = "RAY_DATA_LOGGING_CONFIG"
_RAY_DATA_QUIET = """version: 1
disable_existing_loggers: false
formatters:
  ray: {format: "%(asctime)s %(levelname)s %(name)s: %(message)s"}
handlers:
  file: {class: ray.data._internal.logging.SessionFileHandler, formatter: ray, filename: ray-data.log}
loggers:
  ray.data: {level: INFO, handlers: [file], propagate: true}
"""


def _quiet_ray_data(log_path: str | None) -> None:
    if RAY_DATA_LOGGING_CONFIG in os.environ:
        return  # the user's own choice
    import tempfile

    folder = os.path.dirname(log_path) if log_path else tempfile.gettempdir()
    config = os.path.join(folder, "ray-data-logging.yaml")
    with open(config, "w", encoding="utf-8") as f:
        f.write(_RAY_DATA_QUIET)
    os.environ[RAY_DATA_LOGGING_CONFIG] = config


def quiet_libraries() -> None:
    """Send the loggers Ray and the libraries configured themselves to the root handlers
    (the log file) instead of their own terminal handlers. Called again after ``import
    ray``, which installs handlers on the ``ray`` logger at import time."""
    if is_verbose():
        return
    for name in _NOISY:
        lg = logging.getLogger(name)
        for handler in list(lg.handlers):
            lg.removeHandler(handler)
        lg.propagate = True
    try:  # Ray Data's per-operator bars and "Progress bars disabled" lines
        import sys as _sys

        if "ray.data" in _sys.modules:
            from ray.data import DataContext

            ctx = DataContext.get_current()
            ctx.enable_operator_progress_bars = False
            ctx.enable_progress_bars = sys.stderr.isatty()
            ctx.print_on_execution_start = False
    except Exception:  # noqa: BLE001 - cosmetics only
        pass


_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Failure|Interrupt)): (.+)$")


def failure_reason(exc: BaseException) -> str:
    """The root cause of ``exc`` as one line.

    A thinkfast error anywhere in the cause chain wins (it was written for a person). Ray
    wraps a worker's exception in its own (``TrainingFailedError``, ``RayTaskError``) whose
    text is the remote traceback: its last ``SomeError: message`` line is the cause."""
    from thinkfast.errors import ThinkfastError

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ThinkfastError):
            return str(cur).strip().splitlines()[0] if str(cur).strip() else type(cur).__name__
        cur = cur.__cause__ or cur.__context__
    text = str(exc)
    found = [m for m in (_EXC_LINE.match(line.strip().lstrip("|").strip()) for line in text.splitlines()) if m]
    if found:
        name, message = found[-1].groups()
        short = name.rsplit(".", 1)[-1]
        return message if short in ("ThinkfastError", "CheckpointError", "CorpusSchemaError") else f"{short}: {message}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _wrapped(exc: BaseException) -> list[BaseException]:
    """What ``exc`` wraps: Python's chain and Ray's own fields (``RayTaskError.cause``,
    Ray Train's ``ControllerError.controller_failure`` and ``WorkerGroupError.worker_failures``)."""
    inner: list[BaseException] = []
    for attr in ("__cause__", "__context__", "cause", "controller_failure"):
        value = getattr(exc, attr, None)
        if isinstance(value, BaseException):
            inner.append(value)
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        inner.extend(v for v in failures.values() if isinstance(v, BaseException))
    return inner


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo = [exc]
    while todo:
        cur = todo.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        todo.extend(_wrapped(cur))


# exception names (last line of a remote traceback) that mean "the storage failed"
_STORAGE_NAMES = {"OSError", "IOError", "FileNotFoundError", "PermissionError", "ConnectionError",
                  "ConnectionRefusedError", "TimeoutError", "EndpointConnectionError", "ConnectTimeoutError",
                  "ReadTimeoutError", "NoCredentialsError", "ClientError", "NoSuchBucket", "ArrowIOError",
                  "ClientConnectorError", "ServerTimeoutError", "StorageError"}


def _is_storage_exception(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    module = type(exc).__module__ or ""
    return module.startswith(("botocore", "aiobotocore", "s3fs", "aiohttp"))


def storage_failure(exc: BaseException) -> str | None:
    """One line when ``exc`` is, or wraps (through Ray's wrappers too), a storage failure:
    an S3 endpoint that cannot be reached or answers errors, a missing bucket, denied
    access, a full disk. ``None`` otherwise, and when a thinkfast error that is not a
    ``StorageError`` comes first in the chain (it was written for a person and wins).

    The line names the cause (:func:`thinkfast.utils.fs.describe_storage_failure`) and the
    original message, which carries the URI or path; never credentials (botocore, s3fs
    and pyarrow do not put them in messages)."""
    from thinkfast.errors import StorageError, ThinkfastError
    from thinkfast.utils.fs import describe_storage_failure

    for cur in _chain(exc):
        if isinstance(cur, StorageError):
            return _first_line(cur)
        if isinstance(cur, ThinkfastError):
            return None
        if _is_storage_exception(cur) and not _is_ray_wrapper(cur):
            cause = describe_storage_failure(cur)
            original = _first_line(cur)
            if cause and original and original not in cause:
                return f"storage failure: {cause} ({type(cur).__name__}: {original[:300]})"
            return f"storage failure: {cause or type(cur).__name__ + ': ' + original[:300]}"
    # a remote traceback only as text (Ray's wrappers): its last "SomeError: message" line
    found = [m for m in (_EXC_LINE.match(line.strip().lstrip("|").strip()) for line in str(exc).splitlines()) if m]
    if found:
        name, message = found[-1].groups()
        short = name.rsplit(".", 1)[-1]
        if short in _STORAGE_NAMES:
            if short == "StorageError":
                return message
            cause = describe_storage_failure(OSError(message))
            return f"storage failure: {cause} ({short}: {message[:300]})"
    return None


def _is_ray_wrapper(exc: BaseException) -> bool:
    """Ray's ``RayTaskError(OSError)`` is an ``OSError`` subclass whose text is a whole
    remote traceback: look inside it instead."""
    return (type(exc).__module__ or "").startswith("ray.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


@contextmanager
def progress(total: int | None, desc: str, unit: str = "it", out: TextIO | None = None) -> Iterator["Bar"]:
    """One live progress line (items done / total, rate, ETA) on a terminal; nothing when
    the output is not a terminal (logs and CI keep only the stage lines)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, file=out or sys.stderr, disable=None, leave=False,
               dynamic_ncols=True, mininterval=0.5)
    try:
        yield Bar(bar)
    finally:
        bar.close()


class Bar:
    """What code holding a progress bar may do with it."""

    def __init__(self, bar) -> None:  # tqdm instance
        self._bar = bar

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def set(self, done: int, total: int | None = None) -> None:
        if total is not None and total != self._bar.total:
            self._bar.total = total
        self._bar.n = done
        self._bar.refresh()
