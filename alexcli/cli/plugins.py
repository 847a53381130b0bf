from __future__ import annotations

import typer
from rich.table import Table

from alexcli.cli._ui import emit_json, err, out


def plugins_command(
    check: bool = typer.Option(False, "--check", help="Import every plugin and report the ones that fail (exit 1 if any)."),
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON on stdout."),
) -> None:
    """List the registered architectures, layer variants and augmentations: kind, name, package, version.

    Names come from package metadata, so listing imports no plugin; --check imports each one.
    Set ALEXCLI_LOAD_PLUGINS=pkg1,pkg2 to load only those third-party packages ("" for none).

    Example: alexcli plugins --check
    """
    from alexcli import plugins as reg

    rows = [dict(p.as_dict(), status="not loaded") for p in reg.discover()]
    if check:
        for row, (_info, error) in zip(rows, reg.check_all()):
            row["status"] = "error: " + error if error else "ok"
    for claim in reg.conflicts():
        packages = " and ".join(f"{p.package} {p.version}" for p in claim)
        rows.append(dict(claim[0].as_dict(), package=packages, version="", target="",
                         status=f"error: claimed by {packages}"))
    rows.sort(key=lambda r: (r["kind"], r["name"]))
    failed = [r for r in rows if r["status"].startswith("error")]
    if as_json:
        emit_json({"plugins": rows, "errors": len(failed)})
    else:
        table = Table(title="alexcli plugins", title_justify="left")
        for col in ("kind", "name", "package", "version", "status"):
            table.add_column(col)
        for r in rows:
            bad = r["status"].startswith("error")
            table.add_row(r["kind"], r["name"], r["package"], r["version"], "error" if bad else r["status"],
                          style="red" if bad else None)
        out.print(table)
        for r in failed:  # in full, below the table, one line each
            err.print(f"{r['kind']} {r['name']}: {r['status']}", soft_wrap=True)
    if failed and (check or any("claimed by" in r["status"] for r in failed)):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("plugins")(plugins_command)
