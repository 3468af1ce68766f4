"""The notebooks in notebooks/: stored clean, free of logic of their own, and executed end to end on tiny
settings, each ending with the figure it promises."""

from __future__ import annotations

import ast
import base64
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is a dev dependency: pip install -e '.[dev]'")
nbclient = pytest.importorskip("nbclient", reason="nbclient is a dev dependency: pip install -e '.[dev]'")
pytest.importorskip("ipykernel", reason="ipykernel is a dev dependency: pip install -e '.[dev]'")
from IPython.core.inputtransformer2 import TransformerManager  # noqa: E402  (ipykernel brings IPython)

from gpas_probe.store import load_run  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: Python constructs that define logic; cells may only call the library, assign and display.
FORBIDDEN = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.For, ast.AsyncFor, ast.While,
             ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.If, ast.IfExp, ast.Try, ast.With)

#: Per notebook: the tiny settings that replace its parameters cell, and the call its last cell must make.
CASES = {
    "01_variance_growth.ipynb": ({"PRESET": "tiny", "STEPS": 6, "PROBE_EVERY": 2, "SEED": 0}, "variance_growth("),
    "02_pre_ln_vs_gpas.ipynb": ({"PRESET": "tiny", "STEPS": 6, "PROBE_EVERY": 2, "SEED": 0}, '"gates"'),
    "03_diagnose_a_checkpoint.ipynb": ({"CKPT": None, "PRESET": "tiny", "STEPS": 6, "SEED": 0, "BATCHES": 2,
                                        "BATCH_SIZE": 2, "SEQ_LEN": 32}, "angular_heatmap("),
}


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def _python(source: str) -> ast.Module:
    """A code cell as Python (IPython magics such as ``%matplotlib inline`` turned into calls)."""
    return ast.parse(TransformerManager().transform_cell(source))


def _assigned_names(source: str) -> list[str]:
    return [t.id for node in _python(source).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)]


def _parameters_cell(nb):
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
    return tagged[0]


def test_every_notebook_is_covered():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_stored_clean(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in _code_cells(nb):
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: stored with outputs"
        bad = [type(n).__name__ for n in ast.walk(_python(cell.source)) if isinstance(n, FORBIDDEN)]
        assert not bad, f"{name}: cell {cell.get('id')} defines logic ({', '.join(bad)}); call the library instead"
    params = _parameters_cell(nb)
    names = _assigned_names(params.source)
    assert "OUT" in names and all(isinstance(n, ast.Assign) for n in _python(params.source).body), \
        f"{name}: the parameters cell must only assign values, OUT among them"


def _execute(name: str, workdir: Path, out: Path):
    """Run the notebook in ``workdir`` with its parameters cell replaced by the tiny settings."""
    overrides, _ = CASES[name]
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    params = _parameters_cell(nb)
    settings = {**overrides, "OUT": str(out)}
    assert set(settings) == set(_assigned_names(params.source)), "the test must set every parameter"
    params.source = "\n".join(f"{key} = {value!r}" for key, value in settings.items())
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, when a cell fails
    return nb


def _png_outputs(cell) -> list[bytes]:
    return [base64.b64decode(o["data"]["image/png"]) for o in cell.outputs
            if o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})]


@pytest.fixture
def kernel_env(monkeypatch):
    """One torch thread in the kernel (tiny models run fastest so), and no backend forced from outside."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)


@pytest.mark.parametrize("name", sorted(CASES))
def test_executes_and_ends_with_its_figure(name, tmp_path, kernel_env):
    out = tmp_path / "out"
    nb = _execute(name, tmp_path, out)
    cells = _code_cells(nb)
    assert not [o for c in cells for o in c.outputs if o.get("output_type") == "error"]
    last = cells[-1]
    assert CASES[name][1] in last.source, f"{name}: the last cell should draw {CASES[name][1]}"
    pngs = _png_outputs(last)
    assert len(pngs) == 1 and pngs[0].startswith(PNG_MAGIC) and len(pngs[0]) > 5000, \
        f"{name}: the last cell must display exactly one figure"

    # What the notebook wrote follows the injected settings.
    steps = CASES[name][0]["STEPS"]
    if name.startswith("01"):
        df = load_run(out)
        assert df["step"].max() == steps and set(df.loc[df["stat"] == "var", "layer"]) == {0, 1, 2, 3}
    elif name.startswith("02"):
        pre, gpas = load_run(out / "pre"), load_run(out / "pre-gpas")
        assert pre["step"].max() == gpas["step"].max() == steps
        assert not (pre["site"] == "gpas").any() and (gpas["site"] == "gpas").any()
        # same seed, same batches, alpha = 0 at the start: both models compute the same loss on step 1
        first = [float(d.loc[(d["stat"] == "loss") & (d["step"] == 1), "value"].iloc[0]) for d in (pre, gpas)]
        assert first[0] == pytest.approx(first[1], rel=1e-6)
    else:
        df = load_run(out / "profiles" / "run")
        assert set(df["step"]) == {steps}  # the trained run's final checkpoint
        assert set(df.loc[df["stat"] == "deletion_delta", "layer"]) == {0, 1, 2, 3}
        verdict = next(o for o in cells[[c.get("id") for c in cells].index("verdict")].outputs
                       if o["output_type"] == "execute_result")
        assert verdict["data"]["text/plain"].strip("'") in {"underuse", "ok", "insufficient data"}


def test_rerun_reuses_the_finished_run(tmp_path, kernel_env):
    """Running notebook 01 twice on one OUT reuses the run (resume with nothing to do) instead of failing."""
    out = tmp_path / "out"
    _execute("01_variance_growth.ipynb", tmp_path, out)
    checkpoint = out / "checkpoints" / "step_000006" / "model.safetensors"
    before = (checkpoint.stat().st_mtime_ns, load_run(out))
    _execute("01_variance_growth.ipynb", tmp_path, out)
    assert checkpoint.stat().st_mtime_ns == before[0]
    after = load_run(out)
    assert after.equals(before[1])
