"""Non-finite steps: the bad-steps-in-a-row counter spans phases and stages and survives a
resume (it is in the checkpoint meta); a phase that skips more than
``train.max_skipped_fraction`` of its steps stops the run with exit 1, never "done"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from engine_spec import committed_steps, read_metrics, spec_data, write_spec

from vermeer_core.cli import main


def test_bad_steps_in_a_row_span_stages_and_are_checkpointed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path / "s.yaml", spec_data(max_bad_steps=2, max_skipped_fraction=0.5))
    out = tmp_path / "run"
    # step 6 ends stage 0, step 7 starts stage 1: two in a row across the growth step
    monkeypatch.setenv("VERMEER_FAULT", "nan:6-7")
    assert main(["run", str(spec), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "loss was not finite for 2 steps in a row (stage 1, phase A, step 7)" in captured.err
    assert "done" not in captured.out
    assert committed_steps(out)[-1] == 6  # the stage-end checkpoint, written after the bad step 6
    meta = json.loads((out / "checkpoints" / "step-00000006" / "meta.json").read_text())
    assert (meta["bad_in_row"], meta["skipped_steps"]) == (1, 1)
    # the resumed run counts on from the checkpoint: one more bad step makes two in a row
    monkeypatch.setenv("VERMEER_FAULT", "nan:7-7")
    assert main(["run", str(spec), "--out", str(out)]) == 1
    assert "loss was not finite for 2 steps in a row (stage 1, phase A, step 7)" in capsys.readouterr().err
    # ...and a good step resets it
    monkeypatch.setenv("VERMEER_FAULT", "nan:9-9")
    assert main(["run", str(spec), "--out", str(out)]) == 0
    records = read_metrics(out)
    assert records[-1]["step"] == 12 and records[-1]["skipped_steps"] == 2  # steps 6 and 9, across a resume


def test_a_phase_that_skips_too_many_steps_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path / "s.yaml", spec_data(checkpoint_every=100))  # max_skipped_fraction: default 0.1
    out = tmp_path / "run"
    monkeypatch.setenv("VERMEER_FAULT", "nan:3-3")  # 1 of phase core's 6 steps: more than 10%
    assert main(["run", str(spec), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert ("phase core of stage 0 skipped 1 of its 6 steps as non-finite (step 3), more than "
            "train.max_skipped_fraction=0.1 of them; stopped. Last good checkpoint: none") in captured.err
    assert "done" not in captured.out
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
