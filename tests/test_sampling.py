"""The shared sampling math against a plain, loop-by-loop reading of vLLM's sampler."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from pytest_rlparity import sampling
from pytest_rlparity.settings import SamplingSettings


def reference(logits: list[float], s: SamplingSettings, prompt: list[int], output: list[int]) -> list[float]:
    """One row, written the slow way from vLLM's docstring order."""
    x = list(logits)
    seen_out = {t: output.count(t) for t in set(output)}
    for i in range(len(x)):
        if s.repetition_penalty != 1.0 and (i in prompt or i in seen_out):
            x[i] = x[i] / s.repetition_penalty if x[i] > 0 else x[i] * s.repetition_penalty
        x[i] -= s.frequency_penalty * seen_out.get(i, 0)
        x[i] -= s.presence_penalty * (1 if i in seen_out else 0)
    if s.greedy:
        return _log_softmax(x)
    x = [v / s.temperature for v in x]
    if s.min_p > 0:
        p = _softmax(x)
        x = [v if pi >= max(p) * s.min_p else -math.inf for v, pi in zip(x, p)]
    if 0 < s.top_k < len(x):
        kth = sorted(x, reverse=True)[s.top_k - 1]
        x = [v if v >= kth else -math.inf for v in x]
    if s.top_p < 1:
        order = sorted(range(len(x)), key=lambda i: x[i])
        p = _softmax(x)
        cum = 0.0
        for rank, i in enumerate(order):
            cum += p[i]
            if cum <= 1 - s.top_p and rank < len(x) - 1:
                x[i] = -math.inf
    return _log_softmax(x)


def _softmax(x: list[float]) -> list[float]:
    m = max(x)
    e = [math.exp(v - m) if v > -math.inf else 0.0 for v in x]
    total = sum(e)
    return [v / total for v in e]


def _log_softmax(x: list[float]) -> list[float]:
    return [math.log(p) if p > 0 else -math.inf for p in _softmax(x)]


SETTINGS = [
    SamplingSettings(temperature=0.0),
    SamplingSettings(temperature=0.7),
    SamplingSettings(temperature=0.7, top_k=5),
    SamplingSettings(temperature=0.9, top_p=0.7),
    SamplingSettings(temperature=1.0, min_p=0.2),
    SamplingSettings(temperature=0.8, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25),
    SamplingSettings(temperature=0.0, repetition_penalty=1.3),
    SamplingSettings(temperature=0.6, top_k=8, top_p=0.9, min_p=0.05, repetition_penalty=1.2, frequency_penalty=0.1),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: s.label())
def test_processed_logprobs_match_reference(settings):
    gen = torch.Generator().manual_seed(0)
    vocab, steps = 24, 6
    logits = torch.randn(steps, vocab, generator=gen) * 3
    prompt = [1, 2, 3, 3]
    output = torch.randint(0, vocab, (steps,), generator=gen).tolist()
    got = sampling.processed_logprobs(logits, settings, prompt, output)
    for t in range(steps):
        want = reference(logits[t].tolist(), settings, prompt, output[:t])
        for g, w in zip(got[t].tolist(), want):
            assert (g == w == -math.inf) or abs(g - w) < 1e-5, (t, g, w)


def test_penalties_see_only_earlier_outputs():
    logits = torch.zeros(3, 5)
    s = SamplingSettings(temperature=1.0, presence_penalty=1.0)
    out = sampling.process_logits(logits, s, (), [4, 4, 1])
    assert out[0].tolist() == [0, 0, 0, 0, 0]
    assert out[1].tolist() == [0, 0, 0, 0, -1]
    assert out[2].tolist() == [0, 0, 0, 0, -1]


def test_order_matters_min_p_after_temperature():
    """min-p on tempered probabilities keeps fewer tokens at low temperature: the order is observable."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    cold = sampling.process_logits(logits, SamplingSettings(temperature=0.25, min_p=0.1))
    hot = sampling.process_logits(logits, SamplingSettings(temperature=4.0, min_p=0.1))
    assert torch.isinf(cold).sum() > torch.isinf(hot).sum()


def test_top_p_always_keeps_the_most_likely_token():
    logits = torch.tensor([[5.0, 0.0, 0.0]])
    out = sampling.apply_top_p(logits, 1e-6)
    assert out[0, 0] == 5.0 and torch.isinf(out[0, 1:]).all()


def test_raw_is_processed_at_temperature_one_without_filters():
    logits = torch.randn(4, 10)
    torch.testing.assert_close(sampling.raw_logprobs(logits), sampling.processed_logprobs(logits, SamplingSettings()))


def test_entropy_of_uniform_and_masked():
    assert sampling.entropy(torch.zeros(1, 4)).item() == pytest.approx(math.log(4))
    masked = torch.tensor([[0.0, 0.0, -math.inf, -math.inf]])
    assert sampling.entropy(masked).item() == pytest.approx(math.log(2))


def test_prompts_are_sized_in_the_models_own_tokens(trainer):
    from pytest_rlparity.model import tokens_of_length

    ids = tokens_of_length(trainer.tokenizer, 1000)
    assert len(ids) == 1000 and ids[0] == trainer.tokenizer.bos_token_id
    assert trainer.tokenizer.bos_token_id not in ids[1:]


def test_make_model_never_writes_into_an_existing_directory(tmp_path):
    from pytest_rlparity.shapes import SHAPES, make_model

    (tmp_path / "model").mkdir()
    with pytest.raises(FileExistsError, match="exists; choose a new directory"):
        make_model(tmp_path / "model", SHAPES["tiny-qwen2"])
    assert SHAPES["llama-1b"].hidden == 2048 and SHAPES["llama-1b"].tied and SHAPES["qwen2-0.5b"].kv_heads == 2


def test_concurrent_processes_generate_the_embedded_model_once_and_never_replace_it(tmp_path):
    """pytest-xdist workers all ask for the model at start: one generates it, the others wait and load that copy."""
    code = (
        "import os, sys, pathlib; from pytest_rlparity.model import embedded_model; "
        "p = embedded_model(seed=11, root=pathlib.Path(sys.argv[1])); print(p, os.stat(p).st_ino, os.stat(p / 'model.safetensors').st_ino)"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(outputs) == 1, outputs  # the same directory, never swapped for another copy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama-g1-seed11", "tiny-llama-g1-seed11.lock"]
