"""Batched generation with a transformers causal LM (`model.generate`, KV cache, left padding).

How it stays fast: prompts are sorted by token length and grouped into batches of similar length,
so little compute goes to padding; each batch is one `model.generate` call with the KV cache.

How it stays deterministic: sampling does not use the global RNG. A logits processor draws each
row's next token with that row's own `torch.Generator`, seeded from (params.seed, prompt text,
sample index) (`base.sample_seed`), and leaves only that token finite, so `generate` then picks it
greedily. A response is therefore a function of its prompt, the seed and the model only: it does
not depend on batch size, batch order or the other prompts of the call, which is what lets
`noisepo generate` resume after a kill and still write what an uninterrupted run would have.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from noisepo.generation.base import GenerationParams, cut_at_stop, decode_response, encode_prompt, sample_seed

log = logging.getLogger(__name__)


class PerRowSampler(LogitsProcessor):
    """Temperature + top-p sampling with one `torch.Generator` per row.

    Returns scores that are 0 at the sampled token and -inf elsewhere, so greedy decoding picks it.
    """

    def __init__(self, seeds: list[int], *, temperature: float, top_p: float, device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() / self.temperature  # (rows, V)
        if self.top_p < 1.0:
            logits = _top_p_filter(logits, self.top_p)
        probs = torch.softmax(logits, dim=-1)
        tokens = torch.stack([torch.multinomial(probs[i], 1, generator=g)
                              for i, g in enumerate(self.generators)])  # (rows, 1)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(1, tokens, 0.0)


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering as transformers' TopPLogitsWarper: keep the smallest set of most likely
    tokens whose probability reaches `top_p` (at least one token)."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


@contextlib.contextmanager
def left_padding(tokenizer):
    """Pad on the left while generating (decoder-only models continue from the last position);
    restore the tokenizer's own side afterwards, since training pads on the right."""
    saved = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = saved


class TransformersGenerator:
    """`Generator` over a transformers causal LM and its tokenizer.

    `batch_size` counts sequences per `model.generate` call: with `num_samples = n > 1` sampling,
    a batch holds `batch_size // n` prompts (at least one), each repeated `n` times.
    `shard`: `generate` is a collective over the processes (`noisepo.distributed`): each generates
    every W-th batch and every rank returns all responses (the same as one process would).
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 32, progress: bool = True, shard: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.shard = shard
        self.eos_ids = _eos_ids(model, tokenizer)

    def generate(self, prompt_texts: list[str], params: GenerationParams) -> list[list[str]]:
        from tqdm.auto import tqdm

        from noisepo import distributed

        if not prompt_texts:
            return []
        prompt_ids = self._fit([encode_prompt(self.tokenizer, t) for t in prompt_texts], params)
        # Greedy samples are all the same: decode once and copy.
        copies = 1 if params.greedy else params.num_samples
        per_batch = max(1, self.batch_size // copies)
        # Longest first: similar lengths share a batch (less padding), and memory errors show early.
        order = sorted(range(len(prompt_texts)), key=lambda i: -len(prompt_ids[i]))
        batches = [order[start:start + per_batch] for start in range(0, len(order), per_batch)]
        if self.shard:
            batches = distributed.shard(batches)
        results: dict[int, list[str]] = {}
        bar = tqdm(total=sum(map(len, batches)), desc="generate", unit="prompt", disable=not self.progress)
        was_training = self.model.training
        self.model.eval()
        try:
            with left_padding(self.tokenizer), torch.inference_mode():
                for batch in batches:
                    texts = self._generate_batch([prompt_ids[i] for i in batch],
                                                 [prompt_texts[i] for i in batch], params, copies)
                    for k, i in enumerate(batch):
                        samples = texts[k * copies:(k + 1) * copies]
                        results[i] = samples * params.num_samples if copies == 1 else samples
                    bar.update(len(batch))
        finally:
            bar.close()
            self.model.train(was_training)
        if self.shard:
            results = distributed.gather_indexed(results)
        return [results[i] for i in range(len(prompt_texts))]

    # ------------------------------------------------------------------ one batch
    def _generate_batch(self, ids: list[list[int]], texts: list[str], params: GenerationParams,
                        copies: int) -> list[str]:
        """Responses for `ids` (prompt-major: prompt 0's samples, then prompt 1's, ...)."""
        rows = [row for row in ids for _ in range(copies)]
        padded = self.tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
        device = self.model.device
        input_ids = padded["input_ids"].to(device)
        attention_mask = padded["attention_mask"].to(device)
        processors = LogitsProcessorList()
        if not params.greedy:
            seeds = [sample_seed(params.seed, text, s) for text in texts for s in range(copies)]
            processors.append(PerRowSampler(seeds, temperature=params.temperature, top_p=params.top_p,
                                            device=device))
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            logits_processor=processors,
            max_new_tokens=params.max_new_tokens,
            do_sample=False,  # sampling, when asked for, happens in PerRowSampler
            num_beams=1,
            temperature=None, top_p=None, top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos_ids or None,
            stop_strings=params.stop or None,
            tokenizer=self.tokenizer if params.stop else None,
        )
        new_tokens = output[:, input_ids.shape[1]:].tolist()
        return [cut_at_stop(self._decode(row), params.stop) for row in new_tokens]

    def _fit(self, prompt_ids: list[list[int]], params: GenerationParams) -> list[list[int]]:
        """Cut prompts from the left so prompt + new tokens fit the model's positions (the end of a
        prompt is nearest the reply, as in training's truncation)."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if not limit:
            return prompt_ids
        room = max(1, limit - params.max_new_tokens)
        too_long = sum(len(ids) > room for ids in prompt_ids)
        if too_long:
            log.warning("%d prompt(s) longer than %d tokens were cut from the left to fit the model's "
                        "%d positions", too_long, room, limit)
        return [ids[-room:] for ids in prompt_ids]

    def _decode(self, tokens: list[int]) -> str:
        """Text of the generated tokens up to (not including) the first EOS; padding dropped."""
        return decode_response(self.tokenizer, tokens, self.eos_ids)


def _eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a response: the model's generation config may list several."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [i for i in ids if i is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids

