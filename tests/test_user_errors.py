"""Every user error is a message: spec files (encoding, size, YAML aliases), run names, sizes
that would allocate absurd memory, a run that cannot fit this machine, a full disk, malformed
safetensors files. Specs exit 2 and write nothing; other problems exit 1."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from engine_spec import ROOT, run_cli, run_main, spec_data, write_spec
from vermeer_core.cli import main
from vermeer_core.io import StorageError, disk_full, storage_errors
from vermeer_core.memcheck import check_fits, peak_bytes
from vermeer_core.plugins import get_registry
from vermeer_core.spec import MAX_SPEC_BYTES, SpecError, load_spec

QUICK = str(ROOT / "specs" / "quickstart.yaml")


def validate(path: Path | str, *extra: str, capsys) -> tuple[int, str]:
    code = main(["validate", str(path), *extra])
    return code, capsys.readouterr().err


# --- spec files ------------------------------------------------------------------------------
def test_non_utf8_spec(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(Path(QUICK).read_bytes() + "# caf\xe9\n".encode("latin-1"))
    code, err = validate(path, capsys=capsys)
    assert code == 2 and "is not UTF-8 text: byte 0xe9" in err and "save the spec as UTF-8" in err
    assert "Traceback" not in err


def test_oversized_spec(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_bytes(Path(QUICK).read_bytes() + b"#" * MAX_SPEC_BYTES)
    code, err = validate(path, capsys=capsys)
    assert code == 2 and f"a spec is at most {MAX_SPEC_BYTES} bytes" in err


@pytest.mark.parametrize("name", ["..", ".", "a/b", "", "../x", "x" * 200])
def test_name_must_be_one_safe_path_segment(tmp_path, capsys, name):
    code, err = validate(QUICK, "--set", f"name={json.dumps(name)}", capsys=capsys)
    assert code == 2 and "name" in err and "Traceback" not in err


def test_alias_bomb_in_an_any_field_is_refused(tmp_path, capsys):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    data = yaml.safe_load(Path(QUICK).read_text())
    data.pop("data", None)
    path = tmp_path / "bomb.yaml"  # 10^9 strings in data.storage_options, in about 600 bytes
    path.write_text(yaml.safe_dump(data) + "data:\n  type: webdataset\n  urls: x\n  storage_options:\n"
                    + "".join(f"    {line}\n" for line in lines))
    assert path.stat().st_size < 100_000
    code, err = validate(path, capsys=capsys)
    assert code == 2 and "expands to more than" in err and "aliases" in err


def test_recursive_alias_is_refused_and_ordinary_aliases_work(tmp_path, capsys):
    data = yaml.safe_load(Path(QUICK).read_text())
    data["sampling"] = {**data.get("sampling", {}), "prompts": ["PLACEHOLDER"]}
    name = data.pop("name")
    ok = tmp_path / "ok.yaml"
    ok.write_text(f"name: &n {name}\n" + yaml.safe_dump(data).replace("- PLACEHOLDER", "- *n"))
    assert load_spec(ok, get_registry()).sampling.prompts == [name]
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"name: {name}\n" + yaml.safe_dump(data).replace("- PLACEHOLDER", "- &x [*x]"))
    code, err = validate(loop, capsys=capsys)
    assert code == 2 and "alias refers to the node that contains it" in err and "Traceback" not in err


def test_set_values_are_bounded_too(capsys):
    code, err = validate(QUICK, "--set", "data.storage_options=&a [1, *a]", capsys=capsys)
    assert code == 2 and "Traceback" not in err


# --- absurd sizes ----------------------------------------------------------------------------
def test_absurd_size_is_refused_by_plans_estimate(capsys):
    # (a core width of 2^20 is refused the same way: petabytes of parameters; slower to plan)
    code, err = validate(QUICK, "--set", "stages.0.batch_size=1000000000", capsys=capsys)
    assert code == 2 and "GiB of memory over all ranks" in err and "--no-size-check" in err
    assert main(["validate", QUICK, "--set", "stages.0.batch_size=1000000000", "--no-size-check"]) == 0


def test_absurd_sampling_steps(capsys):
    code, err = validate(QUICK, "--set", "sampling.steps=1e9", capsys=capsys)
    assert code == 2 and "sampling.steps" in err


def test_run_that_cannot_fit_says_what_to_do():
    import torch

    registry = get_registry()
    spec = load_spec(QUICK, registry)
    need = peak_bytes(spec, registry, 1)[0]
    with pytest.raises(SpecError) as exc:
        check_fits(spec, registry, QUICK, world_size=1, device=torch.device("cuda"), available=(need // 3, "a test GPU"))
    msg = str(exc.value)
    assert "per rank" in msg and "(a test GPU)" in msg and "more ranks (about 4:" in msg
    assert "--smoke" in msg and "--no-memory-check" in msg
    check_fits(spec, registry, QUICK, world_size=4, device=torch.device("cuda"), available=(need // 3, "a test GPU"))
    with pytest.raises(SpecError, match="4 CPU ranks share"):  # CPU ranks share the host's memory
        check_fits(spec, registry, QUICK, world_size=4, device=torch.device("cpu"), available=(need // 3, "RAM"))


def test_run_on_this_machine_refuses_before_writing(tmp_path, capsys):
    # ~26 TiB at 64 px: more than any machine offers, below check_sane's 256 TiB (planning the
    # quickstart costs ~1 s; grow_1024's plan, needing 1.6 TiB, cost ~8 s)
    r = run_main(["run", QUICK, "--set", "stages.1.batch_size=1000000", "--out", str(tmp_path / "run"),
                  "--device", "cpu"], capsys)
    assert r.returncode == 2, r.stderr
    assert "MemAvailable" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


# --- a full disk -----------------------------------------------------------------------------
def test_disk_full_is_found_through_wrappers():
    inner = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise inner
        except OSError as e:
            raise RuntimeError("write failed") from e
    except RuntimeError as outer:
        assert disk_full(outer) is inner

    class CheckpointException(BaseException):  # DCP's shape: rank -> (exception, traceback)
        failures = {0: (inner, "tb")}

    assert disk_full(CheckpointException()) is inner
    assert disk_full(RuntimeError("x")) is None
    with pytest.raises(StorageError) as exc:
        with storage_errors("/tmp/x", "write"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert exc.value.kind == "full" and "free space" in str(exc.value)


def test_disk_full_anywhere_in_a_command_is_a_message(monkeypatch, capsys):
    import vermeer_core.cli as cli

    def handler(args):
        with open("/dev/full", "w") as f:  # a real ENOSPC from the kernel
            f.write("x")
            f.flush()

    parser = cli.build_parser()
    real = parser.parse_args

    def parse(argv):
        args = real(argv)
        args.func = handler
        return args

    monkeypatch.setattr(cli, "build_parser", lambda: type("P", (), {"parse_args": staticmethod(parse)})())
    assert cli.main(["validate", QUICK]) == 1
    err = capsys.readouterr().err
    assert "disk is full" in err and "--resume auto" in err and "Traceback" not in err


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs",
                                                        str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_run_onto_a_full_disk_exits_with_advice(tmp_path, tiny_disk):
    spec = write_spec(tmp_path / "spec.yaml", spec_data(checkpoint_every=2))
    r = run_cli(["run", str(spec), "--out", str(tiny_disk / "run")], timeout=600)
    assert r.returncode == 1, r.stderr
    assert "no space left" in r.stderr.lower() and "--resume auto" in r.stderr and "Traceback" not in r.stderr


# --- malformed safetensors -------------------------------------------------------------------
def _header(obj, pad: bytes = b"") -> bytes:
    raw = json.dumps(obj).encode()
    return len(raw).to_bytes(8, "little") + raw + pad


@pytest.mark.parametrize("blob, message", [
    (b"", "shorter than the 8-byte header length"),
    ((10**12).to_bytes(8, "little") + b"{}", "header claims 1000000000000 bytes"),
    ((4).to_bytes(8, "little") + b"\xff\xfe{}", "header is not JSON"),
    (_header([1, 2]), "not a JSON object"),
    (_header({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "no vermeer_spec metadata"),
    (_header({"__metadata__": {"vermeer_spec": "{oops", "stage": "0"}}), "metadata is malformed"),
    (_header({"__metadata__": {"vermeer_spec": "{}", "stage": "zero"}}), "metadata is malformed"),
])
def test_malformed_safetensors_are_messages(tmp_path, capsys, blob, message):
    path = tmp_path / "w.safetensors"
    path.write_bytes(blob)
    assert main(["sample", str(path), "--prompt", "a red circle", "--out", str(tmp_path / "o.png")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_safetensors_with_bad_tensor_data(tmp_path, capsys):
    spec = json.dumps(load_spec(QUICK, get_registry()).model_dump(mode="json"))
    bad = _header({"__metadata__": {"vermeer_spec": spec, "stage": "0"},
                   "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 3)
    path = tmp_path / "w.safetensors"
    path.write_bytes(bad)
    assert main(["sample", str(path), "--prompt", "x", "--out", str(tmp_path / "o.png")]) == 1
    err = capsys.readouterr().err
    assert "not a readable safetensors file" in err and "Traceback" not in err
