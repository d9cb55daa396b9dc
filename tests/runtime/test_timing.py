"""Phases of report.json: nested phases are exclusive, so they add up to the run."""

import time

from prunekit.runtime.timing import Timings
from tests.cli_helpers import prune_report


def test_a_nested_phase_pauses_the_enclosing_one():
    timings = Timings()
    with timings.phase("outer"):
        time.sleep(0.05)
        with timings.phase("inner"):
            time.sleep(0.1)
        time.sleep(0.05)
    assert 0.09 <= timings.seconds["outer"] < 0.15
    assert 0.09 <= timings.seconds["inner"] < 0.15


def test_layer_wise_work_and_a_pruners_preparation_are_in_the_phases(tmp_path):
    """Item 8 of the new-user trial: phases left out sparsegpt's and wanda's work (prune
    0.005 s of 9.5 s); fishleg's fit of Q is the plugin's test. The pruning phases must now
    hold what the run spent beyond loading, evaluating and exporting."""
    for pruner in ("sparsegpt", "wanda"):
        report = prune_report("sample:digits-resnet", "-p", pruner, "-s", "0.5", "--mask",
                              "layer", "--out", str(tmp_path / pruner))  # fmt: skip
        phases = report["phases"]
        assert sum(phases.values()) <= report["seconds"] + 1e-3  # exclusive: no double count
        work = phases["statistics"] + phases["prune"] + phases["prepare"]
        other = report["seconds"] - sum(phases.values())  # time in no phase at all
        assert work > other, (phases, report["seconds"])
