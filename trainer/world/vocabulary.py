"""The embedded world's vocabulary and the offline CLIP BPE tokenizer built over it.

Every word the caption grammar writes or :func:`trainer.world.scenes.parse_prompt` accepts (synonyms,
plurals, fillers) is one token; any other text falls back to byte-level characters. The tiny text encoders
of the embedded model and of the random-init test pipelines all use it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .scenes import COLOURS, SHAPES, SIZE_WORDS

#: every word the grammar writes or :func:`trainer.world.scenes.parse_prompt` accepts (synonyms,
#: plurals, fillers), each of which becomes a single token.
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        set(
            list(SHAPES)
            + [s + ("es" if s.endswith("ss") else "s") for s in SHAPES]
            + ["plus", "disc", "disk"]
            + list(COLOURS)
            + ["violet", "turquoise"]
            + list(SIZE_WORDS)
            + ["little", "tiny", "big", "huge"]
            + [
                "a",
                "an",
                "the",
                "on",
                "at",
                "in",
                "to",
                "of",
                "and",
                "with",
                "next",
                "beside",
                "left",
                "right",
                "top",
                "bottom",
                "centre",
                "center",
                "middle",
                "centred",
                "centered",
                "above",
                "over",
                "below",
                "under",
                "beneath",
                "image",
                "picture",
                "photo",
                "drawing",
                "render",
                "colour",
                "color",
                "shape",
            ]
        )
    )
)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
#: tokens per caption, BOS and EOS included (the longest grammar caption takes 12).
MODEL_MAX_LENGTH = 16


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table of byte-level BPE (GPT-2 / CLIP): printable Latin-1
    bytes map to themselves, the others to code points from 256 upwards."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _learn_merges(words) -> list[tuple[str, str]]:
    """Byte-pair merges that make every word of ``words`` one symbol (ends marked ``</w>``).

    Plain BPE learning on the word list (each word counted once): repeatedly merge the most
    frequent adjacent pair (ties: the lexicographically first), until no word has two symbols.
    Encoding with these merges in rank order reproduces the learned segmentation, so each word
    becomes exactly one token.
    """
    seqs = [list(w[:-1]) + [w[-1] + END_OF_WORD] for w in words]
    merges = []
    while True:
        counts = Counter(p for s in seqs for p in zip(s, s[1:]))
        if not counts:
            return merges
        top = max(counts.values())
        best = min(p for p, c in counts.items() if c == top)
        merges.append(best)
        for k, s in enumerate(seqs):
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[k] = out


def tokenizer_files(words=VOCABULARY) -> tuple[dict[str, int], list[str]]:
    """The CLIP BPE ``vocab.json`` dict and ``merges.txt`` lines for ``words``.

    Layout as OpenAI's CLIP vocabulary: the 256 byte characters, the same with ``</w>``, one
    entry per merge, then BOS and EOS (EOS doubles as pad and unknown token).
    """
    chars = list(_bytes_to_unicode().values())
    merges = _learn_merges(words)
    tokens = chars + [c + END_OF_WORD for c in chars] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, [f"{a} {b}" for a, b in merges]


def write_tokenizer_files(directory: str | Path, words=VOCABULARY) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` into ``directory``; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = tokenizer_files(words)
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def build_tokenizer(words=VOCABULARY):
    """A ``CLIPTokenizer`` for the world's vocabulary (model_max_length :data:`MODEL_MAX_LENGTH`)."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files(words)
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=MODEL_MAX_LENGTH)
