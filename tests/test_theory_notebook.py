"""notebooks/reward_tail_theory.ipynb executes top to bottom and shows what it claims.

The kernel is pinned to this interpreter (a kernelspec written to a temporary
JUPYTER_PATH, which takes precedence over any user-level `python3` kernelspec), so
the test works on a fresh virtual environment without `ipykernel install`.
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "reward_tail_theory.ipynb"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_reward_tail_theory_notebook_executes(tmp_path, monkeypatch):
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "rubrax (test)",
        "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []) if out.get("output_type") == "stream")
    # Figure 2a's over-optimisation peak, Theorem 1's f-independent KL, the tail-vs-bulk contrast.
    assert "top 25% wrong: win rate peaks at 0.813 (KL 1.35) and falls to 0.750" in text
    assert "KL(best-of-n) vs log n - (n-1)/n: True" in text
    assert "band [0.8, 1.0]: loss vs correct at KL 1 = 0.0227, at KL 4 = 0.1249" in text
    assert "band [0.0, 0.2]: loss vs correct at KL 1 = 0.0001, at KL 4 = 0.0000" in text
