"""The notebooks run top to bottom (with nbclient, from notebooks/) and are stored without outputs."""

from pathlib import Path

import pytest

from .conftest import REPO, SHARED_DATA

nbformat = pytest.importorskip("nbformat", reason="notebook tests need the dev extra (nbformat, nbclient, ipykernel)")

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_the_three_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == ["01_quickstart", "02_layer_selection", "03_tabular_and_images"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    for i, cell in enumerate(code):
        assert cell.outputs == [] and cell.execution_count is None, (
            f"{path.name}: code cell {i} has stored outputs; strip them (e.g. "
            "`jupyter nbconvert --clear-output --inplace`) before committing"
        )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the notebooks run on the photos in {SHARED_DATA}, which is not there")
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    # the working directory is notebooks/, so ../../shared/data resolves as it does for a reader
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError naming the cell and the traceback
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_notebook_03_has_a_plot():
    nb = nbformat.read(next(p for p in NOTEBOOKS if p.stem.startswith("03")), as_version=4)
    assert any("plt.subplots" in c.source for c in nb.cells if c.cell_type == "code")
