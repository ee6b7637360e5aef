"""Micro random-init models of several architectures, with a byte-level BPE tokenizer, built offline.

What a new user brings (issue 22): a Hugging Face causal LM of some architecture and a BPE tokenizer
trained with `tokenizers`, saved together with `save_pretrained`. `ARCHS` maps a name to the
transformers config class and the arguments that make it micro (hidden 64, 2 layers, 4 heads,
head_dim 16); everything else is the config's default. All but GPT-2 get a ChatML chat template
(GPT-2 has none, so noisepo's documented plain template is used for message lists).

Shared by the architecture test matrix (tests/architectures/) and benchmarks/bench_architectures.py,
which builds the same architectures wider (`build_model(..., **overrides)`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

# ChatML, as Qwen2's and many fine-tunes' templates: the reply ends with <|im_end|>, the tokenizer's EOS.
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IM_START, IM_END, ENDOFTEXT, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>"

MICRO = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=256)

# name -> (config class name, micro arguments, chat template?)
ARCHS: dict[str, tuple[str, dict, bool]] = {
    "llama": ("LlamaConfig", {**MICRO, "tie_word_embeddings": False}, True),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128, "n_positions": 256}, False),
    "qwen2": ("Qwen2Config", {**MICRO, "tie_word_embeddings": False}, True),
    "mistral": ("MistralConfig", {**MICRO, "tie_word_embeddings": False}, True),
    # Gemma's defaults kept where a user would keep them (gelu_pytorch_tanh, tied head, sqrt(d)-scaled
    # embeddings); head_dim set, as its default (256) is Gemma-7B's.
    "gemma": ("GemmaConfig", {**MICRO, "head_dim": 16, "num_key_value_heads": 1}, True),
    "phi3": ("Phi3Config", {**MICRO, "tie_word_embeddings": False}, True),
    # A tied LM head on a model that usually has none (Qwen2.5-0.5B ties its embeddings).
    "qwen2-tied": ("Qwen2Config", {**MICRO, "tie_word_embeddings": True}, True),
    # Logit soft-capping (final 30, attention 50): its logits are not hidden @ W.T.
    "gemma2": ("Gemma2Config", {**MICRO, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64}, True),
}

# Short texts for the tests' data: pairs, SFT examples and prompts of a few tokens each.
QUESTIONS = [(f"What is {a}+{b}?", str(a + b)) for a, b in [(1, 2), (12, 30), (7, 5), (40, 2), (3, 3), (9, 0),
                                                             (21, 21), (5, 8)]]

CORPUS = (
    "The quick brown fox jumps over the lazy dog. 0123456789 + - = ? ! , .\n"
    "What is 12+30? The answer is 42. Reverse the words: hello world -> world hello.\n"
    "user assistant system aaaa bbbb abab Q: A: yes no maybe\n"
)


def build_bpe_tokenizer(texts: Iterable[str] = (), *, vocab_size: int = 400, chat_template: bool = True,
                        model_max_length: int = 256):
    """A byte-level BPE trained on CORPUS + `texts` with `tokenizers`, as PreTrainedTokenizerFast.

    Special tokens: <|endoftext|>, <|im_start|>, <|im_end|>, <|pad|>. With a chat template (ChatML)
    EOS is <|im_end|> (the end of a reply, as in Qwen2-Instruct); without, <|endoftext|> (GPT-2).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT, IM_START, IM_END, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator([CORPUS, *texts], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=IM_END if chat_template else ENDOFTEXT, pad_token=PAD,
        bos_token=ENDOFTEXT, model_max_length=model_max_length,
        additional_special_tokens=[IM_START, IM_END] if chat_template else None)
    if chat_template:
        tokenizer.chat_template = CHATML
    return tokenizer


def arch_config(arch: str, tokenizer, **overrides):
    """The transformers config of `arch` (micro, or with `overrides`), its special ids the tokenizer's."""
    import transformers

    class_name, micro, _ = ARCHS[arch]
    values = {**micro, **overrides}
    if class_name == "GPT2Config":  # GPT-2's own names
        rename = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                  "intermediate_size": "n_inner", "max_position_embeddings": "n_positions"}
        values = {rename.get(k, k): v for k, v in values.items() if k not in ("num_key_value_heads", "head_dim")}
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    return getattr(transformers, class_name)(**{**ids, **values})


def build_model(arch: str, output_dir, *, texts: Iterable[str] = (), seed: int = 0, bpe_vocab_size: int = 400,
                **overrides) -> Path:
    """Build `arch` with a fresh BPE tokenizer, random-init under `seed`, float32, saved in `output_dir`.

    `overrides` go to the config (a `vocab_size` larger than the tokenizer's leaves rows unused, as
    a user keeping GemmaConfig's 256 000 would)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_bpe_tokenizer(texts, vocab_size=bpe_vocab_size, chat_template=ARCHS[arch][2])
    config = arch_config(arch, tokenizer, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir
