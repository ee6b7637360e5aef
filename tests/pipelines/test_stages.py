import json
import os
import subprocess
import sys
import textwrap

import pytest

from noisepo.pipelines.stages import RunFolder, RunFolderError, Stage


def test_stage_runs_once_and_marker_is_last(tmp_path):
    calls = []

    def work():
        calls.append(1)
        (tmp_path / "it" / "out.txt").write_text("x")
        return {"rows": 3}

    stage = Stage(tmp_path / "it", "generate")
    assert stage.run(work)["rows"] == 3
    assert stage.run(work)["rows"] == 3
    assert calls == [1]
    assert json.loads(stage.marker.read_text())["stage"] == "generate"


def test_stage_marker_records_seconds_unless_the_summary_has_its_own(tmp_path):
    timed = Stage(tmp_path, "train")
    assert isinstance(timed.run(lambda: {"rows": 1})["seconds"], float)
    assert Stage(tmp_path, "metrics").run(lambda: {"seconds": 12.5})["seconds"] == 12.5


def test_failed_stage_leaves_no_marker(tmp_path):
    stage = Stage(tmp_path, "train")

    def boom():
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        stage.run(boom)
    assert not stage.done


def test_manifest_written_and_config_change_refused(tmp_path):
    with RunFolder(tmp_path / "run", {"beta": 0.1, "gen": {"t": 0}}, seeds={"seed": 1}):
        pass
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["beta"] == 0.1 and manifest["seeds"] == {"seed": 1}
    assert manifest["packages"]["torch"]
    with RunFolder(tmp_path / "run", {"beta": 0.1, "gen": {"t": 0}}):  # same config: resume is fine
        pass
    with pytest.raises(RunFolderError, match="'gen.t': 0 there, 1 now"):
        with RunFolder(tmp_path / "run", {"beta": 0.1, "gen": {"t": 1}}):
            pass


def test_second_process_on_same_folder_refuses(tmp_path):
    root = tmp_path / "run"
    holder = textwrap.dedent(f"""
        import sys, time
        from noisepo.pipelines.stages import RunFolder
        with RunFolder({str(root)!r}, {{}}):
            print("locked", flush=True)
            sys.stdin.readline()
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=f"in use by another noisepo run \\(pid {proc.pid}\\)"):
            with RunFolder(root, {}):
                pass
    finally:
        proc.kill()
        proc.wait()
    with RunFolder(root, {}):  # a killed holder releases the lock
        pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    with pytest.raises(RunFolderError, match="not writable"):
        with RunFolder(root, {}):
            pass


def _read_only_folder() -> str | None:
    """A folder that even root cannot write into (procfs' sysctl tree), or None on a system without it."""
    path = "/proc/sys/kernel"
    return path if os.path.isdir(path) and not os.access(path, os.W_OK) else None


@pytest.mark.parametrize("where, message", [
    ("under-a-file", "cannot create the output folder .*: Not a directory"),
    ("read-only", "the output folder /proc/sys/kernel is not writable"),
    ("in-read-only", "cannot create the output folder /proc/sys/noisepo-run"),
])
def test_unwritable_output_folder_even_as_root(tmp_path, where, message):
    """What `test_unwritable_output_folder` checks, in places root cannot write either (CI runs as root)."""
    if where == "under-a-file":
        (tmp_path / "file").write_text("x")
        root = tmp_path / "file" / "run"
    else:
        if _read_only_folder() is None:
            pytest.skip("no read-only /proc/sys here")
        root = "/proc/sys/kernel" if where == "read-only" else "/proc/sys/noisepo-run"
    with pytest.raises(RunFolderError, match=message):
        with RunFolder(root, {}):
            pass


def test_a_loop_on_an_unwritable_output_is_one_line(micro_model_dir, tmp_path, capsys):
    from noisepo.cli import main

    (tmp_path / "file").write_text("x")
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
    assert main(["ropo", "--model", micro_model_dir, "--data", str(data), "--output", str(tmp_path / "file" / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("noisepo ropo: error: cannot create the output folder ")
