"""Roleplay metrics over generated replies: repetition, slop, diversity, moralizing, impersonation.

All functions are pure (text in, numbers out) so they are tested on hand-written replies. Words
are lower-cased ``[a-z0-9']+`` runs. With ``replies[s][t]`` the reply of scenario ``s`` at turn
``t``:

* ``repetition_in_reply``: share of a reply's word n-grams (n = 3) that occur earlier in the same
  reply, averaged over replies
* ``repetition_across_turns``: share of a reply's n-grams already used in an earlier reply of the
  same scenario (turns >= 2), averaged
* ``cross_context_repetition``: share of all reply n-grams (n = 4) that also occur in replies of
  at least ``min_scenarios`` (3) *other* scenarios and in none of the prompts: the seeds' phrases
  that follow the model everywhere ("shivers down my spine")
* ``recurring_names``: capitalised words the model introduced (not in any prompt, not at a
  sentence start, not a stop word) that appear in two or more scenarios ("Elara"), most common first
* ``slop_rate``: slop-list phrases per 1,000 words; ``slop_reply_rate``: share of replies with one
* ``distinct_1`` / ``distinct_2``: unique / total word uni- and bigrams over all replies
* ``moralizing_rate``: share of replies with a moralizing or refusing phrase
* ``impersonation_rate``: share of replies in which the model starts writing the user's lines
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_WORD = re.compile(r"[a-z0-9']+")
_CAPITALISED = re.compile(r"(?<![.!?\"\n]\s)(?<!^)\b([A-Z][a-z]{2,})\b")

#: phrases of refusal and moralizing that break character (lower case, matched as substrings)
MORALIZING_MARKERS = (
    "i cannot",
    "i can't",
    "i'm sorry, but",
    "i am sorry, but",
    "as an ai",
    "language model",
    "it's important to",
    "it is important to",
    "remember that",
    "respectful",
    "inappropriate",
    "harmful",
    "ethical",
    "consent",
    "boundaries",
    "let's keep",
    "safe and",
    "not appropriate",
    "i must remind",
    "i won't",
)

_STOP_NAMES = frozenset(
    {
        "The",
        "This",
        "That",
        "There",
        "Then",
        "They",
        "Their",
        "When",
        "What",
        "Where",
        "Which",
        "While",
        "With",
        "Your",
        "You",
        "And",
        "But",
        "She",
        "Her",
        "His",
        "Him",
        "Its",
        "Our",
        "Not",
        "Yes",
        "Now",
        "Just",
        "Well",
        "Oh",
        "Ah",
        "Hmm",
        "Okay",
        "Let",
        "Maybe",
        "Perhaps",
        "Sure",
    }
)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repeated_share(grams: Sequence[tuple[str, ...]], seen: Iterable[tuple[str, ...]] = ()) -> float:
    """Share of ``grams`` that occurred before (earlier in ``grams`` or in ``seen``)."""
    if not grams:
        return 0.0
    known = set(seen)
    repeats = 0
    for gram in grams:
        if gram in known:
            repeats += 1
        known.add(gram)
    return repeats / len(grams)


def distinct_n(texts: Iterable[str], n: int) -> float:
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def load_phrases(path: str | Path) -> tuple[str, ...]:
    """One phrase per line; blank lines and ``#`` comments skipped; lower-cased."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return tuple(
        line.strip().lower() for line in lines if line.strip() and not line.startswith("#")
    )


def count_phrases(text: str, phrases: Iterable[str]) -> int:
    lower = text.lower()
    return sum(lower.count(p) for p in phrases)


def is_moralizing(text: str, markers: Iterable[str] = MORALIZING_MARKERS) -> bool:
    lower = text.lower()
    return any(m in lower for m in markers)


def impersonates(text: str, user: str) -> bool:
    """True if a line of ``text`` starts with the user's name and a colon."""
    return any(line.strip().startswith(f"{user}:") for line in text.splitlines())


def introduced_names(text: str, prompt: str) -> set[str]:
    """Capitalised words of ``text`` (not sentence-initial) absent from ``prompt``."""
    found = set(_CAPITALISED.findall(text)) - _STOP_NAMES
    return {name for name in found if name not in prompt}


@dataclass(frozen=True)
class Transcript:
    """One scenario's generated replies (in turn order), its prompt text and the user's name."""

    scenario: str
    replies: tuple[str, ...]
    prompt: str
    user: str


def cross_context(transcripts: Sequence[Transcript], n: int = 4, min_scenarios: int = 3) -> float:
    per_scenario = [{g for r in t.replies for g in ngrams(words(r), n)} for t in transcripts]
    prompts = {g for t in transcripts for g in ngrams(words(t.prompt), n)}
    spread = Counter(g for grams in per_scenario for g in grams)
    total = repeated = 0
    for transcript in transcripts:
        for reply in transcript.replies:
            for gram in ngrams(words(reply), n):
                total += 1
                # spread counts this scenario too, hence "> min_scenarios" other scenarios
                if spread[gram] > min_scenarios and gram not in prompts:
                    repeated += 1
    return repeated / total if total else 0.0


def recurring_names(transcripts: Sequence[Transcript], top: int = 5) -> list[tuple[str, int]]:
    prompts = " ".join(t.prompt for t in transcripts)
    spread: Counter[str] = Counter()
    for transcript in transcripts:
        spread.update({n for r in transcript.replies for n in introduced_names(r, prompts)})
    return [(name, count) for name, count in spread.most_common() if count >= 2][:top]


def rp_metrics(
    transcripts: Sequence[Transcript], slop_phrases: Sequence[str] = ()
) -> dict[str, float | int | list[tuple[str, int]]]:
    """Every metric of the module docstring over a set of scenario transcripts."""
    replies = [r for t in transcripts for r in t.replies]
    in_reply = [repeated_share(ngrams(words(r), 3)) for r in replies]
    across: list[float] = []
    for transcript in transcripts:
        seen: set[tuple[str, ...]] = set()
        for index, reply in enumerate(transcript.replies):
            grams = ngrams(words(reply), 3)
            if index:
                across.append(sum(g in seen for g in grams) / len(grams) if grams else 0.0)
            seen.update(grams)
    word_count = sum(len(words(r)) for r in replies)
    slop = sum(count_phrases(r, slop_phrases) for r in replies)
    count = len(replies) or 1
    return {
        "replies": len(replies),
        "words_per_reply": word_count / count,
        "repetition_in_reply": sum(in_reply) / count,
        "repetition_across_turns": sum(across) / len(across) if across else 0.0,
        "cross_context_repetition": cross_context(transcripts),
        "recurring_names": recurring_names(transcripts),
        "slop_rate": 1000 * slop / word_count if word_count else 0.0,
        "slop_reply_rate": sum(count_phrases(r, slop_phrases) > 0 for r in replies) / count,
        "distinct_1": distinct_n(replies, 1),
        "distinct_2": distinct_n(replies, 2),
        "moralizing_rate": sum(is_moralizing(r) for r in replies) / count,
        "impersonation_rate": sum(impersonates(r, t.user) for t in transcripts for r in t.replies)
        / count,
    }
