"""WMT's two BLEU scores on hand-made hypotheses and references, against BLEU-4 computed here from its definition
(Papineni et al. 2002: clipped n-gram precisions for n = 1..4, their geometric mean, the brevity penalty)."""

import math
from collections import Counter

import pytest

from slowmo.tasks.wmt16 import bleu_scores, bleu_sums, compound_split

HYPS = [
    "The state-of-the-art model works well today .",
    "A well-known cat sat on the mat .",
    "It rained in the north-east all day long .",
]
REFS = [
    "The state-of-the-art model works very well today .",
    "The well-known cat sat on the red mat .",
    "It rained in the north-east for the whole day .",
]
AT = "##AT##-##AT##"
# the same sentences as fairseq's compound_split_bleu.sh leaves them, written out by hand
HYPS_SPLIT = [
    f"The state {AT} of {AT} the {AT} art model works well today .",
    f"A well {AT} known cat sat on the mat .",
    f"It rained in the north {AT} east all day long .",
]
REFS_SPLIT = [
    f"The state {AT} of {AT} the {AT} art model works very well today .",
    f"The well {AT} known cat sat on the red mat .",
    f"It rained in the north {AT} east for the whole day .",
]


def bleu4(hyps: list[list[str]], refs: list[list[str]]) -> float:
    """Corpus BLEU-4 with one reference per sentence, no smoothing."""
    matches, totals, hyp_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for hyp, ref in zip(hyps, refs, strict=True):
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, 5):
            h = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
            r = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
            matches[n - 1] += sum(min(count, r[gram]) for gram, count in h.items())
            totals[n - 1] += max(0, len(hyp) - n + 1)
    assert all(matches), "every precision is above 0 in these examples: no smoothing question"
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / 4
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * brevity * math.exp(log_precision)


def test_compound_split_is_fairseqs_left_to_right_rewrite():
    assert [compound_split(h) for h in HYPS] == HYPS_SPLIT
    assert compound_split("x-y-z 3-4") == f"x {AT} y-z 3 - 4"  # perl's /g does not overlap; 13a splits digit-hyphen


def test_both_scores_against_bleu4_from_its_definition():
    scores = bleu_scores(bleu_sums(HYPS, REFS))
    detokenized = bleu4([h.split() for h in HYPS], [r.split() for r in REFS])  # 13a leaves these as they are
    tokenized = bleu4([h.split() for h in HYPS_SPLIT], [r.split() for r in REFS_SPLIT])
    assert scores["val_bleu"] == pytest.approx(detokenized, abs=1e-9)
    assert scores["val_bleu_tok"] == pytest.approx(tokenized, abs=1e-9)
    assert scores["val_bleu_tok"] > scores["val_bleu"] + 1  # split compounds are more matching n-grams


def test_sums_add_up_over_batches_into_the_corpus_score():
    per_sentence = [bleu_sums([h], [r]) for h, r in zip(HYPS, REFS, strict=True)]
    summed = [sum(column) for column in zip(*per_sentence, strict=True)]
    assert bleu_scores(summed) == bleu_scores(bleu_sums(HYPS, REFS))
    assert bleu_scores(summed) != bleu_scores(per_sentence[0])
