"""Speculative decoding: greedy output equals plain greedy decoding (sliding windows included), the sampled
tokens follow the target's distribution (chi-square), the rejection rule by Monte Carlo, the CLI flag."""

import math

import pytest
import torch

from custom_llm import ModelConfig, Transformer
from custom_llm.errors import UserError
from custom_llm.generation import SamplingParams, generate_without_cache
from custom_llm.generation.speculative import (SpeculativeDecoder, accept_or_resample, probabilities,
                                               speculative_generate)


def model(seed, **overrides):
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, tie_embeddings=False)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**base, **overrides})).eval()


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square(df), Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("target_kw,draft_kw", [({}, {}), (dict(sliding_window=8), dict(sliding_window=6)),
                                                (dict(sliding_window=8, window_pattern="SL"), {})])
def test_greedy_equals_plain_greedy(k, target_kw, draft_kw, one_thread):
    if k + 1 > min(target_kw.get("sliding_window", 99), draft_kw.get("sliding_window", 99)):
        pytest.skip("window smaller than k + 1 is refused (tested below)")
    target, draft = model(0, **target_kw), model(1, d_model=16, n_layers=1, **draft_kw)
    with torch.no_grad():  # a peaky target, so that greedy is not decided by rounding
        target.lm_head.weight.mul_(4)
    prompt = [5, 9, 2, 33, 17, 8, 1]
    expected = generate_without_cache(target, prompt, 30)
    tokens, stats = speculative_generate(target, draft, prompt, 30, draft_tokens=k)
    assert tokens == expected
    assert stats.proposed > 0 and 0 <= stats.accepted <= stats.proposed
    same, stats = speculative_generate(target, target, prompt, 30, draft_tokens=k)  # a perfect draft
    assert same == expected and stats.acceptance_rate == 1.0


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0)])
def test_rollback_leaves_both_caches_as_a_fresh_prefill_would(params, one_thread):
    """After rejected drafts, every ring slot again holds the key of the time it should (s - W)."""
    from custom_llm.generation import KVCache, prefill

    target, draft = model(0, sliding_window=6, window_pattern="SL"), model(0, sliding_window=5)
    with torch.no_grad():  # the target's weights, a different window and a noisy head: a draft that is often right
        draft.lm_head.weight.add_(0.03 * torch.randn(draft.lm_head.weight.shape, generator=torch.Generator().manual_seed(1)))
    prompt = [5, 9, 2, 33, 17, 8, 1]
    decoder = SpeculativeDecoder(target, draft, draft_tokens=4)
    tokens = list(decoder.stream(prompt, 40, params, torch.Generator().manual_seed(0)))
    assert 0 < decoder.stats.accepted < decoder.stats.proposed  # some rejections happened
    sequence = prompt + tokens
    for m, cache, n_valid in ((target, decoder.caches[0], len(sequence) - 1), (draft, decoder.caches[1], decoder.draft_time)):
        fresh = KVCache.for_model(m, 1, cache.max_len)
        with torch.no_grad():
            prefill(m, fresh, torch.tensor([sequence[:n_valid]]))
        for window, got, want in zip(cache.layer_windows, cache.keys + cache.values, fresh.keys + fresh.values):
            if window is None:
                got, want = got[:, :, :n_valid], want[:, :, :n_valid]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_window_too_small_for_k_is_refused():
    with pytest.raises(UserError, match="sliding window"):
        SpeculativeDecoder(model(0, sliding_window=4), model(1), draft_tokens=4)
    with pytest.raises(UserError, match="vocabulary"):
        SpeculativeDecoder(model(0), model(1, vocab_size=32))


def test_rejection_rule_reproduces_the_target_distribution():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.1, 0.7]])  # (k+1, V), k = 1
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    g = torch.Generator().manual_seed(0)
    n_runs, counts = 4000, torch.zeros(4)
    for _ in range(n_runs):
        draft = int(torch.multinomial(q[0], 1, generator=g))
        n, token = accept_or_resample(p, q, [draft], g)
        counts[draft if n == 1 else token] += 1
    expected = p[0] * n_runs
    keep = expected > 0
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert counts[3] == 0 and stat < chi2_critical(2)


def test_first_sampled_tokens_follow_the_target_distribution(one_thread):
    """Joint distribution of the 2nd and 3rd new tokens (the speculative ones) against the exact one."""
    V = 6
    target, draft = model(2, vocab_size=V), model(3, vocab_size=V, d_model=16, n_layers=1)
    with torch.no_grad():
        target.lm_head.weight.mul_(8)
        draft.lm_head.weight.mul_(8)
    prompt, params = [1, 4, 2], SamplingParams(temperature=1.0)
    exact_target, exact_draft = (_exact_joint(m, prompt, V) for m in (target, draft))
    assert (exact_target - exact_draft).abs().sum() > 0.3  # a draft far from the target: a test with power
    g = torch.Generator().manual_seed(0)
    decoder = SpeculativeDecoder(target, draft, draft_tokens=2)
    runs, counts = 700, torch.zeros(V, V)
    for _ in range(runs):
        tokens = list(decoder.stream(prompt, 3, params, g))
        counts[tokens[1], tokens[2]] += 1
    stat_target, df = _chi2(counts, exact_target * runs)
    stat_draft, _ = _chi2(counts, exact_draft * runs)
    assert stat_target < chi2_critical(df), (stat_target, df)
    assert stat_draft > chi2_critical(df)  # the same samples clearly reject the draft's distribution
    assert 0 < decoder.stats.acceptance_rate < 1


def _exact_joint(m, prompt, V):
    """P(x2, x3) = sum over x1 of P(x1) P(x2 | x1) P(x3 | x1, x2), by scoring every continuation."""
    seqs = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])  # (V*V, T+2)
    with torch.no_grad():
        logp = torch.log_softmax(m(seqs).float(), dim=-1)  # (V*V, T+2, V)
    T = len(prompt)
    first = logp[:, T - 1].gather(1, seqs[:, T:T + 1])[:, 0]  # log P(x1)
    second = logp[:, T].gather(1, seqs[:, T + 1:T + 2])[:, 0]  # log P(x2 | x1)
    third = logp[:, T + 1]  # (V*V, V): log P(x3 | x1, x2)
    joint = (first + second).unsqueeze(1) + third  # (V*V, V) over (x1, x2), x3
    return joint.exp().view(V, V, V).sum(0)  # (V, V) over (x2, x3)


def _chi2(counts, expected):
    """Chi-square over cells with expected count >= 5 (the rest pooled into one cell)."""
    counts, expected = counts.flatten(), expected.flatten()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def test_probabilities_greedy_is_one_hot():
    logits = torch.tensor([[0.1, 2.0, -1.0]])
    assert probabilities(logits, SamplingParams()).tolist() == [[0.0, 1.0, 0.0]]
    torch.testing.assert_close(probabilities(logits, SamplingParams(temperature=1.0)), torch.softmax(logits, -1))


def test_cli_generate_with_a_draft(tmp_path, capsys):
    from custom_llm.checkpoint_io import save_model
    from custom_llm.cli import main
    from custom_llm.tokenizers.char import CharTokenizer

    tokenizer = CharTokenizer.train(["hello world, the quick brown fox"])
    for name, seed, width in (("target", 0, 32), ("draft", 1, 16)):
        save_model(model(seed, vocab_size=tokenizer.vocab_size, d_model=width), tmp_path / name)
        tokenizer.save(tmp_path / name)
    args = ["generate", "--ckpt", str(tmp_path / "target"), "--prompt", "he", "--max-new-tokens", "12",
            "--temperature", "0"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--draft", str(tmp_path / "draft"), "--draft-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain
    assert main(args + ["--draft", str(tmp_path / "draft"), "--draft-tokens", "0"]) == 2
