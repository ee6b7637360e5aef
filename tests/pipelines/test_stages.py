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
