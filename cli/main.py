"""The ``gpas-probe`` Typer app."""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperOption

from gpas_probe._version import __version__
from gpas_probe.cli.analyze import compare_cmd, info_cmd, plot_app
from gpas_probe.cli.demo import demo_cmd
from gpas_probe.cli.diagnose import diagnose_cmd
from gpas_probe.cli.profile import profile_cmd
from gpas_probe.cli.report import report_cmd
from gpas_probe.cli.train import train_cmd

_type_label = TyperOption.display_type_rich


def _flag_type_label(self: TyperOption, ctx: object) -> str | None:
    """No ``<bool>`` beside a flag in ``--help``: a flag takes no value (typer 0.2x labels every option)."""
    return None if self.is_flag else _type_label(self, ctx)  # type: ignore[arg-type]


TyperOption.display_type_rich = _flag_type_label  # type: ignore[method-assign]

app = typer.Typer(
    name="gpas-probe",
    help="Are my deep layers doing anything? Train, probe and profile LLaMA-style models with and "
         "without GPAS (Gradient-Preserving Activation Scaling).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gpas-probe {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    """Are my deep layers doing anything?"""


app.command("demo")(demo_cmd)
app.command("train")(train_cmd)
app.add_typer(plot_app, name="plot")
app.command("info")(info_cmd)
app.command("compare")(compare_cmd)
app.command("profile")(profile_cmd)
app.command("diagnose")(diagnose_cmd)
app.command("report")(report_cmd)

if __name__ == "__main__":
    app()
