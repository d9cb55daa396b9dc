"""The command line as a Click command, for the documentation's generated CLI reference
(mkdocs-click reads it; nothing else imports this module)."""

from __future__ import annotations

import typer.main

from prunekit.cli import app

command = typer.main.get_command(app)
