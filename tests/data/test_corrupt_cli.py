"""`noisepo data corrupt IN OUT`: the real CLI on tiny files; bad input is one line and exit 2."""
from __future__ import annotations

import json
import subprocess
import sys

from noisepo.cli import main


def write_pairs(path, n: int) -> str:
    path.write_text("".join(json.dumps({"id": i, "prompt": f"{i}+1=", "chosen": str(i + 1),
                                        "rejected": str(i + 2)}) + "\n" for i in range(n)))
    return str(path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_corrupt_writes_every_pair_with_label_flipped(tmp_path, capsys):
    src, out = write_pairs(tmp_path / "in.jsonl", 100), tmp_path / "sub" / "out.jsonl"
    assert main(["data", "corrupt", src, str(out), "--eta", "0.3", "--kind", "symmetric", "--seed", "3"]) == 0
    records = read_jsonl(out)
    flipped = sum(r["label_flipped"] for r in records)
    assert len(records) == 100 and all(isinstance(r["label_flipped"], bool) for r in records)
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert "100 pairs" in line and f"{flipped} flipped now" in line
    assert not list(out.parent.glob(".*.tmp"))  # written atomically, no temp file left


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "b"}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["data", "corrupt", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{src}:1: field 'rejected': is identical to 'chosen'" in err
    assert "Traceback" not in err and not out.exists()


def test_bad_eta_exits_2(tmp_path, capsys):
    src = write_pairs(tmp_path / "in.jsonl", 3)
    assert main(["data", "corrupt", src, str(tmp_path / "o.jsonl"), "--eta", "1.5"]) == 2
    assert "'eta': must be in [0, 1]" in capsys.readouterr().err


def test_skip_invalid_flag(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(open(write_pairs(tmp_path / "good.jsonl", 4)).read() + "{oops\n")
    out = tmp_path / "out.jsonl"
    assert main(["data", "corrupt", str(src), str(out), "--skip-invalid"]) == 0
    assert len(read_jsonl(out)) == 4 and "1 invalid skipped" in capsys.readouterr().out


def test_subprocess_bad_file_exit_status_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": 1, "rejected": "c"}\n')
    proc = subprocess.run([sys.executable, "-m", "noisepo", "data", "corrupt", str(bad),
                           str(tmp_path / "out.jsonl")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{bad}:1: field 'chosen': must be a string, got int" in proc.stderr
