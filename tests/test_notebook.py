"""The quickstart notebook runs end to end (nbclient, a real Jupyter kernel) on the tiny
setting, and its outputs hold what the notebook promises: ranked hits, an inline image
grid and the recall-vs-K table and plot."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    import nbclient  # test extras: a missing install fails here instead of skipping
    import nbformat
    monkeypatch.setenv("THINKFAST_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("THINKFAST_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    repo = str(NOTEBOOK.parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    # the kernel must be this interpreter (the venv with thinkfast), not whatever "python3" is on PATH
    client.kernel_manager_class = _kernel_manager(sys.executable)
    client.execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert "score" in text and "fast" in text and "slow" in text  # the ranked hits
    assert "| fast+slow rerank@20 |" in text  # the recall table with every K
    assert len(images) >= 2  # the image grid and the recall-vs-K plot


def _kernel_manager(python: str):
    from jupyter_client.manager import KernelManager

    class VenvKernelManager(KernelManager):
        """Starts ipykernel with the test's own interpreter."""

        def format_kernel_cmd(self, extra_arguments=None):  # noqa: D401 - jupyter_client hook
            cmd = super().format_kernel_cmd(extra_arguments)
            return [python] + cmd[1:] if cmd and "python" in os.path.basename(cmd[0]) else cmd

    return VenvKernelManager
