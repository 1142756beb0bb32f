"""notebooks/quickstart.ipynb runs top to bottom (small settings: a tiny policy, two steps)."""

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("ZEROSEARCH_QUICKSTART_SMALL", "1")
    monkeypatch.setenv("ZEROSEARCH_QUICKSTART_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
    # A failing cell raises CellExecutionError with the cell's traceback.
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()
    run = tmp_path / "run"
    assert (run / "train" / "plots" / "training_curves.png").exists()
    assert (run / "train" / "hf_policy" / "config.json").exists()
    steps = [json.loads(line)["step"] for line in open(run / "train" / "metrics.jsonl")]
    assert steps[-1] == 2
    table = (run / "eval" / "results.md").read_text()
    for method in ("Direct", "RAG", "agent"):
        assert method.lower() in table.lower()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "->" in outputs  # the chat replies were printed
