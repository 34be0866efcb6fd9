"""Build a small corpus with the real img2dataset 1.47, in both of its output formats.

    python scripts/img2dataset_fixture.py                 # rewrite tests/fixtures/img2dataset/
    python scripts/img2dataset_fixture.py --out /tmp/i2d  # somewhere else

Why a script and a committed fixture: img2dataset 1.47 pins ``pandas<3`` and
``webdataset<0.3`` (the project has pandas 3.1), so it cannot live in the project's venv.
It gets its own venv under ``~/.cache/thinkfast/venvs/img2dataset-1.47`` (created once,
about 60 s with PyPI reachable, then reused) and runs there in a subprocess. The fast
tests read the fixture this script wrote; the ``slow`` test runs the same steps live.

What it does: renders a few generated scenes (:mod:`thinkfast.data.synth`) to JPEG files,
serves them from a local HTTP server on 127.0.0.1 (a thread, stopped at the end), writes a
Parquet URL list (``url``, ``caption``) that also names one missing file (HTTP 404) and one
file of text bytes (not an image), and runs ``img2dataset --output_format parquet`` and
``--output_format webdataset`` on it. img2dataset records the two bad URLs as failed rows.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

IMG2DATASET_VERSION = "1.47.0"
VENV_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "thinkfast" / "venvs" / "img2dataset-1.47"
FIXTURE_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "img2dataset"
FORMATS = ("parquet", "webdataset")
NUM_IMAGES = 4
IMAGE_SIZE = 32  # img2dataset's --image_size too: keeps the committed fixture a few KB
MISSING_NAME = "missing.jpg"  # never written: the server answers 404
NOT_IMAGE_NAME = "not_an_image.jpg"  # text bytes under an image name


def ensure_venv(venv: Path = VENV_DIR) -> tuple[Path, float]:
    """The isolated venv's python, and the seconds spent creating it (0.0 when reused)."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import img2dataset"], capture_output=True).returncode == 0:
        return python, 0.0
    t0 = time.perf_counter()
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    f"img2dataset=={IMG2DATASET_VERSION}"], check=True)
    return python, time.perf_counter() - t0


def write_images(folder: Path, n: int = NUM_IMAGES, size: int = IMAGE_SIZE) -> list[tuple[str, str]]:
    """Write ``n`` generated scenes as JPEG files plus the not-an-image file; returns the
    ``(file name, caption)`` list img2dataset is given, the missing file included."""
    from thinkfast.data.synth import SynthConfig, generate_table, plan_groups

    config = SynthConfig(num_images=n, captions_per_image=1, image_size=size, seed=15, hard_pair_fraction=0.0)
    table = generate_table(config, plan_groups(config))
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (data, captions) in enumerate(zip(table.column("jpg").to_pylist(), table.column("captions").to_pylist())):
        name = f"scene_{i}.jpg"
        (folder / name).write_bytes(data)
        entries.append((name, captions[0]))
    (folder / NOT_IMAGE_NAME).write_bytes(b"this is a caption file, not an image\n")
    entries.insert(2, (MISSING_NAME, "a picture that is not there"))
    entries.insert(4, (NOT_IMAGE_NAME, "bytes that are not an image"))
    return entries


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        logger.debug("http: " + format, *args)


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """``folder`` over HTTP on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def write_url_list(path: Path, base_url: str, entries: list[tuple[str, str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"url": [f"{base_url}/{name}" for name, _ in entries],
                             "caption": [caption for _, caption in entries]}), path)


def run_img2dataset(python: Path, url_list: Path, out: Path, output_format: str, timeout_s: float = 120) -> None:
    """One img2dataset run in the isolated venv (one process, a few threads, no wandb)."""
    cmd = [str(python.parent / "img2dataset"), "--url_list", str(url_list),
           "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
           "--output_format", output_format, "--output_folder", str(out), "--processes_count", "1",
           "--thread_count", "4", "--image_size", str(IMAGE_SIZE), "--resize_mode", "border", "--timeout", "5",
           "--retries", "0", "--enable_wandb", "False", "--compute_hash", "None", "--extract_exif", "False"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1"
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"img2dataset ({output_format}) exited {result.returncode}: {result.stderr[-2000:]}")


def build(out: Path, python: Path | None = None) -> dict:
    """Both formats under ``out/parquet`` and ``out/webdataset``; returns what was done."""
    import tempfile

    python = python or ensure_venv()[0]
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="i2d-src-") as tmp:
        tmp_path = Path(tmp)
        entries = write_images(tmp_path / "images")
        url_list = tmp_path / "urls.parquet"
        timings = {}
        with serve_folder(tmp_path / "images") as base_url:
            write_url_list(url_list, base_url, entries)
            for fmt in FORMATS:
                shutil.rmtree(out / fmt, ignore_errors=True)
                t0 = time.perf_counter()
                run_img2dataset(python, url_list, out / fmt, fmt)
                timings[fmt] = round(time.perf_counter() - t0, 2)
    return {"rows": len(entries), "img2dataset_s": timings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=FIXTURE_DIR, help="folder for parquet/ and webdataset/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    python, created_s = ensure_venv()
    report = {"venv": str(VENV_DIR), "venv_created_s": round(created_s, 1), **build(args.out, python)}
    files = sorted(p for p in args.out.rglob("*") if p.is_file())
    report["files"] = {str(p.relative_to(args.out)): p.stat().st_size for p in files}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
