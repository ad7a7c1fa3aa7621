"""The root ``kvtool`` command: groups, ``--version``, ``info`` and the error boundary."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from kedit_vfl import __version__
from kedit_vfl.artifacts import describe
from kedit_vfl.console import (
    JsonOption,
    TrustOption,
    debug_enabled,
    emit_json,
    error_line,
    print_kv,
    print_table,
)
from kedit_vfl.edit.cli import app as edit_app
from kedit_vfl.errors import PeerError, UserError
from kedit_vfl.signing import generate_signing_key, use_signing
from kedit_vfl.signing import reset as reset_signing
from kedit_vfl.vfl.cli import app as vfl_app

# Which extra brings a package a command needs (``pip install 'kvtool[EXTRA]'``).
EXTRA_OF = {
    "transformers": "edit", "tokenizers": "edit", "datasets": "edit", "matplotlib": "edit",
    "pyarrow": "vfl", "pandas": "vfl", "private_set_intersection": "vfl",
    "onnx": "onnx", "onnxruntime": "onnx",
    "fastapi": "serve", "starlette": "serve", "uvicorn": "serve", "prometheus_client": "serve",
}  # fmt: skip


def missing_extra(exc: ModuleNotFoundError, argv: list[str]) -> str | None:
    """The one line for a command whose optional dependencies are not installed."""
    package = (exc.name or "").split(".")[0]
    group = next((a for a in argv if a in ("vfl", "edit")), None)
    extra = EXTRA_OF.get(package) or (group if package == "sklearn" else None)
    if extra is None:
        return None
    command = " ".join(a for a in argv[:2] if not a.startswith("-")) or "this command"
    return f"kvtool {command} needs the '{package}' package: pip install 'kvtool[{extra}]'"


class _ErrorBoundary(TyperGroup):
    """User errors become one line and exit 2; a failed peer one line and exit 1; bugs exit 1
    with a pointer to ``--debug`` (which shows tracebacks)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if debug_enabled():
                traceback.print_exc()
            error_line(str(exc))
            raise typer.Exit(2) from exc
        except PeerError as exc:
            if debug_enabled():
                traceback.print_exc()
            error_line(str(exc))
            raise typer.Exit(1) from exc
        except BrokenPipeError:
            raise  # the reader left: the executable ends quietly (launch.py)
        except KeyboardInterrupt as exc:
            error_line("interrupted; no partial output was written")
            raise typer.Exit(130) from exc
        except ModuleNotFoundError as exc:
            line = missing_extra(exc, sys.argv[1:])
            if line is None or debug_enabled():
                raise
            error_line(line)
            raise typer.Exit(2) from exc
        except Exception as exc:
            # Typer's own control flow (exit, abort, usage errors) passes through untouched.
            if type(exc).__module__.startswith(("typer", "click")) or debug_enabled():
                raise
            error_line(
                f"internal error: {type(exc).__name__}: {exc} "
                "(a bug in kvtool; rerun with --debug for the traceback)"
            )
            raise typer.Exit(1) from exc
        finally:
            reset_signing()


app = typer.Typer(
    cls=_ErrorBoundary,
    name="kvtool",
    help="Knowledge editing (InstructEdit) and vertical federated learning (VFed-SSD).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(vfl_app, name="vfl")
app.add_typer(edit_app, name="edit")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kvtool {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for every error.")] = False,
) -> None:
    """kvtool: InstructEdit knowledge editing and VFed-SSD vertical federated learning.

    Example: kvtool vfl pretrain-mpd && kvtool vfl train-split && kvtool vfl distill && kvtool vfl score
    """
    if debug:
        os.environ["KVTOOL_DEBUG"] = "1"


@app.command()
def info(
    artifact: Annotated[Path, typer.Argument(help="A kvtool artifact (.safetensors).")],
    json_output: JsonOption = False,
    trust: TrustOption = None,
) -> None:
    """Show an artifact's kind, version, config, provenance and tensor shapes.

    Example: kvtool info runs/vfl/split.safetensors --json
    """
    use_signing(None, trust)
    details = describe(artifact)
    if json_output:
        emit_json(details)
        return
    print_kv(
        f"{details['path']}",
        {
            "kind": details["kind"],
            "party": details["party"] or "-",
            "kvtool_version": details["kvtool_version"],
            "sha256": details["sha256"],
            "signed by": _signed_by(details),
            "parameters": details["parameters"],
            "command": details["provenance"].get("command"),
            "seed": details["provenance"].get("seed"),
            "created": details["provenance"].get("time"),
            "parents": ", ".join(p.get("kind", "?") for p in details["provenance"].get("parents", [])) or "-",
        },
    )
    print_kv("config", {k: v for k, v in details["config"].items()})
    print_table(
        "tensors",
        ["name", "shape", "dtype"],
        [
            [name, "x".join(map(str, t["shape"])) or "scalar", t["dtype"]]
            for name, t in details["tensors"].items()
        ],
    )


def _signed_by(details: dict) -> str:
    if details["signed_by"] is None:
        return "-"
    if details["signature_verified"]:
        return f"{details['signed_by']} (verified)"
    return f"{details['signed_by']} (not verified: pass --trust with the signer's public key)"


@app.command("sign-keygen")
def sign_keygen(
    out: Annotated[Path, typer.Option("--out", help="Folder for signing.key (private) and signing.pub.")],
    force: Annotated[bool, typer.Option("--force", help="Replace a key already in --out.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Make an Ed25519 key pair for signing artifacts (--sign-key) and checking them (--trust).

    Example: kvtool sign-keygen --out ci-key && kvtool vfl distill --sign-key ci-key/signing.key
    && kvtool vfl score --trust ci-key/signing.pub
    """
    private, public, fingerprint = generate_signing_key(out, force)
    result = {"private_key": str(private), "public_key": str(public), "fingerprint": fingerprint}
    if json_output:
        emit_json(result)
        return
    typer.echo(f"private key (keep it secret; --sign-key): {private}")
    typer.echo(f"public key (give it to readers; --trust): {public}")
    typer.echo(f"fingerprint: {fingerprint}")


def main() -> None:
    app()
