"""Running the CLI in tests: one runner, `prune`, `prune_report` and the one-line error check."""

from __future__ import annotations

import json
from typing import Any

from typer.testing import CliRunner, Result

from prunekit.cli import app

runner = CliRunner()
CNN_HALF = ("sample:digits-cnn", "-p", "magnitude", "-s", "0.5")
MLP_HALF = ("sample:digits-mlp", "-p", "magnitude", "-s", "0.5")


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def prune(*args: str) -> Result:
    """`prunekit prune ARGS`."""
    return invoke("prune", *args)


def prune_report(*args: str) -> dict[str, Any]:
    """`prunekit prune ARGS --json`, which must succeed; the parsed report."""
    result = prune(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_error(result: Result, code: int, *fragments: str) -> None:
    """Exit ``code``, exactly one `error:` line on stderr holding every fragment, no traceback
    (besides `progress:` lines, which the CLI prints when stderr is not a terminal)."""
    assert result.exit_code == code, result.output
    lines = [
        line for line in result.stderr.strip().splitlines() if not line.startswith("progress:")
    ]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
