"""How well a model translates: exact match and corpus BLEU (Papineni et al., 2002) over word-tokenized text.

``corpus_bleu`` follows sacreBLEU's defaults on text already split into words: n-grams up to 4 clipped by the
reference's counts and summed over the corpus, the brevity penalty on the corpus' lengths, and sacreBLEU's
``exp`` smoothing for an order with no match (its precision is 1 / (2^k x that order's n-grams), k counting
such orders); a score from 0 to 100.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], max_n: int = 4) -> float:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        h, r = hyp.split(), ref.split()
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, max_n + 1):
            hc, rc = _ngrams(h, n), _ngrams(r, n)
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0 or not any(matches):
        return 0.0
    log_p, zeros = 0.0, 1
    for m, t in zip(matches, totals):
        if t == 0:
            return 0.0
        if m == 0:
            zeros *= 2
            log_p += math.log(1.0 / (zeros * t))
        else:
            log_p += math.log(m / t)
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100.0 * brevity * math.exp(log_p / max_n)


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """The share (0-1) of hypotheses equal to their reference, word for word."""
    if not references:
        return 0.0
    return sum(h.split() == r.split() for h, r in zip(hypotheses, references)) / len(references)


__all__ = ["corpus_bleu", "exact_match"]
