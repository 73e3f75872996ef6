"""The `gpuserve` command: `serve`, `probe` and `init`. It only parses: it builds the settings
once (file, then environment, then flags) and hands them to the runtime (`gpuserve.server`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gpuserve.config import Settings, describe_error
from gpuserve.core.errors import DeviceError
from gpuserve.logs import configure as configure_logging
from gpuserve.model.device import DeviceInfo, GpuSample
from gpuserve.version import __version__


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point; exits 1 with a message on a bad setting or an unusable device."""
    args = parser().parse_args(argv)
    if args.command == "init":
        _init(args.model_file, args.init_config)
        return
    if args.command == "from-torchserve":
        _from_torchserve(args.archive, args.out or Path(args.archive.stem))
        return
    if getattr(args, "model_path", None) and getattr(args, "model_file", None):
        sys.exit("gpuserve: give the model file once: as MODEL or as --model")
    flags = _flags(args)
    try:
        settings = Settings(**flags)
    except ValidationError as exc:
        sys.exit(f"gpuserve: invalid settings:\n{describe_error(exc, flags, os.environ)}")
    except ValueError as exc:  # the config file is missing or not TOML
        sys.exit(f"gpuserve: {exc}")
    if "model" in flags and settings.models:
        sys.exit(
            "gpuserve: a model file on the command line serves that one model, but the config "
            "file lists several ([[models]]); serve it without --config, or add it to the list"
        )
    if args.command == "serve" and not settings.served_models:
        sys.exit(f"gpuserve: {nothing_to_serve(settings)}")
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "probe":
        _probe(settings, args.json)
    else:
        from gpuserve.server import run

        run(settings)


_EXAMPLES = """examples:
  gpuserve serve model.pt2                   serve a torch.export file (spec inferred if no .json)
  gpuserve serve --config configs/default.toml --port 9000
  gpuserve init model.pt2                    write gpuserve.toml (and model.json) to edit
  gpuserve from-torchserve model.mar         a TorchServe archive as a folder to serve
  GPUSERVE_DEVICE=cpu gpuserve serve         environment variables: GPUSERVE_<SETTING>
  gpuserve probe --json                      which device would be used, and why
"""


def nothing_to_serve(settings: Settings) -> str:
    """Why `serve` will not start without a model, and what to give it."""
    if settings.config_file is not None:
        return (
            f"the config file {settings.config_file} names no model: add a [model] table "
            'with path = "model.pt2" (or [[models]] tables), or give the file: '
            "gpuserve serve --config FILE MODEL"
        )
    return (
        "no model to serve: give a model file (gpuserve serve model.pt2), a config file that "
        "names one (gpuserve serve --config FILE), or GPUSERVE_MODEL__PATH. "
        "`gpuserve init model.pt2` writes a starter config."
    )


def parser() -> argparse.ArgumentParser:
    """The command line: `serve`, `probe`, `init` and `from-torchserve`, with their flags."""
    root = argparse.ArgumentParser(
        prog="gpuserve",
        description="Serve PyTorch models over HTTP with dynamic batching, on the best GPU "
        "or on the CPU.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    root.add_argument("--version", action="version", version=f"gpuserve {__version__}")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    # Defaults are None so an absent flag leaves the file and environment in charge.
    common.add_argument(
        "--config",
        dest="config_file",
        type=Path,
        metavar="FILE",
        help=_setting("config_file", "TOML settings file; its paths are relative to it"),
    )
    common.add_argument("--device", help=_setting("device", "auto, all, cpu, cuda or cuda:N"))
    common.add_argument(
        "--log-level", dest="log_level", help=_setting("log_level", "debug, info, warning, error")
    )
    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="serve a model file, or the models of a config file",
        description="Serve a model file, or the models a config file lists. The settings come "
        "from the config file, then GPUSERVE_* environment variables, then these flags.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "model_file",
        nargs="?",
        type=Path,
        metavar="MODEL",
        help="a .pt2 or TorchScript file to serve (same as --model)",
    )
    serve.add_argument(
        "--model",
        dest="model_path",
        type=Path,
        metavar="PATH",
        help="the model file (replaces model.path; the config's other model settings apply). "
        "environment: GPUSERVE_MODEL__PATH",
    )
    serve.add_argument(
        "--name",
        dest="model_name",
        metavar="NAME",
        help="the model's name, as clients call it (replaces model.name; default: the file's "
        "stem). environment: GPUSERVE_MODEL__NAME",
    )
    serve.add_argument("--host", help=_setting("host", "address to listen on"))
    serve.add_argument(
        "--port", type=int, help=_setting("port", "port to listen on; 0 picks a free one")
    )
    serve.add_argument(
        "--grpc-port", dest="grpc_port", type=int, help=_setting("grpc_port", "gRPC port")
    )
    serve.add_argument(
        "--workers", help=_setting("workers", "server processes behind the port (N or auto)")
    )
    probe = commands.add_parser(
        "probe",
        parents=[common],
        help="print which device would be used and why, and every GPU NVML sees",
        description="Print which device gpuserve would use and why, then every GPU NVML sees.",
    )
    probe.add_argument("--json", action="store_true", help="print JSON instead of a table")
    init = commands.add_parser(
        "init",
        help="write a starter config (and spec) for a model file",
        description="Write a starter config for MODEL, listing every model setting at its "
        "default, and MODEL's spec beside it when there is none (inferred from a .pt2 "
        "program; a template to fill in for TorchScript). Never overwrites a file.",
    )
    init.add_argument("model_file", type=Path, metavar="MODEL", help="a .pt2 or TorchScript file")
    init.add_argument(
        "--config",
        dest="init_config",
        type=Path,
        default=Path("gpuserve.toml"),
        metavar="FILE",
        help="the config file to write (default: gpuserve.toml)",
    )
    imported = commands.add_parser(
        "from-torchserve",
        help="turn a TorchServe model archive (.mar) into a folder to serve",
        description="Write a gpuserve config, the model's files and a spec (labels from "
        "index_to_name.json) for a TorchServe archive holding a TorchScript, .pt2 or eager "
        "(model.py and a state dict) model; says what is left to do by hand. Runs nothing "
        "from the archive.",
    )
    imported.add_argument("archive", type=Path, metavar="ARCHIVE", help="a .mar file")
    imported.add_argument(
        "--out", type=Path, metavar="FOLDER", help="a new folder (default: the archive's name)"
    )
    return root


def _setting(name: str, text: str) -> str:
    """A flag's help: what it is, its default and its environment variable."""
    default = Settings.model_fields[name].default
    shown = "" if default is None else f"default: {default}; "
    return f"{text} ({shown}environment: GPUSERVE_{name.upper()})"


# Arguments that are not settings of their own: the command's, or a model setting's.
_NOT_SETTINGS = frozenset(
    {"command", "json", "model_file", "model_path", "model_name", "init_config", "archive", "out"}
)


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    flags = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS and v is not None}
    model = getattr(args, "model_path", None) or getattr(args, "model_file", None)
    if model is not None:
        flags["model"] = {"path": model}
    name = getattr(args, "model_name", None)
    if name is not None:
        flags.setdefault("model", {})["name"] = name
    return flags


def _init(model: Path, config: Path) -> None:
    from gpuserve.core.errors import ModelLoadError
    from gpuserve.model.starter import write_starter

    try:
        started = write_starter(model, config)
    except (FileExistsError, ModelLoadError) as exc:
        sys.exit(f"gpuserve: {exc}")
    print(f"wrote {config}" + (f" and {started.spec}" if started.spec else ""))
    for step in started.todo:
        print(f"  next: {step}")
    print(f"  then: gpuserve serve --config {config}")


def _from_torchserve(archive: Path, out: Path) -> None:
    from gpuserve.model.torchserve import ArchiveError, convert

    try:
        converted = convert(archive, out)
    except ArchiveError as exc:
        sys.exit(f"gpuserve: {exc}")
    wrote = [converted.config, *converted.files, converted.spec]
    print("wrote " + ", ".join(str(path) for path in wrote))
    for note in converted.notes:
        print(f"  note: {note}")
    print(f"  then: gpuserve serve --config {converted.config}")


def _probe(settings: Settings, as_json: bool) -> None:
    from gpuserve.model.device import GpuMonitor, probe

    try:
        info = probe(settings.device)
    except DeviceError as exc:
        if as_json:
            print(json.dumps({"device": settings.device, "error": exc.message}, indent=2))
        else:
            print(f"gpuserve: {exc.message}", file=sys.stderr)
        sys.exit(2)
    monitor = GpuMonitor()
    try:
        gpus = monitor.sample()
    finally:
        monitor.close()
    if as_json:
        body = {**info.to_dict(), "gpus": [asdict(gpu) for gpu in gpus]}
        if monitor.problem is not None:
            body["nvml"] = monitor.problem
        print(json.dumps(body, indent=2))
    else:
        print(probe_table(info, gpus, monitor.problem))


def probe_table(info: DeviceInfo, gpus: list[GpuSample], nvml_problem: str | None) -> str:
    """What the probe found, for a person: the choice and its reason, then every GPU seen."""
    memory = info.total_memory_bytes
    lines = [
        f"device   {info.device}  ({info.name})",
        f"reason   {info.reason}",
        f"torch    {info.torch_version}, CUDA {info.cuda_version or 'none'}",
    ]
    if memory is not None:
        free = "" if info.free_memory_bytes is None else f"{_gib(info.free_memory_bytes)} free of "
        lines.append(f"memory   {free}{_gib(memory)}")
    if not gpus:
        lines.append(f"GPUs     none seen by NVML{f' ({nvml_problem})' if nvml_problem else ''}")
        return "\n".join(lines)
    rows = [("GPU", "name", "memory used / total", "util", "temp", "power")]
    for gpu in gpus:
        used, total = gpu.memory_used_bytes, gpu.memory_total_bytes
        rows.append(
            (
                str(gpu.index),
                gpu.name,
                "-" if used is None or total is None else f"{_gib(used)} / {_gib(total)}",
                "-" if gpu.utilization is None else f"{gpu.utilization:.0%}",
                "-" if gpu.temperature_celsius is None else f"{gpu.temperature_celsius:.0f} C",
                "-" if gpu.power_watts is None else f"{gpu.power_watts:.0f} W",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines.append("")
    lines += [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines)


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"
