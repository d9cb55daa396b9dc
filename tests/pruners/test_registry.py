import pytest

from prunekit.errors import PluginError, UnknownNameError
from prunekit.pruners import registry
from tests.fake_plugins import GOOD, install, unique


def test_builtins_are_listed_through_entry_points():
    plugins = registry.discover()
    assert {"magnitude", "random"} <= set(plugins)
    assert plugins["magnitude"][0].distribution == "prunekit"


def test_names_are_listed_without_importing(tmp_path, monkeypatch):
    mod = unique("explodes")
    install(
        tmp_path,
        monkeypatch,
        "explosive",
        {mod: "raise RuntimeError('boom')"},
        {"explosive": f"{mod}:X"},
    )
    monkeypatch.delenv("PRUNEKIT_PLUGINS")
    assert "explosive" in registry.names()  # no import happened, so no error


def test_broken_import_is_reported_not_raised(tmp_path, monkeypatch):
    mod = unique("broken")
    install(
        tmp_path,
        monkeypatch,
        "broken-plugin",
        {mod: "raise ImportError('needs foo')"},
        {"broken": f"{mod}:Broken"},
    )
    monkeypatch.setenv("PRUNEKIT_PLUGINS", "broken")
    rows = {r["name"]: r for r in registry.describe()}
    assert rows["magnitude"]["error"] is None
    assert rows["broken"]["distribution"] == "broken-plugin"
    assert "failed to import" in rows["broken"]["error"]
    assert "needs foo" in rows["broken"]["error"]
    with pytest.raises(PluginError, match=r"broken-plugin 1\.0 failed to import"):
        registry.load("broken")


def test_entry_point_that_is_not_a_pruner(tmp_path, monkeypatch):
    mod = unique("notpruner")
    install(tmp_path, monkeypatch, "odd", {mod: "class X: pass"}, {"odd": f"{mod}:X"})
    monkeypatch.setenv("PRUNEKIT_PLUGINS", "odd")
    with pytest.raises(PluginError, match=r"not a prunekit\.api\.Pruner subclass"):
        registry.load("odd")


def test_duplicate_names_name_both_distributions(tmp_path, monkeypatch):
    a, b = unique("dup_a"), unique("dup_b")
    install(
        tmp_path / "a", monkeypatch, "dist-a", {a: GOOD.format(name="twin")}, {"twin": f"{a}:Fixed"}
    )
    install(
        tmp_path / "b", monkeypatch, "dist-b", {b: GOOD.format(name="twin")}, {"twin": f"{b}:Fixed"}
    )
    monkeypatch.setenv("PRUNEKIT_PLUGINS", "twin")
    with pytest.raises(PluginError, match=r"both dist-(a|b) .* and dist-(a|b)"):
        registry.load("twin")
    rows = [r for r in registry.describe() if r["name"] == "twin"]  # one row per declaration
    assert sorted(r["distribution"] for r in rows) == ["dist-a", "dist-b"]
    assert all("registered by both" in r["error"] for r in rows)


def test_plugin_filter(tmp_path, monkeypatch):
    mod = unique("good")
    install(
        tmp_path,
        monkeypatch,
        "good-plugin",
        {mod: GOOD.format(name="fixed")},
        {"fixed": f"{mod}:Fixed"},
    )
    monkeypatch.setenv("PRUNEKIT_PLUGINS", "")
    assert "fixed" not in registry.names()
    assert {"magnitude", "random"} <= set(registry.names())  # built-ins always load
    monkeypatch.setenv("PRUNEKIT_PLUGINS", "fixed")
    assert "fixed" in registry.names()
    monkeypatch.setenv("PRUNEKIT_PLUGINS", "other, good-plugin")  # by distribution name
    assert registry.create("fixed").summary() == "Scores every weight 1."
    monkeypatch.delenv("PRUNEKIT_PLUGINS")
    assert "fixed" in registry.names()


def test_unknown_name_suggests_close_ones():
    with pytest.raises(UnknownNameError, match="did you mean magnitude"):
        registry.load("magnitud")


def test_unknown_parameter():
    with pytest.raises(UnknownNameError, match="pruner 'magnitude' has no parameter damp"):
        registry.create("magnitude", {"damp": "1"})
