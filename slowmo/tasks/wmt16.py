"""WMT'16 En-De: parallel text (``train.en``/``train.de``, ``valid.en``/``valid.de`` and optionally a test set such
as ``newstest2014.en``/``.de`` under ``data.root``), a joint sentencepiece BPE model (trained on the training text
unless ``data.spm_model`` is given), the Transformer, label-smoothed cross-entropy, token-based batching, beam search
with fairseq's length penalty, and two BLEU scores of the decoded (BPE-removed) text:

- ``val_bleu``: sacreBLEU on the detokenized text (13a tokenizer, exp smoothing), the modern standard; its signature
  is in ``summary.json`` (``notes``);
- ``val_bleu_tok``: tokenized BLEU with compound splitting, as the paper's numbers (fairseq's
  ``compound_split_bleu.sh``: every ``a-b`` becomes ``a ##AT##-##AT## b``, then BLEU-4 over whitespace tokens with
  no smoothing, as ``fairseq-score``). fairseq's data is Moses-tokenized; here the text is tokenized with the 13a
  (mteval) tokenizer, which keeps hyphens inside words as Moses does.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ..models import ModelConfig, build_model
from ..registry import ConfigError, setting
from .base import TASKS, LoaderConfig, Task, TaskConfig, TaskContext

PAD, UNK, BOS, EOS = 0, 1, 2, 3


def read_parallel(root: Path, split: str) -> tuple[list[str], list[str]]:
    paths = [root / f"{split}.en", root / f"{split}.de"]
    for path in paths:
        if not path.is_file():
            raise ConfigError(
                f"WMT file missing: {path}; data.root must hold train.en/train.de, valid.en/valid.de and, with "
                "data.test_prefix=P, P.en/P.de"
            )
    src, tgt = (p.read_text(encoding="utf-8").splitlines() for p in paths)
    if len(src) != len(tgt):
        raise ConfigError(
            f"{paths[0].name} has {len(src)} lines but {paths[1].name} has {len(tgt)} under {root}; "
            "parallel files must align line by line"
        )
    return src, tgt


def train_sentencepiece(texts: list[str], prefix: Path, vocab_size: int) -> Path:
    """A joint BPE model over source and target training text (written to ``prefix``.model)."""
    if not any(line.strip() for line in texts):
        raise ConfigError(
            "the training text is empty: sentencepiece has nothing to learn from; check train.en/train.de"
        )
    import sentencepiece as spm  # here and below: sentencepiece and sacreBLEU take a second to import, a check none

    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        hard_vocab_limit=False,
        pad_id=PAD,
        unk_id=UNK,
        bos_id=BOS,
        eos_id=EOS,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def token_batches(lengths: list[int], max_tokens: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """Sentences sorted by length and packed so that (longest x count) <= max_tokens; the batches are shuffled with
    (seed, epoch), dealt to ranks in turn and cut to an equal count per rank."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches, current, longest = [], [], 0
    for i in order:
        longest_if = max(longest, lengths[i])
        if current and longest_if * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest_if = [], lengths[i]
        current.append(i)
        longest = longest_if
    if current:
        batches.append(current)
    perm = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    per_rank = len(batches) // world
    return [batches[perm[j]] for j in range(rank, per_rank * world, world)]


_COMPOUND = re.compile(r"(\S)-(\S)")


@functools.cache
def _bleu() -> tuple:
    """sacreBLEU's scorers: detokenized (13a tokenizer, exp smoothing), BLEU-4 over the given tokens (as fairseq-score),
    and the 13a tokenizer."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return BLEU(), BLEU(tokenize="none", smooth_method="none", force=True), Tokenizer13a()


def compound_split(text: str) -> str:
    r"""The tokenized text of fairseq's ``compound_split_bleu.sh``: tokens, then ``a-b`` -> ``a ##AT##-##AT## b`` (left
    to right, non-overlapping, as perl's ``s{(\S)-(\S)}{$1 ##AT##-##AT## $2}g``)."""
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", _bleu()[2](text))


def bleu_sums(hyps: list[str], refs: list[str]) -> list[float]:
    """The sufficient statistics of both scores (n-gram matches and totals for n = 1..4, hypothesis and reference
    lengths; sacreBLEU's then the tokenized one's): they add up over batches and ranks into corpus BLEU."""
    sums: list[float] = []
    detokenized, tokenized, _ = _bleu()
    for metric, prepare in ((detokenized, str), (tokenized, compound_split)):
        stats = metric.corpus_score([prepare(h) for h in hyps], [[prepare(r) for r in refs]])
        sums += [*stats.counts, *stats.totals, stats.sys_len, stats.ref_len]
    return sums


def sacrebleu_signature() -> str:
    """``val_bleu``'s sacreBLEU signature (nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:...)."""
    from sacrebleu.metrics import BLEU

    metric = BLEU()
    metric.corpus_score(["-"], [["-"]])  # sacreBLEU knows the number of references only once it has scored
    return str(metric.get_signature())


def bleu_scores(sums: list[float]) -> dict[str, float]:
    """Corpus ``val_bleu`` (sacreBLEU, detokenized) and ``val_bleu_tok`` (tokenized, compound-split) of summed
    :func:`bleu_sums`."""
    from sacrebleu.metrics import BLEU

    scores = {}
    for name, smoothing, part in (("val_bleu", "exp", sums[:10]), ("val_bleu_tok", "none", sums[10:])):
        values = [int(v) for v in part]
        scores[name] = BLEU.compute_bleu(values[:4], values[4:8], values[8], values[9], smooth_method=smoothing).score
    return scores


def collate(items: list[tuple[list[int], list[int], str]]) -> dict:
    """(source ids, target ids, reference text) triples -> padded ``src``, ``tgt``, ``prev`` (the target shifted right
    behind BOS: teacher forcing) and the ``refs``."""
    src = nn.utils.rnn.pad_sequence([torch.tensor(s) for s, _, _ in items], batch_first=True, padding_value=PAD)
    tgt = nn.utils.rnn.pad_sequence([torch.tensor(t) for _, t, _ in items], batch_first=True, padding_value=PAD)
    prev = torch.cat([torch.full((len(items), 1), BOS), tgt[:, :-1]], 1)
    return {"src": src, "tgt": tgt, "prev": prev, "refs": [ref for _, _, ref in items]}


def translation_loss(net: nn.Module, batch: dict, smoothing: float) -> torch.Tensor:
    """Label-smoothed cross-entropy per target token (teacher forcing), padding ignored."""
    logits = net(batch["src"], batch["prev"])
    return nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["tgt"].flatten(), ignore_index=PAD, label_smoothing=smoothing
    )


@dataclass
class TranslationTask(TaskConfig):
    """The ``task`` section of a translation task (WMT'16, the generated language pair)."""

    beam: int = setting(minimum=1)  # beam size of decoding (1: greedy)
    lenpen: float  # length penalty: a hypothesis scores sum(log p) / length ** lenpen (fairseq's)
    max_decode_len: int = setting(minimum=0)  # target tokens beyond the source length


@dataclass
class TranslationData(LoaderConfig):
    """The ``data`` keys of a translation task."""

    max_tokens: int = setting(minimum=1)  # tokens per rank per batch (longest sentence x sentences)
    vocab_size: int = setting(minimum=8)  # joint sentencepiece BPE vocabulary (its 4 control tokens and more)


@dataclass
class WMT16Data(TranslationData):
    root: str | None = setting(run_control=True)  # the directory holding train.en/train.de and valid.en/valid.de
    spm_model: str | None  # an existing sentencepiece model (else one is trained on the training text)
    test_prefix: str | None  # a test set P.en/P.de under root (e.g. newstest2014), scored as test_bleu, test_bleu_tok


class Pairs(Dataset):
    """(source ids, target ids, reference text) triples."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]], refs: list[str]) -> None:
        self.pairs, self.refs = pairs, refs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[list[int], list[int], str]:
        return self.pairs[i][0], self.pairs[i][1], self.refs[i]


Split = tuple[list[str], list[str]]  # source lines, target lines


@TASKS.register(
    "wmt16",
    TranslationTask,
    data=WMT16Data,
    label="WMT'16 En-De",
    inputs="tokens",
    needs="a Transformer",
    imports=("sentencepiece", "sacrebleu.metrics"),
)
def build(task: TranslationTask, data: WMT16Data, model: ModelConfig, ctx: TaskContext) -> Task:
    if data.root is None:
        raise ConfigError("task wmt16 needs data.root: the directory holding train.en/train.de and valid.en/valid.de")
    root = Path(data.root)
    train, valid = read_parallel(root, "train"), read_parallel(root, "valid")
    test = read_parallel(root, data.test_prefix) if data.test_prefix else None
    model_path = Path(data.spm_model) if data.spm_model else ctx.shared_dir / f"spm_bpe{data.vocab_size}.model"
    if data.spm_model and not model_path.is_file():
        raise ConfigError(f"data.spm_model={data.spm_model} does not exist")
    return translation(task, data, model, ctx, train, valid, test, model_path)


def translation(
    task: TranslationTask,
    data: TranslationData,
    model: ModelConfig,
    ctx: TaskContext,
    train: Split,
    valid: Split,
    test: Split | None,
    model_path: Path,
) -> Task:
    """A translation Task from its text: a joint sentencepiece BPE model (``model_path``, trained on the training
    text if it is not there), the Transformer, label-smoothed cross-entropy, token-based batching, beam search and
    both BLEU scores of every split (``test``: scored as ``test_*``)."""
    if not model_path.is_file():
        train_sentencepiece(train[0] + train[1], model_path.with_suffix(""), data.vocab_size)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))

    def encode(src: list[str], tgt: list[str]) -> list[tuple[list[int], list[int]]]:
        return [(s + [EOS], t + [EOS]) for s, t in zip(sp.encode(src), sp.encode(tgt), strict=True)]

    train_set, val_set = encode(*train), encode(*valid)
    lengths = [max(len(s), len(t)) for s, t in train_set]
    net = build_model(model, vocab_size=sp.get_piece_size(), pad_id=PAD)

    def loss(net: nn.Module, batch: dict) -> torch.Tensor:
        return translation_loss(net, batch, task.label_smoothing)

    def eval_sums(net: nn.Module, batch: dict) -> torch.Tensor:
        logits = net(batch["src"], batch["prev"])
        nll = nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["tgt"].flatten(), ignore_index=PAD, reduction="sum"
        )
        hyps = [
            sp.decode(ids) for ids in net.generate(batch["src"], BOS, EOS, task.max_decode_len, task.beam, task.lenpen)
        ]
        tokens = (batch["tgt"] != PAD).sum().item()
        return torch.tensor([nll.item(), tokens, *bleu_sums(hyps, batch["refs"])], dtype=torch.float64)

    def metrics(sums: torch.Tensor) -> dict[str, float]:
        values = sums.tolist()
        return {"val_loss": values[0] / values[1], **bleu_scores(values[2:])}

    def train_batches(epoch: int) -> list[list[int]]:
        return token_batches(lengths, data.max_tokens, ctx.seed, epoch, ctx.rank, ctx.world_size)

    return Task(
        net,
        Pairs(train_set, train[1]),
        Pairs(val_set, valid[1]),
        collate,
        train_batches,
        loss,
        eval_sums,
        metrics,
        main_metric="val_bleu",
        test_set=Pairs(encode(*test), test[1]) if test else None,
        notes={
            "val_bleu": f"sacreBLEU {sacrebleu_signature()}",
            "val_bleu_tok": "tokenized BLEU-4 (13a tokens, compound-split as fairseq's compound_split_bleu.sh, "
            "no smoothing)",
        },
    )
