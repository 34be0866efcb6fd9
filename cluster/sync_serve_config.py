"""Copy cluster/serve.yaml, verbatim, into the RayService's ``spec.serveConfigV2``.

KubeRay takes the Serve config as a string inside the RayService; keeping it a byte-for-
byte copy of the file ``serve run`` / ``thinkfast serve --config`` take means one config
is tested and deployed everywhere. Run after editing serve.yaml; ``--check`` exits 1
(without writing) when the two differ, which is what the tests assert.

    python cluster/sync_serve_config.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVE_YAML = HERE / "serve.yaml"
RAYSERVICE_YAML = HERE / "kuberay" / "rayservice.yaml"
KEY_LINE = "  serveConfigV2: |\n"  # the block scalar under `spec:` (2-space indent)
INDENT = "    "  # block content: 2 deeper than the key


def render(serve_text: str, rayservice_text: str) -> str:
    """``rayservice_text`` with its serveConfigV2 block replaced by ``serve_text``."""
    lines = rayservice_text.splitlines(keepends=True)
    try:
        start = lines.index(KEY_LINE) + 1
    except ValueError:
        raise SystemExit(f"{RAYSERVICE_YAML}: no line {KEY_LINE.strip()!r} under spec") from None
    end = start
    while end < len(lines) and (lines[end].startswith(INDENT) or not lines[end].strip()):
        end += 1
    block = [(INDENT + line) if line.strip() else "\n" for line in serve_text.splitlines(keepends=True)]
    if block and not block[-1].endswith("\n"):
        block[-1] += "\n"
    return "".join(lines[:start] + block + lines[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if rayservice.yaml is out of date")
    args = parser.parse_args(argv)
    current = RAYSERVICE_YAML.read_text()
    wanted = render(SERVE_YAML.read_text(), current)
    if wanted == current:
        return 0
    if args.check:
        print(f"{RAYSERVICE_YAML} is out of date with {SERVE_YAML}: run python cluster/sync_serve_config.py", file=sys.stderr)
        return 1
    RAYSERVICE_YAML.write_text(wanted)
    print(f"updated {RAYSERVICE_YAML}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
