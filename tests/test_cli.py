from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vermeer_core.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "specs" / "quickstart.yaml")


def test_validate_ok(capsys):
    assert main(["validate", QUICK]) == 0
    assert "valid (3 stages: 32 -> 64 -> 128)" in capsys.readouterr().out


def test_spec_error_exits_2_without_traceback(tmp_path, capsys):
    assert main(["validate", QUICK, "--set", "stages.1.growth.type=nope"]) == 2
    err = capsys.readouterr().err
    assert "stages.1.growth: unknown type 'nope'" in err and "Traceback" not in err


def test_console_script_exit_code_and_nothing_written(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run(
        [sys.executable, "-m", "vermeer_core", "run", QUICK, "--set", "stages.1.resolution=96", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr
    assert "stages.1.resolution: 96 is not grid*2^k" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory, nothing at all


def test_missing_spec_file(capsys, tmp_path):
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "spec file not found" in capsys.readouterr().err


def test_plugins_json(capsys):
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {(r["kind"], r["name"]): r for r in data["components"]}
    assert rows[("core", "shallow-uvit")]["distribution"] == "vermeer"
    assert ("growth_policy", "greedy") in rows and ("sampler", "dpmpp-2m") in rows


def test_schema(tmp_path, capsys):
    out = tmp_path / "schema.json"
    assert main(["schema", "--out", str(out)]) == 0
    schema = json.loads(out.read_text())
    text = json.dumps(schema)
    assert "shallow-uvit" in text and "greedy" in text and schema["title"] == "RunSpec"


def test_plan_json(capsys):
    assert main(["plan", QUICK, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["stage"], r["phase"]) for r in rows] == [(0, "core"), (1, "A"), (1, "B"), (2, "A"), (2, "B")]
    for a, b in (rows[1:3], rows[3:5]):
        assert a["params_trainable"] < a["params_total"] == b["params_trainable"]
    flops = [r["gflop_per_image_fwd"] for r in rows]
    assert flops[0] < flops[1] == flops[2] < flops[3] == flops[4]  # bigger images cost more; phases share the model
    assert all(r["activation_bytes_per_image"] > 0 for r in rows)


def test_plan_world_size_halves_state(capsys):
    main(["plan", QUICK, "--json"])
    one = json.loads(capsys.readouterr().out)
    main(["plan", QUICK, "--json", "--world-size", "2"])
    two = json.loads(capsys.readouterr().out)
    for r1, r2 in zip(one, two):
        assert r2["per_rank_state_bytes"] == pytest.approx(r1["per_rank_state_bytes"] / 2, rel=1e-6)


def test_plan_table_prints(capsys):
    assert main(["plan", str(ROOT / "specs" / "grow_1024.yaml")]) == 0
    out = capsys.readouterr().out
    assert "1024" in out and "GFLOP/img" in out
