"""Every command on every architecture a user may bring (issue 22, item 1), through the real CLI.

Micro random-init models (`micro_archs.ARCHS`: Llama, GPT-2, Qwen2, Mistral, Gemma, Phi-3, a tied-head
Qwen2, Gemma-2 with logit soft-capping), each with a byte-level BPE tokenizer trained in the test and a
ChatML template (GPT-2: none); standard and conversational (TRL message-list) data in every command
that takes data. Each run is one optimizer step / a few new tokens; what is checked is that the
command exits 0, writes what it says, and that its model loads in plain transformers with the
tokenizer it was trained with.

The fast suite keeps two architectures (FAST: Qwen2, the ChatML + BPE case, and GPT-2, the one without
a chat template) and the cheap checks of every architecture; the rest is `slow`
(`pytest -m slow tests/architectures`).
"""
from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import pytest
import torch

from architectures.micro_archs import ARCHS, CHATML, QUESTIONS
from noisepo.cli import main

FAST = ("qwen2", "gpt2")
KINDS = ("standard", "conversational")
LOSSES = ("dpo", "cdpo", "rdpo", "ipo", "hinge", "ropo")
TRAIN = ["--max-steps", "1", "--batch-size", "4", "--max-length", "48", "--report-to", "none",
         "--save-steps", "1000", "--warmup-ratio", "0", "--learning-rate", "1e-3"]
LOOP = ["--no-progress", "--training.max-steps", "1", "--training.batch-size", "4", "--training.max-length", "48",
        "--training.report-to", "none", "--training.warmup-ratio", "0", "--training.learning-rate", "1e-3"]
PROBE = "<|im_start|>user\nWhat is 12+30?<|im_end|>\n<|im_start|>assistant\nThe answer is 42.<|im_end|>"


def archs(fast=FAST):
    """Every architecture, those outside `fast` marked slow."""
    return [pytest.param(a, id=a, marks=() if a in fast else pytest.mark.slow) for a in ARCHS]


def cli(*argv: str) -> None:
    status = main(list(argv))
    assert status in (0, None), f"noisepo {argv[0]} exited {status}"


def raw_ids(folder, text: str = PROBE) -> list[int]:
    """The ids of `text` by the folder's tokenizer.json read with `tokenizers` alone (what was saved)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def assert_plain_load(folder, arch: str, original) -> None:
    """`folder` loads in plain transformers as `arch`, with the original tokenizer's ids and a forward
    that gives finite logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == json.loads((Path(original) / "config.json").read_text())["model_type"]
    assert raw_ids(folder) == raw_ids(original), "the saved tokenizer is not the one the model was trained with"
    assert tokenizer.eos_token == ("<|endoftext|>" if arch == "gpt2" else "<|im_end|>")
    assert (tokenizer.chat_template == CHATML) == (arch != "gpt2")
    ids = torch.tensor([raw_ids(folder)])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def load_checked(folder):
    """The model in float32; Gemma-2's soft-cap lowered from 30 to 0.5, as a random model's logits are
    far below 30 (the cap would be near the identity and a path that skipped it would pass)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if getattr(model.config, "final_logit_softcapping", None):
        model.config.final_logit_softcapping = 0.5
    return model


# --------------------------------------------------------------------------- cheap checks, every architecture
@pytest.mark.parametrize("arch", list(ARCHS))
def test_noisepo_loads_the_saved_tokenizer_unchanged(arch, model_dir, capsys):
    """The tokenizer noisepo loads encodes as the saved tokenizer.json: transformers 5 swaps in its own
    class for some model types (Qwen2, Phi-3: `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`), whose
    pre-tokenizer differs from a user's BPE (Qwen2's splits digits), so the ids silently changed.
    noisepo says when it keeps tokenizer.json over transformers' choice, and only then."""
    from transformers import AutoTokenizer

    from noisepo.models import load_tokenizer

    folder = model_dir(arch)
    capsys.readouterr()
    tokenizer = load_tokenizer(folder)
    for text in (PROBE, " ".join(q for q, _ in QUESTIONS)):
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == raw_ids(folder, text)
    swapped = AutoTokenizer.from_pretrained(folder)(PROBE, add_special_tokens=False)["input_ids"] != raw_ids(folder)
    assert ("using tokenizer.json as saved" in capsys.readouterr().err) == swapped
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(
        "<|endoftext|>" if arch == "gpt2" else "<|im_end|>")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_response_logps_equal_the_models_own_logits(arch, model_dir):
    """`model_sequence_logps` (the hidden-state path, or the full logits for soft-capped heads) equals
    log_softmax of the model's logits, on a padded batch; gradients reach the weights."""
    from noisepo.logprobs import model_sequence_logps

    model = load_checked(model_dir(arch))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    result = model_sequence_logps(model, inputs)
    logps = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)[:, :-1]
    target = labels[:, 1:]
    expected = (logps.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * (target != -100)).sum(-1)
    torch.testing.assert_close(result.sum, expected, rtol=1e-4, atol=1e-4)
    result.sum.sum().backward()
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cache_states", [True, False], ids=["cached-states", "reference-forward"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_npo_reference_without_noise_is_the_models_own(arch, cache_states, model_dir, tmp_path):
    """NPO's rejected side with σ → 0 equals the precomputed clean reference (the model's own log-probs,
    checked above): its LM-head path sees what the model's head does (Gemma-2: the soft-cap too)."""
    from transformers import TrainingArguments

    from noisepo.models import load_tokenizer
    from noisepo.training.collate import encode_pair
    from noisepo.training.npo import NPOTrainer

    tokenizer = load_tokenizer(model_dir(arch))
    pairs = [encode_pair(tokenizer, {"prompt": q, "chosen": f"The answer is {a}.", "rejected": f"maybe {a}9"},
                         max_length=48) for q, a in QUESTIONS[:4]]
    model = load_checked(model_dir(arch))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none",
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = NPOTrainer(model, args, pairs, sigma0=1e-7, cache_reference_states=cache_states,
                         group_by_length=False, processing_class=tokenizer)
    batch = trainer.data_collator(list(trainer.train_dataset))
    trainer.model.train()
    noisy = trainer.noisy_reference_logps(batch)
    expected = torch.tensor([p["reference_rejected_logps"] for p in trainer.train_dataset])
    torch.testing.assert_close(noisy.rejected.detach(), expected, rtol=1e-4, atol=1e-4)


def test_a_vocabulary_far_larger_than_the_tokenizer_is_said_once(tmp_path, capsys):
    """The Gemma cliff (issue 22): GemmaConfig's default vocab_size (256 000) kept for a 400-token BPE makes
    every step's softmax 600× wider than needed. noisepo says so, once per model folder; not for a model
    whose vocabulary fits its tokenizer."""
    from architectures.micro_archs import build_model
    from noisepo.models import load_tokenizer

    wide = build_model("gemma", tmp_path / "wide", vocab_size=4096)
    fitting = build_model("gemma", tmp_path / "fitting")
    capsys.readouterr()
    tokenizer = load_tokenizer(str(wide))
    load_tokenizer(str(wide))
    load_tokenizer(str(fitting))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"noisepo: the model in {wide} has 4096 vocabulary rows for {len(tokenizer)} tokenizer tokens; "
                   "each step's softmax still runs over all 4096 (its time grows with them): build the model "
                   "with vocab_size=len(tokenizer)"]


# --------------------------------------------------------------------------- commands
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", archs())
def test_sft(arch, kind, model_dir, data, tmp_path):
    output = tmp_path / "sft"
    cli("sft", "--model", model_dir(arch), "--data", data[f"{kind}_sft"], "--output", str(output), *TRAIN)
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 1 and metrics["train"]["final_loss"] > 0
    assert_plain_load(output / "model", arch, model_dir(arch))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("arch", archs(fast=("qwen2",)))
def test_train_every_loss(arch, loss, model_dir, data, tmp_path):
    """Each loss once per architecture, the data kind alternating (both kinds for every architecture)."""
    kind = KINDS[LOSSES.index(loss) % 2]
    output = tmp_path / "train"
    cli("train", "--model", model_dir(arch), "--data", data[f"{kind}_pairs"], "--output", str(output),
        "--loss", loss, "--logging-steps", "1", *TRAIN)
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["global_step"] == 1 and metrics["pairs"] == len(QUESTIONS)
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("rewards/margins", "logps/chosen", "train_loss"))
    assert_plain_load(output / "model", arch, model_dir(arch))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", archs(fast=("gpt2",)))
def test_train_with_lora(arch, kind, model_dir, data, tmp_path):
    """PEFT LoRA: the adapters move, OUTPUT/model is the merged plain model, OUTPUT/adapter the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output = tmp_path / "lora"
    cli("train", "--model", model_dir(arch), "--data", data[f"{kind}_pairs"], "--output", str(output),
        "--lora", "--lora-r", "4", "--reference", "model", *TRAIN, "--learning-rate", "0.05")
    assert_plain_load(output / "model", arch, model_dir(arch))
    base = AutoModelForCausalLM.from_pretrained(model_dir(arch))
    merged = AutoModelForCausalLM.from_pretrained(output / "model").state_dict()
    assert any(not torch.equal(w, merged[k]) for k, w in base.state_dict().items() if k in merged)
    adapted = PeftModel.from_pretrained(base, output / "adapter")
    assert adapted.peft_config["default"].r == 4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", archs())
def test_generate(arch, kind, model_dir, data, tmp_path):
    from noisepo.data.chat import render_prompt
    from noisepo.models import load_tokenizer

    output = tmp_path / "out.jsonl"
    cli("generate", "--model", model_dir(arch), "--prompts", data[f"{kind}_prompts"], "--output", str(output),
        "--max-new-tokens", "4", "--no-progress", "--device", "cpu", "--backend", "transformers")
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["prompt_index"] for r in rows] == [0, 1, 2] and all(isinstance(r["response"], str) for r in rows)
    assert all("<|im_end|>" not in r["response"] and "<|pad|>" not in r["response"] for r in rows)
    if kind == "conversational":
        text = render_prompt(load_tokenizer(model_dir(arch)), rows[0]["prompt"])
        assert text.startswith("<|user|>\n" if arch == "gpt2" else "<|im_start|>user\n")


def test_a_model_without_chat_template_gets_the_plain_template_and_a_note(model_dir, caplog, monkeypatch):
    """GPT-2 has no chat template: message lists use the documented plain template, said once."""
    from noisepo.data import chat
    from noisepo.data.chat import render_plain, render_prompt
    from noisepo.models import load_tokenizer

    monkeypatch.setattr(chat, "_NOTED", set())  # as in a fresh process

    tokenizer = load_tokenizer(model_dir("gpt2"))
    messages = [{"role": "user", "content": "What is 1+2?"}]
    with caplog.at_level("WARNING", logger="noisepo.data.chat"):
        assert render_prompt(tokenizer, messages) == render_plain(messages) == "<|user|>\nWhat is 1+2?\n<|assistant|>\n"
        render_prompt(tokenizer, messages)
        assert render_prompt(tokenizer, "raw text") == "raw text"  # strings are used raw: no note
    notes = [r.getMessage() for r in caplog.records if "chat template" in r.getMessage()]
    assert len(notes) == 1 and "plain template" in notes[0] and "\n" not in notes[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="noisepo.data.chat"):
        render_prompt(load_tokenizer(model_dir("qwen2")), messages)  # a template: no note
    assert not caplog.records


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", archs())
def test_score_with_the_local_lm_scorer(arch, kind, model_dir, data, tmp_path, capsys):
    """A random model's replies are rarely a number 1..100: every row is written, each score a number in
    range or None (counted), and exit 1 only when all failed."""
    output = tmp_path / "scored.jsonl"
    status = main(["score", "--scorer", "local-lm", "--model", model_dir(arch), "--data", data[f"{kind}_pairs"],
                   "--output", str(output), "--device", "cpu", "--max-new-tokens", "3", "--no-cache"])
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    scores = [r[k] for r in rows for k in ("chosen_score", "rejected_score")]
    assert len(rows) == len(QUESTIONS) and all(s is None or 1 <= s <= 100 for s in scores)
    failed = sum(s is None for s in scores)
    assert f"scored {len(rows)} pairs ({len(scores)} responses): {failed} failed" in capsys.readouterr().out
    assert status == (1 if failed == len(scores) else 0)


@pytest.mark.parametrize("arch", archs())
def test_serve(arch, model_dir, monkeypatch):
    """`noisepo serve` through the CLI in a thread (port 0; the test stops uvicorn): /v1/models and a
    chat completion whose prompt is the architecture's template."""
    import socket

    import uvicorn

    from noisepo.data.chat import render_prompt
    from noisepo.models import load_tokenizer

    listening, servers = threading.Event(), []
    create_server = socket.create_server

    def recording_socket(*args, **kwargs):
        sock = create_server(*args, **kwargs)
        servers.append(sock)
        listening.set()  # bound and listening: requests queue until uvicorn accepts them
        return sock

    class Server(uvicorn.Server):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            servers.append(self)

    monkeypatch.setattr(socket, "create_server", recording_socket)
    monkeypatch.setattr(uvicorn, "Server", Server)
    thread = threading.Thread(target=main, args=(["serve", "--model", model_dir(arch), "--port", "0",
                                                  "--device", "cpu", "--served-model-name", arch],), daemon=True)
    thread.start()
    try:
        assert listening.wait(timeout=120), "serve never listened"
        url = f"http://127.0.0.1:{servers[0].getsockname()[1]}/v1"
        with urllib.request.urlopen(url + "/models", timeout=60) as reply:
            assert json.loads(reply.read())["data"][0]["id"] == arch
        messages = [{"role": "user", "content": "What is 1+2?"}]
        body = json.dumps({"model": arch, "messages": messages, "max_tokens": 3, "temperature": 0}).encode()
        request = urllib.request.Request(url + "/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            completion = json.loads(reply.read())
    finally:
        for server in servers[1:]:
            server.should_exit = True
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert isinstance(completion["choices"][0]["message"]["content"], str)
    assert completion["choices"][0]["finish_reason"] in ("length", "stop")
    tokenizer = load_tokenizer(model_dir(arch))
    prompt = render_prompt(tokenizer, messages)  # ChatML, or GPT-2's plain template
    assert completion["usage"]["prompt_tokens"] == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", archs(fast=("qwen2",)))
def test_spin(arch, kind, model_dir, data, tmp_path):
    output = tmp_path / "spin"
    cli("spin", "--model", model_dir(arch), "--data", data[f"{kind}_sft"], "--output", str(output),
        "--iterations", "1", "--generation.max-new-tokens", "4", *LOOP)
    summary = json.loads((output / "summary.json").read_text())
    assert len(summary["iterations"]) == 1
    assert_plain_load(output / "iter_0" / "model", arch, model_dir(arch))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", archs(fast=("gpt2",)))
def test_dnpo_with_npo(arch, kind, model_dir, data, verifier, tmp_path):
    """Iteration 0 (SPIN), then iteration 1 with DSL (a verifier) and NPO's noise head."""
    output = tmp_path / "dnpo"
    cli("dnpo", "--model", model_dir(arch), "--data", data[f"{kind}_sft"], "--output", str(output),
        "--iterations", "2", "--generation.max-new-tokens", "4", "--npo.enabled", "--dsl.enabled",
        "--dsl.scorer", "verifier", "--dsl.verifier", verifier, *LOOP)
    metrics = json.loads((output / "iter_1" / "metrics.json").read_text())
    assert metrics["npo"] and metrics["dsl"] and metrics["sigma_mean"] > 0
    final = output / "iter_1" / "model"
    assert not any("noise" in p.name for p in final.iterdir())  # the noise head is never saved with the policy
    assert_plain_load(final, arch, model_dir(arch))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", archs(fast=("qwen2",)))
def test_ropo(arch, kind, model_dir, data, tmp_path):
    """One round: train with ℓ_ropo, score, filter, refill the discarded prompts by rejection sampling."""
    output = tmp_path / "ropo"
    cli("ropo", "--model", model_dir(arch), "--data", data[f"{kind}_pairs"], "--output", str(output),
        "--rounds", "1", "--rho", "0.25", "--samples", "2", "--max-new-tokens", "4",
        "--no-filter-misranked-only", "--refill-rule", "best-worst", *LOOP)  # the paper's filter: exactly ρN
    summary = json.loads((output / "summary.json").read_text())
    assert summary["rounds"][0]["kept"] == len(QUESTIONS) - 2
    assert_plain_load(output / "round_0" / "model", arch, model_dir(arch))
