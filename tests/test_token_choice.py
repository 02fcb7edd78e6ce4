"""Choosing a token (choose_tokens, min_p_keep): min-p, greedy and extreme temperatures, and the allowed mask."""
import torch
from torch import randn

from transfusion_pytorch.text_generation import choose_tokens, min_p_keep


def test_min_p_keeps_exactly_tokens_above_threshold():
    logits = torch.randn(4, 50) * 3
    probs = logits.softmax(-1)
    for min_p in (0.05, 0.1, 0.5):
        keep = min_p_keep(logits, min_p)
        assert torch.equal(keep, probs >= min_p * probs.max(dim = -1, keepdim = True).values)
        # sampling never leaves the kept set
        draws = torch.stack([choose_tokens(logits, temperature = 1.5, min_p = min_p) for _ in range(200)])
        assert keep.gather(1, draws.T).all()


def test_temperature_zero_is_greedy():
    logits = torch.randn(5, 20)
    assert torch.equal(choose_tokens(logits, temperature = 0.), logits.argmax(-1))


def test_in_graph_sampler_keeps_min_p_and_matches_the_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    keep = min_p_keep(logits, 0.05)[0]
    draws = torch.stack([choose_tokens(logits.expand(500, -1), temperature = 1.3, min_p = 0.05) for _ in range(20)]).flatten()
    assert keep[draws].all()
    expected = (logits[0] / 1.3).masked_fill(~keep, float('-inf')).softmax(-1)
    observed = torch.bincount(draws, minlength = 12).float() / draws.numel()
    assert (observed - expected).abs().max() < 0.02, (observed, expected)
    assert torch.equal(choose_tokens(logits, temperature = 0.), logits.argmax(-1))


def test_a_tiny_temperature_is_still_greedy_among_the_allowed_tokens():
    """Dividing raw logits by a subnormal temperature overflowed them to +-inf: ties went to
    index 0 and all-negative rows chose a forbidden token."""
    logits = torch.tensor([[-1., -5., -1.5, -2.], [3., 1., 7., 7.5]])
    allowed = torch.tensor([False, True, True, True])
    assert choose_tokens(logits, 1e-40, min_p = 0., allowed = allowed).tolist() == [2, 3]
    assert choose_tokens(logits, 0., allowed = allowed).tolist() == [2, 3]


def test_a_temperature_past_float32_never_chooses_a_filtered_token():
    """Above ~3.4e38 the temperature overflows fp32 to inf: the allowed tokens become equally
    likely, and a filtered token (-inf / inf = NaN) must stay impossible, not become argmax's pick."""
    torch.manual_seed(0)
    logits = torch.tensor([[3., 2.9, 0., -1., -2.]]).expand(2000, 5)
    allowed = torch.tensor([True, True, True, True, False])
    for temperature in (1e39, 1e300):
        counts = torch.bincount(choose_tokens(logits, temperature, min_p = 0.5, allowed = allowed), minlength = 5)
        assert counts[2:].sum() == 0 and counts[0] > 800 and counts[1] > 800, counts


def test_min_p_one_keeps_exactly_the_most_likely_tokens_ties_included():
    """min_p = 1 is allowed and keeps the tokens whose probability equals the maximum: sampling
    is then greedy (a strict '>' kept none, and every draw fell back to token 0)."""
    logits = randn(6, 20) * 3
    logits[0, 3] = logits[0, 7] = logits[0].max() + 1.          # a tie at the top
    keep = min_p_keep(logits, 1.)
    expected = logits == logits.amax(dim = -1, keepdim = True)
    assert torch.equal(keep, expected)
    for _ in range(20):
        draws = choose_tokens(logits, temperature = 1.5, min_p = 1.)
        assert expected.gather(1, draws[:, None]).all()
        assert torch.equal(draws[1:], logits[1:].argmax(-1))


def test_min_p_is_taken_among_the_allowed_tokens():
    """The grammar mask comes first: min-p is relative to the most likely ALLOWED token. With a
    forbidden token far above the rest, min-p against it would remove every allowed token."""
    logits = torch.tensor([[12., 1., 0.5, -3., 0.9]]).expand(400, -1)
    allowed = torch.tensor([False, True, True, True, True])
    draws = choose_tokens(logits, temperature = 1., min_p = 0.1, allowed = allowed)
    kept = min_p_keep(logits[:1].masked_fill(~allowed, float('-inf')), 0.1)[0]
    assert kept.tolist() == [False, True, True, False, True]
    assert set(draws.tolist()) == {1, 2, 4}
