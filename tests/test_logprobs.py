"""Sequence log-probs: chunked hidden-state path == naive log_softmax, values and gradients."""
from __future__ import annotations

import pytest
import torch

from noisepo.logprobs import (
    IGNORE_INDEX,
    model_sequence_logps,
    response_states,
    sequence_logps,
    sequence_logps_from_hidden,
)


def naive(logits: torch.Tensor, labels: torch.Tensor):
    """log_softmax over the whole (B, T, V) float32 logits: the reference we must equal."""
    logps = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    token = logps.gather(2, targets.clamp(min=0)[..., None]).squeeze(2) * mask
    return token.sum(1), mask.sum(1)


def random_case(seed=0, dtype=torch.float64, B=3, T=9, d=6, V=13):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=generator, dtype=dtype)
    weight = torch.randn(V, d, generator=generator, dtype=dtype)
    labels = torch.randint(0, V, (B, T), generator=generator)
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[1, 6:] = IGNORE_INDEX  # padding of a shorter sequence
    labels[B - 1, :] = IGNORE_INDEX  # a sequence without response tokens
    return hidden, weight, labels


def capped(logits, softcap):
    """Gemma-2's final soft-capping as transformers writes it."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_hidden_path_equals_naive_values_and_gradients(chunk_size, softcap):
    """softcap 1.5 with logits of size ~3: tanh far from linear, so a missing cap or cap' shows."""
    hidden, weight, labels = random_case()
    bias = torch.randn(weight.shape[0], dtype=weight.dtype)
    ours_inputs = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    naive_inputs = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]

    ours = sequence_logps_from_hidden(ours_inputs[0], ours_inputs[1], labels, bias=ours_inputs[2],
                                      chunk_size=chunk_size, softcap=softcap)
    expected_sum, expected_count = naive(capped(naive_inputs[0] @ naive_inputs[1].T + naive_inputs[2], softcap),
                                         labels)
    assert torch.allclose(ours.sum, expected_sum) and torch.equal(ours.count, expected_count)
    assert ours.count.tolist() == [6, 3, 0] and ours.sum[2] == 0 and ours.mean[2] == 0

    grad_out = torch.tensor([0.3, -1.2, 2.0], dtype=hidden.dtype)  # like a loss weighting the sequences
    (ours.sum * grad_out).sum().backward()
    (expected_sum * grad_out).sum().backward()
    for a, b in zip(ours_inputs, naive_inputs):
        assert torch.allclose(a.grad, b.grad)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_gradcheck(softcap):
    hidden, weight, labels = random_case(seed=1, B=2, T=7, d=3, V=7)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda h, w: sequence_logps_from_hidden(h, w, labels, chunk_size=2, softcap=softcap).sum, (hidden, weight))


def test_logits_path_and_mean():
    hidden, weight, labels = random_case(seed=2, dtype=torch.float32)
    logits = hidden @ weight.T
    ours = sequence_logps(logits, labels, chunk_size=3)
    expected_sum, expected_count = naive(logits, labels)
    assert torch.allclose(ours.sum, expected_sum, atol=1e-5)
    assert torch.allclose(ours.mean, expected_sum / expected_count.clamp(min=1), atol=1e-5)


def test_response_states_select_the_predicting_positions():
    hidden = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4, 1)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX]])
    states, targets, rows = response_states(hidden, labels)
    # label t+1 is predicted by position t: (row 0, pos 1 -> 5), (0, 2 -> 6), (1, 0 -> 7)
    assert states.squeeze(1).tolist() == [1.0, 2.0, 4.0] and targets.tolist() == [5, 6, 7]
    assert rows.tolist() == [0, 0, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_path_equals_naive_on_a_model(micro_model_dir, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(micro_model_dir, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, model.config.vocab_size, (4, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX
    with torch.no_grad():
        ours = model_sequence_logps(model, {"input_ids": input_ids, "attention_mask": attention_mask,
                                            "labels": labels}, chunk_size=5)
        expected_sum, expected_count = naive(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(ours.sum, expected_sum, atol=tolerance, rtol=tolerance)
    assert torch.equal(ours.count, expected_count)


def test_return_hidden_gives_the_states_npo_needs(micro_model_dir):
    """NPO reads the reference's last hidden states; the LM head of those gives the model's logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(micro_model_dir).eval()
    input_ids = torch.randint(4, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[:, :3] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    with torch.no_grad():
        logps, hidden = model_sequence_logps(model, batch, return_hidden=True)
        logits = model(input_ids=input_ids).logits
    assert hidden.shape == (2, 10, model.config.hidden_size)
    states, targets, sequences = response_states(hidden, labels)
    assert torch.allclose(states @ model.get_output_embeddings().weight.T, logits[:, :-1][labels[:, 1:] != -100],
                          atol=1e-5)
    assert logps.count.tolist() == [7, 7] and sequences.tolist() == [0] * 7 + [1] * 7
