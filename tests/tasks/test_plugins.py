"""Tasks and verifiers by name or import path; `noisepo data make`."""
from __future__ import annotations

import json
import textwrap

import pytest

from noisepo.cli import main
from noisepo.errors import ConfigError
from noisepo.tasks import load_task, load_verifier
from noisepo.tasks.addition import AdditionTask

PLUGIN = textwrap.dedent('''
    class EchoTask:
        name = "echo"

        def __init__(self, word="hi"):
            self.word = word

        def prompts(self, n, *, seed=0, split="train"):
            return [{"id": f"{split}-{i}", "prompt": f"say {self.word} {i}:", "answer": self.word}
                    for i in range(n)]

        def score(self, prompt, response):
            return float(response.strip() == self.word)

        def sft_data(self, n, *, seed=0, error_rate=0.0, error_kind="random"):
            return [{**p, "completion": p["answer"], "human_correct": True} for p in self.prompts(n)]

    def make_task():
        return EchoTask("yo")

    INSTANCE = EchoTask("hey")

    def score(prompt, response):
        return 1.0 if "ok" in response else 0.0

    NOT_A_TASK = 3
''')


@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    (tmp_path / "my_echo_task.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_echo_task"


def test_builtin_by_name():
    assert isinstance(load_task("addition"), AdditionTask)
    assert load_task("addition", digits=3).digits == 3


@pytest.mark.parametrize("attribute, word", [("EchoTask", "hi"), ("make_task", "yo"), ("INSTANCE", "hey")])
def test_task_by_import_path(plugin, attribute, word):
    task = load_task(f"{plugin}:{attribute}")
    assert task.name == "echo" and task.score("p", f" {word} ") == 1.0


def test_task_options_reach_the_class(plugin):
    assert load_task(f"{plugin}:EchoTask", word="ho").word == "ho"


def test_verifier_by_import_path(plugin):
    assert load_verifier(f"{plugin}:score")("p", "ok!") == 1.0
    assert load_verifier(f"{plugin}:INSTANCE")("p", "hey") == 1.0
    assert load_verifier("addition")("1+2=", "3") == 1.0


@pytest.mark.parametrize("spec, fragment", [
    ("no_such_module_xyz:Task", "no module named 'no_such_module_xyz'"),
    ("no_such_pkg_xyz.mod:Task", "no module named 'no_such_pkg_xyz'"),
    ("noisepo.tasks.addition:Nope", "has no attribute 'Nope'"),
    ("subtraction", "unknown task 'subtraction'"),
])
def test_bad_import_path_is_a_config_error_naming_it(spec, fragment):
    with pytest.raises(ConfigError) as info:
        load_task(spec)
    assert fragment in str(info.value) and info.value.key == "task"


def test_object_without_task_methods_is_rejected(plugin):
    with pytest.raises(ConfigError, match="is not a task"):
        load_task(f"{plugin}:NOT_A_TASK")
    with pytest.raises(ConfigError, match="not callable"):
        load_verifier(f"{plugin}:NOT_A_TASK")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_data_make_cli(tmp_path, capsys):
    out = tmp_path / "data"
    status = main(["data", "make", "--output", str(out), "--n-train", "200", "--n-val", "20",
                   "--n-test", "30", "--error-rate", "0.25", "--error-kind", "systematic", "--seed", "4"])
    assert status == 0
    sft, prompts = read_jsonl(out / "sft.jsonl"), read_jsonl(out / "prompts.jsonl")
    val, test = read_jsonl(out / "val.jsonl"), read_jsonl(out / "test.jsonl")
    assert (len(sft), len(prompts), len(val), len(test)) == (200, 200, 20, 30)
    assert sum(not r["human_correct"] for r in sft) == 50
    assert [p["prompt"] for p in prompts] == [r["prompt"] for r in sft]
    assert set(prompts[0]) == {"id", "prompt", "answer"} and set(test[0]) == {"id", "prompt", "answer", "subset"}
    prompt_sets = [{r["prompt"] for r in rows} for rows in (sft, val, test)]
    assert not (prompt_sets[0] & prompt_sets[1] or prompt_sets[0] & prompt_sets[2] or prompt_sets[1] & prompt_sets[2])
    assert "50 with a wrong human answer" in capsys.readouterr().out
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_data_make_with_a_plugin_task(plugin, tmp_path):
    out = tmp_path / "d"
    assert main(["data", "make", "--task", f"{plugin}:EchoTask", "--output", str(out), "--n-train", "3",
                 "--n-val", "1", "--n-test", "2"]) == 0
    assert read_jsonl(out / "sft.jsonl")[0]["completion"] == "hi"


def test_data_make_too_many_test_prompts_names_the_option(tmp_path, capsys):
    status = main(["data", "make", "--output", str(tmp_path / "d"), "--n-test", "5000"])
    assert status == 2
    assert "'n_test'" in capsys.readouterr().err


def test_installed_script_imports_a_task_from_the_current_folder(tmp_path):
    """The `noisepo` console script does not put the working folder on sys.path by itself
    (PYTHONSAFEPATH=1 gives `python -c` the same sys.path); `--task mymod:Task` must still work."""
    import os
    import subprocess
    import sys

    (tmp_path / "cwdtask_mod.py").write_text(
        "def score(prompt, response):\n    return 1.0 if response.strip() == 'ok' else 0.0\n")
    code = "from noisepo.tasks import load_verifier; print(load_verifier('cwdtask_mod:score')('p', 'ok'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1.0"
