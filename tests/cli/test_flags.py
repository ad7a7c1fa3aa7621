"""Every flag an error message names is a flag some command has."""

from __future__ import annotations

import re
from pathlib import Path

import typer.main

from kedit_vfl.cli import app

SOURCES = Path(__file__).resolve().parents[2] / "kedit_vfl"
NAMED = re.compile(r"--([a-z][a-z0-9-]+)")
# Flags built from field names at run time (f"--{name.replace('_', '-')}") in the configs.
GENERATED = re.compile(r"for name in \(([^)]*)\)")


def _all_flags() -> set[str]:
    flags: set[str] = set()

    def walk(command: object) -> None:
        for param in getattr(command, "params", []):
            names = param.opts + param.secondary_opts
            flags.update(o.removeprefix("--") for o in names if o.startswith("--"))
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    return flags


def _named_in_errors() -> dict[str, str]:
    named = {}
    for path in SOURCES.rglob("*.py"):
        text = path.read_text()
        for line in text.splitlines():
            if "UserError(" in line or "_positive(" in line or 'f"--' in line or '"--' in line:
                for flag in NAMED.findall(line):
                    named.setdefault(flag, str(path.relative_to(SOURCES.parent)))
        if path.name != "config.py":
            continue
        for group in GENERATED.findall(text):
            for name in re.findall(r'"([a-z_]+)"', group):
                named.setdefault(name.replace("_", "-"), str(path.relative_to(SOURCES.parent)))
    return named


def test_every_flag_named_in_an_error_exists() -> None:
    flags = _all_flags()

    def exists(flag: str) -> bool:  # "--features-" in an f-string names a family of flags
        return flag in flags or (flag.endswith("-") and any(f.startswith(flag) for f in flags))

    missing = {flag: where for flag, where in _named_in_errors().items() if not exists(flag)}
    assert not missing, f"errors name flags no command has: {missing}"
