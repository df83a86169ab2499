"""Execute every tutorial notebook (notebooks/*.ipynb) top to bottom; any cell error fails the test.

The kernel is "python3" pinned to the interpreter running pytest (so the venv's packages are used, whatever
kernelspecs the user has installed), the working directory is notebooks/, and MINISNIP_FAST=1 asks the
notebooks for their fast setting. The executed notebook is not written back: the tests run every notebook from
scratch, whatever outputs the committed file holds.

The committed notebooks carry the outputs of one fast-setting run (so that a reader of the repository page sees
the figures without running anything); the other tests check that those outputs are complete, from one run top
to bottom, without errors, and small.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
MAX_NOTEBOOK_BYTES = 1_000_000  # committed notebooks keep their outputs small (modest figure DPI)


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A "python3" kernelspec that runs this interpreter, found first via JUPYTER_PATH."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (minisnip tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MINISNIP_FAST", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # let the kernel use its inline backend


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, kernel_env) -> None:
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, startup_timeout=120,
                                     allow_errors=False, resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell raised an error\n{e}", pytrace=False)
    except nbclient.exceptions.CellTimeoutError as e:
        pytest.fail(f"{path.name}: a cell ran longer than {CELL_TIMEOUT_S}s\n{e}", pytrace=False)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{path.name}: error outputs {[(o.ename, o.evalue) for o in errors]}"
    print(f"{path.name}: {len(nb.cells)} cells in {time.perf_counter() - start:.1f}s")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_committed_small(path: Path) -> None:
    """Committed notebooks are valid and their stored outputs small (modest figure DPI, no embedded data)."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    size = path.stat().st_size
    assert size < MAX_NOTEBOOK_BYTES, f"{path.name} is {size:,} bytes; lower its figure DPI or sizes before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_structure(path: Path) -> None:
    """Each notebook opens with a markdown cell saying what it teaches and reads the MINISNIP_FAST switch."""
    nb = nbformat.read(path, as_version=4)
    assert nb.cells and nb.cells[0].cell_type == "markdown", f"{path.name}: the first cell must be markdown"
    assert nb.cells[0].source.lstrip().startswith("# "), f"{path.name}: the first cell must start with a title"
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert 'os.environ.get("MINISNIP_FAST") == "1"' in code, f"{path.name}: no FAST switch read from MINISNIP_FAST"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_committed_with_outputs(path: Path) -> None:
    """The committed outputs come from one run, top to bottom, with no error, and include the figures."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    assert all(n is not None for n in counts), (
        f"{path.name}: cells {[i for i, n in enumerate(counts) if n is None]} (code cells, 0-based) have no stored "
        "output; commit the notebook executed in the fast setting")
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: execution counts {counts} are not one run in order"
    errors = [o.get("ename") for c in code for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{path.name}: the committed outputs hold errors {errors}"
    # a cell that shows figures stores at least one PNG, or says in text why it drew none (e.g. no input files)
    silent = [i for i, c in enumerate(code) if "plt.show(" in c.source
              and not any("image/png" in o.get("data", {}) or o.output_type == "stream" for o in c.get("outputs", []))]
    assert not silent, f"{path.name}: code cells {silent} (0-based) show figures but store neither a PNG nor text"


def test_tour_lists_every_notebook_in_order() -> None:
    """notebooks/README.md is the tour: one section (a "## " heading naming the file) per notebook, in the order of
    their numbers."""
    headings = [line for line in (NOTEBOOK_DIR / "README.md").read_text().splitlines() if line.startswith("## ")]
    found = [next((i for i, h in enumerate(headings) if p.name in h), None) for p in NOTEBOOKS]
    missing = [p.name for p, i in zip(NOTEBOOKS, found) if i is None]
    assert not missing, f"notebooks/README.md has no section heading naming {missing}"
    assert found == sorted(found), "notebooks/README.md presents the notebooks out of order"
