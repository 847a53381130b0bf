from __future__ import annotations

import typer

from alexcli.cli._ui import emit_json, out


def doctor_command(
    brief: bool = typer.Option(False, "--brief", help="One line: alexcli, torch, torchvision, PIL and devices."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Show versions of torch, torchvision and PIL, whether PIL is pillow-simd, prepare's statistics
    kernel (C or numpy), and the devices seen.

    Example: alexcli doctor --json
    """
    from alexcli.env import report

    r = report()
    pil, dev, pk = r["pil"], r["devices"], r["packages"]
    simd = "pillow-simd" if pil["simd"] else f"NOT pillow-simd ({pil['package']})"
    gpus = ", ".join(dev["gpus"]) or "no GPU"
    if as_json:
        emit_json(r)
    elif brief:
        out.print(f"alexcli {r['alexcli']}: torch {pk['torch']}, torchvision {pk['torchvision']}, "
                  f"PIL {pil['version']} ({simd}), stats kernel {r['stats_kernel']}, "
                  f"{dev['cpu_cores']} CPU cores, {gpus}")
    else:
        out.print(f"alexcli      {r['alexcli']}  (Python {r['python']}, {r['platform']})")
        for name, v in pk.items():
            out.print(f"{name:<12} {v or 'not installed'}")
        out.print(f"{'PIL':<12} {pil['version']}  {simd}")
        out.print(f"{'statistics':<12} prepare's statistics kernel: {r['stats_kernel']}")
        out.print(f"{'devices':<12} {dev['cpu_cores']} CPU cores; {gpus}; torch CUDA build {dev['torch_cuda_build']}")
    if r["stats_kernel"] != "c":
        out.print("hint: prepare's C statistics kernel is not built (no C compiler at install?): "
                  "run scripts/setup.sh again once `cc` works", style="yellow")
    if not pil["simd"]:
        out.print("hint: run scripts/setup.sh to put pillow-simd in place of Pillow", style="yellow")


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor_command)
