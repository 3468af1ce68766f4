"""``log_to`` and ``--log-to``: names checked, a missing extra is one error line naming it (exit 2 from the
CLI, no run folder made), loggers need probes, and the names a summary uses (layers zero-padded to the
model's depth, one name per gate site)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import write_corpus
from logger_readback import train_args
from typer.testing import CliRunner

from gpas_probe.cli.main import app
from gpas_probe.loggers import LogConfig, Summary, layer_digits


def test_log_to_takes_a_comma_list_names_and_sinks() -> None:
    assert LogConfig.of("tensorboard, mlflow").names == ("tensorboard", "mlflow")
    assert LogConfig.of(None) is None and LogConfig.of("") is None and LogConfig.of([]) is None

    class Mine:
        def log(self, step: int, metrics: dict[str, float]) -> None: ...
        def close(self) -> None: ...

    mine = Mine()
    config = LogConfig.of(["wandb", mine])
    assert config is not None and config.names == ("wandb",) and config.to[1] is mine
    with pytest.raises(ValueError, match="unknown logger 'tb'; choose from tensorboard, wandb, mlflow"):
        LogConfig.of("tb")
    with pytest.raises(ValueError, match="named twice"):
        LogConfig.of("wandb,wandb")
    with pytest.raises(ValueError, match="a name or an object with log"):
        LogConfig.of([3])
    with pytest.raises(ValueError, match="prefix"):
        LogConfig(to=("wandb",), prefix="gpas/")


def test_names_sort_by_layer_and_name_each_gate_site() -> None:
    assert [layer_digits(d) for d in (1, 4, 100, 101, 1000, 1001)] == [2, 2, 2, 3, 3, 4]
    s = Summary(depth=128)
    assert s.name(7, "resid_post", "fwd", "var") == "gpas/var/resid_post/layer_007"
    assert s.name(7, "resid_post", "bwd", "var") is None and s.name(7, "resid_pre", "fwd", "var") is None
    assert s.name(3, "gpas_attn", "none", "scale") == "gpas/gate_scale/attn/layer_003"
    assert s.name(3, "gpas_mlp", "none", "scale") == "gpas/gate_scale/mlp/layer_003"
    assert s.name(0, "mlp", "fwd", "shortcut_branch_ratio") == "gpas/ratio/mlp/layer_000"
    assert s.name(-1, "model", "none", "val_loss") == "gpas/model/val_loss"
    assert s.name(-1, "model", "none", "tokens") is None
    assert Summary(depth=12, prefix="probe").name(11, "params", "none", "grad_norm") == "probe/grad_norm/layer_11"


@pytest.mark.parametrize("name, extra", [("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_missing_extra_is_one_line_naming_it(monkeypatch, tmp_path: Path, name: str, extra: str) -> None:
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed: importing it raises ImportError
    with pytest.raises(ImportError, match=rf'^{name} is needed .*; install the {extra} extra: pip install '
                                          rf'"gpas-probe\[{extra}\]"$'):
        LogConfig.of(name).require()
    from logger_readback import plain_loop

    with pytest.raises(ImportError, match=rf"gpas-probe\[{extra}\]"):
        plain_loop(tmp_path / "attached", name)
    assert not (tmp_path / "attached").exists()
    res = CliRunner().invoke(app, train_args(tmp_path / "run", tmp_path / "none.txt", "--log-to", name))
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [f'error: {name} is needed to log to {_tool(name)} (--log-to {name}); '
                                               f'install the {extra} extra: pip install "gpas-probe[{extra}]"']
    assert not (tmp_path / "run").exists()


def _tool(name: str) -> str:
    return {"tensorboard": "TensorBoard", "wandb": "Weights & Biases", "mlflow": "MLflow"}[name]


def test_the_cli_refuses_what_would_do_nothing_or_is_unknown(tmp_path: Path) -> None:
    data = write_corpus(tmp_path, seed=0, words=500)
    res = CliRunner().invoke(app, train_args(tmp_path / "a", data, "--log-to", "tensorboard", "--probe-every", "0"))
    assert res.exit_code == 2 and "error: --log-to (log_to) sends the probes' summaries, and probes are off" in (
        res.output)
    res = CliRunner().invoke(app, train_args(tmp_path / "b", data, "--log-to", "tensorbord"))
    assert res.exit_code == 2 and "error: unknown logger 'tensorbord'; choose from tensorboard, wandb, mlflow" in (
        res.output)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
