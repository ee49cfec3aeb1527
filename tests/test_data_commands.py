"""``vermeer data`` actions come from plugins (hook ``vermeer_data_commands``), and
``vermeer_core`` imports no plugin module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from vermeer_core import cli
from vermeer_core.api import DataError, hookimpl
from vermeer_core.plugins import load

CORE = Path(__file__).resolve().parents[1] / "vermeer_core"


class Hello:
    """A third-party plugin adding `vermeer data hello`."""

    @hookimpl
    def vermeer_data_commands(self, subparsers):
        p = subparsers.add_parser("hello", help="greet")
        p.add_argument("--name", required=True)
        p.add_argument("--fail", action="store_true")
        p.set_defaults(func=self.run)

    @staticmethod
    def run(args) -> int:
        if args.fail:
            raise DataError(f"cannot greet {args.name}")
        print(f"hello {args.name}")
        return 0


class Clash:
    @hookimpl
    def vermeer_data_commands(self, subparsers):
        subparsers.add_parser("synth", help="mine")


class NoHandler:
    @hookimpl
    def vermeer_data_commands(self, subparsers):
        subparsers.add_parser("orphan")


def _with(monkeypatch, *extra) -> None:
    plugins = load(extra=list(extra), autoload=False)
    monkeypatch.setattr(cli, "get_plugins", lambda: plugins)


def test_a_plugin_adds_an_action_beside_the_builtins(monkeypatch, capsys):
    _with(monkeypatch, Hello())
    assert cli.main(["data", "hello", "--name", "ada"]) == 0
    assert capsys.readouterr().out == "hello ada\n"
    data = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["data"]._actions
                if hasattr(a, "choices") and a.choices)
    assert {"synth", "inspect", "from-folder", "hello"} <= set(data.choices)


def test_a_handlers_user_error_is_a_message(monkeypatch, capsys):
    _with(monkeypatch, Hello())
    assert cli.main(["data", "hello", "--name", "bob", "--fail"]) == 1
    err = capsys.readouterr().err
    assert err == "error: cannot greet bob\n"


def test_a_name_taken_twice_names_both_plugins(monkeypatch, capsys):
    _with(monkeypatch, Clash())
    assert cli.main(["data", "synth", "--help"]) == 2
    err = capsys.readouterr().err
    assert "'synth' (plugin 'synthetic')" in err and "already exists" in err and "Traceback" not in err


def test_an_action_without_a_handler_is_refused(monkeypatch, capsys):
    _with(monkeypatch, NoHandler())
    assert cli.main(["data", "orphan"]) == 2
    assert "without a handler" in capsys.readouterr().err


def test_disabling_a_plugin_removes_its_actions(monkeypatch):
    monkeypatch.setenv("VERMEER_DISABLED_PLUGINS", "synthetic")
    _with(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        cli.main(["data", "synth", "--out", "x", "--n", "1", "--resolution", "8"])
    assert exc.value.code == 2  # argparse: invalid choice


def test_the_installed_cli_lists_the_builtin_actions():
    r = subprocess.run([sys.executable, "-m", "vermeer_core", "data", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert all(a in r.stdout for a in ("synth", "inspect", "from-folder"))


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_imports_no_plugin(path: Path):
    assert not {m for m in _imports(path) if m.split(".")[0] == "vermeer_plugins"}, path.name


def test_importing_core_loads_no_plugin_module():
    code = ("import sys, vermeer_core.api, vermeer_core.cli, vermeer_core.engine, vermeer_core.data_cli; "
            "print(sorted(m for m in sys.modules if m.startswith('vermeer_plugins')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_hookspec_is_documented():
    from vermeer_core import hookspecs

    assert "vermeer_data_commands" in hookspecs.__all__
    doc = hookspecs.vermeer_data_commands.__doc__ or ""
    assert "set_defaults(func=" in doc and "exit" in doc
