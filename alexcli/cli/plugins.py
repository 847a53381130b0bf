from __future__ import annotations

import typer

from alexcli.cli._ui import emit_json, err, out


def plugins_command(
    check: bool = typer.Option(False, "--check", help="Import every plugin and report the ones that fail (exit 1 if any)."),
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON on stdout."),
) -> None:
    """List the registered architectures, layer variants and augmentations: kind, name, package, version.

    Names come from package metadata, so listing imports no plugin; --check imports each one.
    A package that registers a built-in's name is listed with a warning: the built-in is what the
    name means, always (--check fails on it). Two packages registering one name is an error.
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
    for builtin, others in reg.shadowed():  # listed after the built-in they do not replace
        message = reg.shadow_message(builtin, others)
        rows += [dict(p.as_dict(), status=f"warning: {message}") for p in others]
    rows.sort(key=lambda r: (r["kind"], r["name"], not r["builtin"]))
    failed = [r for r in rows if r["status"].startswith("error")]
    warned = {(r["kind"], r["name"]): r for r in rows if r["status"].startswith("warning")}
    if as_json:
        emit_json({"plugins": rows, "errors": len(failed), "warnings": len(warned)})
    else:
        from rich.table import Table

        table = Table(title="alexcli plugins", title_justify="left")
        for col in ("kind", "name", "package", "version", "status"):
            table.add_column(col)
        for r in rows:
            level = r["status"].partition(":")[0]
            short = level if level in ("error", "warning") else r["status"]
            table.add_row(r["kind"], r["name"], r["package"], r["version"], short,
                          style={"error": "red", "warning": "yellow"}.get(level))
        out.print(table)
        for r in failed + list(warned.values()):  # in full, below the table, one line each
            err.print(f"{r['kind']} {r['name']}: {r['status']}", soft_wrap=True, markup=False)
    if (failed and (check or any("claimed by" in r["status"] for r in failed))) or (warned and check):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("plugins")(plugins_command)
