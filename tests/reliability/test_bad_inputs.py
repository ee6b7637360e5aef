"""Bad input through every command that reads data or config: exit status 2, one line naming the
file, the line and the field (or the config key), no traceback, and nothing computed or written.

The corpus is a table: each class of bad data file is written for the record kind a command reads
(SFT, preference pairs, prompts) and fed to every command that reads that kind, through the real
CLI entry point (`noisepo.cli.main`) in-process; one subprocess run per command family checks that
a real process prints no traceback either. What is accepted on purpose is tested too: a UTF-8
byte-order mark is read transparently, a very long line loads, and a prompt longer than
`--max-length` is cut from the left so the response keeps at least half the budget.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from noisepo.cli import main

GOOD = {
    "sft": {"prompt": "1+1=", "completion": "2"},
    "preference": {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
    "prompt": {"prompt": "1+1=", "answer": "2"},
}
REQUIRED = {"sft": "completion", "preference": "rejected", "prompt": "prompt"}
CHAT = {
    "sft": {"prompt": [{"role": "user", "content": "1+1"}], "completion": [{"role": "assistant", "content": "2"}]},
    "preference": {"prompt": [{"role": "user", "content": "1+1"}], "chosen": [{"role": "assistant", "content": "2"}],
                   "rejected": [{"role": "assistant", "content": "3"}]},
    "prompt": {"prompt": [{"role": "user", "content": "1+1"}], "answer": "2"},
}
LONG = 2_000_000  # characters on one line: a 2 MB row


def lines(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def without(row: dict, key: str) -> dict:
    return {k: v for k, v in row.items() if k != key}


# class -> (file suffix, content for a record kind, expected location: (line, field) or None, message part)
CORPUS = {
    "missing file": (".jsonl", None, None, "file not found"),
    "empty file": (".jsonl", lambda kind: b"", None, "is empty"),
    "only whitespace": (".jsonl", lambda kind: b"\n \n\t\n", None, "is empty (only whitespace)"),
    "unsupported format": (".csv", lambda kind: b"prompt,completion\n1+1=,2\n", None, "unsupported format"),
    "not utf-8": (".jsonl", lambda kind: lines(GOOD[kind], b'{"prompt": "caf\xe9"}'), (2, None), "is not UTF-8"),
    "malformed json": (".jsonl", lambda kind: lines(GOOD[kind], b'{"prompt": "1+1=", '), (2, None), "not valid JSON"),
    "not an object": (".jsonl", lambda kind: lines(GOOD[kind], b"[1, 2]"), (2, None), "must be a JSON object"),
    "missing field": (".jsonl", lambda kind: lines(GOOD[kind], without(GOOD[kind], REQUIRED[kind])),
                      (2, "REQUIRED"), "is missing"),
    "null field": (".jsonl", lambda kind: lines(GOOD[kind], {**GOOD[kind], "prompt": None}), (2, "prompt"), "is null"),
    "wrong type": (".jsonl", lambda kind: lines(GOOD[kind], {**GOOD[kind], "prompt": 7}), (2, "prompt"),
                   "must be a string, got int"),
    "empty field": (".jsonl", lambda kind: lines(GOOD[kind], {**GOOD[kind], "prompt": "  "}), (2, "prompt"),
                    "is empty"),
    "bad weight": (".jsonl", lambda kind: lines(GOOD[kind], {**GOOD[kind], "weight": -1}), (2, "weight"),
                   "must be a finite number >= 0"),
    "very long bad line": (".jsonl", lambda kind: lines(GOOD[kind], {**GOOD[kind], "note": "x" * LONG, "prompt": 7}),
                           (2, "prompt"), "must be a string, got int"),
    "mixed formats": (".jsonl", lambda kind: lines(GOOD[kind], GOOD[kind], CHAT[kind]), (3, "prompt"),
                      "is a list of messages (conversational format) but line 1 has a string"),
    "bom then bad row": (".jsonl", lambda kind: b"\xef\xbb\xbf" + lines(GOOD[kind], {**GOOD[kind], "prompt": None}),
                         (2, "prompt"), "is null"),
}

# command -> (record kind, argv builder(data path, output path, model))
COMMANDS = {
    "sft": ("sft", lambda d, o, m: ["sft", "--model", m, "--data", d, "--output", o]),
    "sft --eval-data": ("prompt", lambda d, o, m: ["sft", "--model", m, "--data", "GOOD:sft", "--output", o,
                                                   "--eval-data", d]),
    "train": ("preference", lambda d, o, m: ["train", "--model", m, "--data", d, "--output", o]),
    "generate": ("prompt", lambda d, o, m: ["generate", "--model", m, "--prompts", d, "--output", o + ".jsonl"]),
    "score": ("preference", lambda d, o, m: ["score", "--scorer", "verifier", "--verifier", "addition",
                                             "--data", d, "--output", o + ".jsonl"]),
    "dnpo": ("sft", lambda d, o, m: ["dnpo", "--model", m, "--data", d, "--output", o, "--task", "addition",
                                     "--dsl.scorer", "verifier", "--dsl.verifier", "addition"]),
    "dnpo --eval-data": ("prompt", lambda d, o, m: ["dnpo", "--model", m, "--data", "GOOD:sft", "--output", o,
                                                    "--eval-data", d, "--dsl.scorer", "verifier",
                                                    "--dsl.verifier", "addition"]),
    "spin": ("sft", lambda d, o, m: ["spin", "--model", m, "--data", d, "--output", o]),
    "ropo": ("preference", lambda d, o, m: ["ropo", "--model", m, "--data", d, "--output", o]),
    "ropo --eval-data": ("prompt", lambda d, o, m: ["ropo", "--model", m, "--data", "GOOD:preference",
                                                    "--output", o, "--eval-data", d, "--task", "addition"]),
    "data corrupt": ("preference", lambda d, o, m: ["data", "corrupt", d, o + ".jsonl"]),
}


def write_case(tmp_path: Path, case: str, kind: str) -> str:
    suffix, content, _, _ = CORPUS[case]
    path = tmp_path / f"bad{suffix}"
    if content is not None:
        path.write_bytes(content(kind))
    return str(path)


def goods(tmp_path: Path, argv: list[str]) -> list[str]:
    """Replace the `GOOD:kind` placeholders by a valid file of that kind."""
    out = []
    for arg in argv:
        if arg.startswith("GOOD:"):
            kind = arg.split(":", 1)[1]
            path = tmp_path / f"good-{kind}.jsonl"
            path.write_bytes(lines(*({**GOOD[kind], "prompt": f"{i}+1=", "id": i} for i in range(4))))
            arg = str(path)
        out.append(arg)
    return out


def error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"noisepo {command}: error: "), err
    return last


# Prompt files may mix standard and conversational prompts (each is rendered as given); training data may not.
DATA_CASES = [(command, case) for command in COMMANDS for case in CORPUS
              if not (case == "mixed formats" and COMMANDS[command][0] == "prompt")]


@pytest.mark.parametrize("command, case", DATA_CASES, ids=[f"{c}-{k}" for c, k in DATA_CASES])
def test_bad_data_exits_2_naming_file_line_field_before_any_work(command, case, tmp_path, capsys):
    kind, build = COMMANDS[command]
    data = write_case(tmp_path, case, kind)
    output = tmp_path / "out"
    argv = goods(tmp_path, build(data, str(output), "micro"))
    assert main(argv) == 2
    line = error_line(capsys, command.split(" --")[0])
    _, _, location, message = CORPUS[case]
    assert message in line and len(line) < 600, line  # one readable line, even for a 2 MB row
    if location is None:
        assert f"{data}: " in line
    else:
        number, field = location
        field = REQUIRED[kind] if field == "REQUIRED" else field
        where = f"{data}:{number}: " + (f"field '{field}': " if field else "")
        assert where in line, line
    # Nothing was started: no run folder, no output file, no preset model built.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")], list(tmp_path.iterdir())


@pytest.mark.parametrize("command, argv", [
    ("dnpo", ["dnpo", "--model", "micro", "--data", "GOOD:sft", "--output", "OUT", "--task", "addition"]),
    ("ropo", ["ropo", "--model", "micro", "--data", "GOOD:preference", "--output", "OUT"]),
    ("report", ["report", "--runs", "RUN", "--output", "OUT"]),
])
def test_a_real_process_prints_one_line_and_no_traceback(command, argv, tmp_path):
    run = tmp_path / "run"
    (run / "iter_0").mkdir(parents=True)
    (run / "manifest.json").write_text('{"config": {"dsl": {}, "npo": {}}')  # torn: no closing brace
    bad_flag = {"dnpo": ["--beta", "0"], "ropo": ["--rho", "1.0"], "report": []}[command]
    argv = [a.replace("OUT", str(tmp_path / "out")).replace("RUN", str(run)) for a in goods(tmp_path, argv)]
    done = subprocess.run([sys.executable, "-m", "noisepo", *argv, *bad_flag], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    expected = {"dnpo": "'beta': must be > 0", "ropo": "'rho': must be in (0, 1)",
                "report": f"{run / 'manifest.json'}: not valid JSON"}[command]
    assert line.startswith(f"noisepo {command}: error: ") and expected in line, line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- bad configs
CONFIG_COMMANDS = {
    "sft": ["sft", "--model", "micro", "--data", "GOOD:sft", "--output", "OUT"],
    "train": ["train", "--model", "micro", "--data", "GOOD:preference", "--output", "OUT"],
    "generate": ["generate", "--model", "micro", "--prompts", "GOOD:prompt", "--output", "OUT.jsonl"],
    "score": ["score", "--scorer", "verifier", "--verifier", "addition", "--data", "GOOD:preference",
              "--output", "OUT.jsonl"],
    "dnpo": ["dnpo", "--model", "micro", "--data", "GOOD:sft", "--output", "OUT"],
    "spin": ["spin", "--model", "micro", "--data", "GOOD:sft", "--output", "OUT"],
    "ropo": ["ropo", "--model", "micro", "--data", "GOOD:preference", "--output", "OUT"],
    "data corrupt": ["data", "corrupt", "GOOD:preference", "OUT.jsonl"],
    "data make": ["data", "make", "--output", "OUT"],
    "report": ["report", "--runs", "RUN", "--output", "OUT"],
}
# (commands, YAML text, key named, message part); "*" = every command
BAD_CONFIGS = [
    ("*", "not_an_option: 1\n", "not_an_option", "unknown"),
    ("*", "- a\n- list\n", None, "mapping"),
    ("*", "a: [unclosed\n", None, ""),
    (("sft", "train", "dnpo", "spin", "ropo"), "seed: many\n", "seed", "must be int"),
    (("train", "dnpo", "spin", "ropo"), "beta: 0\n", "beta", "must be > 0"),
    (("train", "dnpo", "spin", "ropo"), "beta: -0.1\n", "beta", "must be > 0"),
    (("train", "ropo"), "label_smoothing: 0.5\n", "label_smoothing", "must be in [0, 0.5)"),
    (("train", "ropo"), "label_smoothing: -0.01\n", "label_smoothing", "must be in [0, 0.5)"),
    (("ropo",), "rho: 1.0\n", "rho", "must be in (0, 1)"),
    (("ropo",), "rho: -0.2\n", "rho", "must be in (0, 1)"),
    (("ropo",), "alpha: 0\n", "alpha", "must be > 0"),
    (("dnpo", "spin", "ropo"), "training: {learning_rate: fast}\n", "training.learning_rate", "must be float"),
    (("dnpo", "spin", "ropo"), "training: {lerning_rate: 0.1}\n", "training.lerning_rate", "unknown"),
    (("dnpo",), "npo: {sigma0: 0}\n", "npo.sigma0", "must be > 0"),
    (("dnpo",), "npo: {sigma0: -0.5}\n", "npo.sigma0", "must be > 0"),
    (("dnpo",), "npo: {constraint: bound, sigma0: 1.0, sigma_max: 1.0}\n", "npo.sigma_max", "must be > sigma0"),
    (("dnpo",), "npo: {constraint: both, sigma0: 1.0}\n", "npo.sigma_max", "is required"),
    (("dnpo",), "npo: {noise_penalty: -0.1}\n", "npo.noise_penalty", "must be >= 0"),
    (("dnpo",), "npo: {schedule: alternating, head_steps: 0}\n", "npo.head_steps", "must be >= 1"),
    (("dnpo",), "npo: {constraint: box}\n", "npo.constraint", "penalty, bound, both"),
    (("dnpo",), "npo: {schedule: sometimes}\n", "npo.schedule", "joint, alternating"),
    (("dnpo",), "npo: {objective: eq11}\n", "npo.objective", "minmax, eq10"),
    (("dnpo",), "npo: {objective: eq10, schedule: alternating}\n", "npo.objective", "joint"),
    (("data corrupt",), "eta: 1.5\n", "eta", "must be in [0, 1]"),
    (("generate",), "temperature: -1\n", "temperature", ""),
    (("sft", "train"), "max_length: 4\n", "max_length", "must be >= 8"),
]
CONFIG_CASES = [(command, yaml, key, message) for commands, yaml, key, message in BAD_CONFIGS
                for command in (CONFIG_COMMANDS if commands == "*" else commands)]


@pytest.mark.parametrize("command, yaml_text, key, message", CONFIG_CASES,
                         ids=[f"{c}-{y.strip()[:24]}" for c, y, _, _ in CONFIG_CASES])
def test_bad_config_exits_2_naming_the_key(command, yaml_text, key, message, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text)
    run = tmp_path / "run"
    argv = [a.replace("OUT", str(tmp_path / "out")).replace("RUN", str(run))
            for a in goods(tmp_path, CONFIG_COMMANDS[command])]
    assert main([*argv, "--config", str(config)]) == 2
    line = error_line(capsys, command)
    assert message in line, line
    if key is not None:
        assert f"'{key}'" in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("argv", [["train", "--loss", "ropo", "--alpha", "2"], ["ropo", "--alpha", "1.5"]])
def test_alpha_at_most_2_warns_but_is_accepted(argv, caplog):
    from noisepo.cli import COMMANDS as TABLE
    from noisepo.cli import _load
    from noisepo.config import parse_config

    entry = TABLE[argv[0]]
    with caplog.at_level(logging.WARNING):
        config = parse_config(_load(entry.config), [*argv[1:], "--model", "m", "--data", "d", "--output", "o"])
    assert config.alpha <= 2
    assert any("'alpha'" in r.getMessage() and "alpha > 2 is recommended" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- accepted on purpose
@pytest.mark.parametrize("kind", list(GOOD))
def test_a_utf8_byte_order_mark_is_read_transparently(kind, tmp_path):
    from noisepo.data.loading import load_records

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + lines(GOOD[kind], GOOD[kind]))
    records = load_records(path, kind).records
    assert len(records) == 2 and records[0]["prompt"] == "1+1="  # the first key is not '\ufeffprompt'


def test_bom_and_a_very_long_line_through_a_command(tmp_path, capsys):
    rows = [{**GOOD["preference"], "id": 0, "note": "y" * LONG}, {**GOOD["preference"], "id": 1}]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + lines(*rows))
    out = tmp_path / "corrupted.jsonl"
    assert main(["data", "corrupt", str(path), str(out), "--eta", "0"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in written] == [0, 1] and len(written[0]["note"]) == LONG


def test_a_prompt_longer_than_max_length_is_cut_from_the_left_and_training_runs(micro_model_dir, tmp_path):
    from noisepo.data.chat import encode_example
    from noisepo.models import load_tokenizer

    tokenizer = load_tokenizer(micro_model_dir)
    long_prompt = "1+" * 500 + "1="
    prompt_ids, response_ids = encode_example(tokenizer, long_prompt, "2" * 40, max_length=32)
    assert len(prompt_ids) + len(response_ids) == 32 and len(response_ids) >= 16  # room for the response
    assert tokenizer.decode(prompt_ids).endswith("1+1=")  # the end of the prompt, nearest the reply, is kept

    pairs = tmp_path / "long.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": long_prompt, "chosen": str(i), "rejected": "x" * (i + 1)}) + "\n"
                             for i in range(4)))
    out = tmp_path / "run"
    assert main(["train", "--model", micro_model_dir, "--data", str(pairs), "--output", str(out), "--max-length", "32",
                 "--max-steps", "1", "--batch-size", "4", "--report-to", "none", "--save-steps", "100"]) == 0
    assert (out / "model" / "model.safetensors").exists()


def test_a_bad_eval_file_stops_a_loop_before_any_stage_and_keeps_a_finished_run(micro_model_dir, tmp_path, capsys):
    """Resuming a run with a broken --eval-data fails at once and leaves every artifact as it was."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "x" * (1 + i % 3),
                                        "id": i}) + "\n" for i in range(8)))
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps({"prompt": f"{i}+2=", "answer": str(i + 2)}) + "\n" for i in range(3)))
    out = tmp_path / "run"
    argv = ["ropo", "--model", micro_model_dir, "--data", str(data), "--output", str(out), "--eval-data", str(evals),
            "--rounds", "1", "--no-progress", "--samples", "2", "--max-new-tokens", "2", "--eval-max-new-tokens", "2",
            "--training.max-steps", "1", "--training.report-to", "none", "--training.max-length", "32"]
    assert main(argv) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    evals.write_text(evals.read_text() + '{"prompt": null, "answer": "1"}\n')
    assert main(argv) == 2
    assert f"{evals}:4: field 'prompt': is null" in error_line(capsys, "ropo")
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
