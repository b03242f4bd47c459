"""A generated language pair for the WMT'16 block's shape on a CPU: pseudo-English to pseudo-German, with what makes
translation more than a word lookup, and a Zipfian vocabulary, so that a small Transformer keeps improving on rare
words for the whole run instead of saturating.

The source grammar: a sentence is a clause, optionally followed by "that" and a second clause; a clause is subject,
verb, object and an optional adverb; a noun phrase is a determiner (the / a), zero to two adjectives and a noun. Every
content word is drawn from its class with Zipf's law (p of the r-th word proportional to 1 / r). The target side:
- **a dictionary**: every source word has its own pseudo-German word (generated from other syllables; nouns
  capitalized), and each noun a grammatical gender;
- **agreement**: the article and the adjective endings follow the noun's gender, the article (definite or not) and
  the case (a masculine object takes the accusative: den / einen, adjectives -en);
- **word order**: a main clause puts the adverb before the object (S V Adv O), a subordinate clause after ", dass"
  puts its verb last (S Adv O V).

The same sentences for every run seed (``data.generator_seed``); the train, validation and test splits are disjoint
draws. The rest is the WMT task's machinery (:func:`slowmo.tasks.wmt16.translation`): sentencepiece BPE, beam search,
sacreBLEU and tokenized BLEU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..models import ModelConfig
from ..registry import ConfigError, setting
from .base import TASKS, Task, TaskContext
from .wmt16 import Split, TranslationData, TranslationTask, translation

CLASSES = {"noun": 0.4, "adjective": 0.2, "verb": 0.25, "adverb": 0.15}  # shares of the lexicon
SOURCE_SOUNDS = (tuple("bcdfghklmnprstvw"), tuple("aeiou"))
TARGET_SOUNDS = (("b", "d", "f", "g", "k", "l", "m", "n", "r", "s", "t", "w", "z", "sch", "st", "pf", "kr", "gr"),
                 ("a", "e", "i", "o", "u", "ei", "au", "ie", "ä", "ö", "ü"))  # fmt: skip
GENDERS = ("m", "f", "n")
ARTICLES = {  # (definite, case) -> gender -> article
    (True, "nom"): {"m": "der", "f": "die", "n": "das"},
    (True, "acc"): {"m": "den", "f": "die", "n": "das"},
    (False, "nom"): {"m": "ein", "f": "eine", "n": "ein"},
    (False, "acc"): {"m": "einen", "f": "eine", "n": "ein"},
}
ENDINGS = {  # (definite, case) -> gender -> adjective ending (German's weak and mixed declension)
    (True, "nom"): {"m": "e", "f": "e", "n": "e"},
    (True, "acc"): {"m": "en", "f": "e", "n": "e"},
    (False, "nom"): {"m": "er", "f": "e", "n": "es"},
    (False, "acc"): {"m": "en", "f": "e", "n": "es"},
}


@dataclass
class SyntheticTranslationData(TranslationData):
    lexicon: int = setting(minimum=len(CLASSES))  # source content words (nouns, adjectives, verbs, adverbs)
    train_sentences: int = setting(minimum=1)
    valid_sentences: int = setting(minimum=1)
    test_sentences: int = setting(minimum=0, why="0: no test split")
    subordinate: float  # probability of a second clause ("that ...", verb-final in the target)
    generator_seed: int  # the same sentences for every run seed

    def check(self) -> None:
        if not 0.0 <= self.subordinate <= 1.0:
            raise ConfigError(f"data.subordinate={self.subordinate} is a probability: use a value in [0, 1]")


def _words(rng: np.random.Generator, sounds: tuple, n: int, taken: set[str]) -> list[str]:
    """``n`` new words of one to three consonant-vowel syllables (none in ``taken``, which they join)."""
    consonants, vowels = sounds
    out: list[str] = []
    while len(out) < n:
        length = rng.integers(1, 4)
        onsets, nuclei = rng.integers(len(consonants), size=length), rng.integers(len(vowels), size=length)
        word = "".join(consonants[c] + vowels[v] for c, v in zip(onsets, nuclei, strict=True))
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


class Language:
    """The pair's lexicon: per class, source words, their translations (and each noun's gender), and the Zipf
    weights words are drawn with."""

    def __init__(self, size: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        source_taken = {"the", "a", "that"}
        target_taken = {a for table in ARTICLES.values() for a in table.values()} | {"dass"}
        self.source: dict[str, list[str]] = {}
        self.target: dict[str, list[str]] = {}
        self.weights: dict[str, np.ndarray] = {}  # cumulative Zipf weights
        for cls, share in CLASSES.items():
            n = max(1, int(size * share))
            self.source[cls] = _words(rng, SOURCE_SOUNDS, n, source_taken)
            self.target[cls] = _words(rng, TARGET_SOUNDS, n, target_taken)
            zipf = np.cumsum(1.0 / np.arange(1, n + 1))
            self.weights[cls] = zipf / zipf[-1]  # cumulative
        self.gender = rng.choice(GENDERS, len(self.source["noun"]))

    def draw(self, rng: np.random.Generator, cls: str) -> int:
        return min(int(np.searchsorted(self.weights[cls], rng.random(), side="right")), len(self.source[cls]) - 1)

    def phrase(self, rng: np.random.Generator, case: str) -> tuple[list[str], list[str]]:
        """A noun phrase: source words, target words (article and adjectives agreeing with the noun)."""
        definite = bool(rng.random() < 0.5)
        adjectives = [self.draw(rng, "adjective") for _ in range(rng.choice(3, p=[0.5, 0.35, 0.15]))]
        noun = self.draw(rng, "noun")
        gender = self.gender[noun]
        src = [
            "the" if definite else "a",
            *(self.source["adjective"][a] for a in adjectives),
            self.source["noun"][noun],
        ]
        ending = ENDINGS[(definite, case)][gender]
        tgt = [ARTICLES[(definite, case)][gender], *(self.target["adjective"][a] + ending for a in adjectives)]
        return src, [*tgt, self.target["noun"][noun].capitalize()]

    def clause(self, rng: np.random.Generator, subordinate: bool) -> tuple[list[str], list[str]]:
        (s_src, s_tgt), verb = self.phrase(rng, "nom"), self.draw(rng, "verb")
        o_src, o_tgt = self.phrase(rng, "acc")
        adverb = [self.draw(rng, "adverb")] if rng.random() < 0.5 else []
        src = [*s_src, self.source["verb"][verb], *o_src, *(self.source["adverb"][a] for a in adverb)]
        adv = [self.target["adverb"][a] for a in adverb]
        v = self.target["verb"][verb]
        tgt = [*s_tgt, *adv, *o_tgt, v] if subordinate else [*s_tgt, v, *adv, *o_tgt]
        return src, tgt

    def sentence(self, rng: np.random.Generator, subordinate: float) -> tuple[str, str]:
        src, tgt = self.clause(rng, False)
        if rng.random() < subordinate:
            sub_src, sub_tgt = self.clause(rng, True)
            src, tgt = [*src, "that", *sub_src], [*tgt, ",", "dass", *sub_tgt]
        source, target = " ".join(src) + ".", " ".join(tgt).replace(" ,", ",") + "."
        return source[0].upper() + source[1:], target[0].upper() + target[1:]


@functools.cache
def generate(lexicon: int, sizes: tuple[int, int, int], subordinate: float, seed: int) -> tuple[Split, ...]:
    """The train, validation and test splits (source lines, target lines) of ``sizes`` sentences, from ``seed`` (kept
    in memory for the simulated ranks and later runs of a process)."""
    language = Language(lexicon, seed)
    splits = []
    for i, n in enumerate(sizes):
        rng = np.random.default_rng([seed, i + 1])
        pairs = [language.sentence(rng, subordinate) for _ in range(n)]
        splits.append(([s for s, _ in pairs], [t for _, t in pairs]))
    return tuple(splits)


@TASKS.register(
    "synthetic_translation",
    TranslationTask,
    data=SyntheticTranslationData,
    label="generated En-De",
    inputs="tokens",
    needs="a Transformer",
    imports=("sentencepiece", "sacrebleu.metrics"),
)
def build(task: TranslationTask, data: SyntheticTranslationData, model: ModelConfig, ctx: TaskContext) -> Task:
    sizes = (data.train_sentences, data.valid_sentences, data.test_sentences)
    train, valid, test = generate(data.lexicon, sizes, data.subordinate, data.generator_seed)
    model_path = ctx.shared_dir / f"spm_bpe{data.vocab_size}.model"
    return translation(task, data, model, ctx, train, valid, test if data.test_sentences else None, model_path)
