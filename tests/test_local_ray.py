"""The local Ray that thinkfast starts picks its auth mode itself and leaves nothing in the
user's home that would change later ``ray start`` / ``ray job submit`` behaviour."""

from __future__ import annotations

import os
import subprocess
import sys


def test_local_ray_writes_no_auth_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path)
    code = (
        "from thinkfast_pipelines.ray_utils import init_ray\n"
        "import os, ray\n"
        "init_ray(num_cpus=1, include_dashboard=False)\n"
        "assert ray.get(ray.remote(lambda: 1).remote()) == 1\n"
        "print('mode', os.environ['RAY_AUTH_MODE'])\n"
        "ray.shutdown()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180,
                          cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mode disabled" in done.stdout
    assert not (tmp_path / ".ray" / "auth_token").exists()
