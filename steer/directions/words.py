"""Target words of a sweep: the words whose next-token probability measures a vector's effect.

The user's words (``--positive-words``), else the words that most tell the two sides' examples
apart (in most of one side's examples, in few of the other's), each counted through its
single-token spellings (``" word"``, ``" Word"``, ``"Word"``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from steer.directions.recipe import SweepSection
from steer.errors import InvalidArgumentError

#: words derived from the data, per side
DERIVED_WORDS = 8
_WORD = re.compile(r"[a-z][a-z']+")


@dataclass(frozen=True)
class TargetWords:
    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    positive_ids: tuple[int, ...] = ()
    negative_ids: tuple[int, ...] = ()
    #: where the words come from: "given", "derived from the examples" or "recorded in the
    #: artifact"
    source: str = "given"

    @property
    def usable(self) -> bool:
        return bool(self.positive_ids and self.negative_ids)

    def record(self) -> dict[str, Any]:
        return {
            "positive": list(self.positive),
            "negative": list(self.negative),
            "source": self.source,
        }


def word_ids(tokenizer: Any, words: Sequence[str]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The words with at least one single-token spelling, and those tokens' ids."""
    kept, ids = [], set()
    for word in words:
        found = set()
        for spelling in (f" {word}", f" {word.capitalize()}", word.capitalize(), word):
            encoded = tokenizer(spelling, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1:
                found.add(int(encoded[0]))
        if found:
            kept.append(word)
            ids |= found
    return tuple(kept), tuple(sorted(ids))


#: words too common to tell two sets of examples apart (function words and chat filler)
STOPWORDS = frozenset(
    " ".join(
        (
            "about above after again against all also although always among and another any",
            "are aren't around because been before being below between both but can can't",
            "cannot could couldn't did didn't does doesn't doing don't down during each either",
            "even ever every few for from further had hadn't has hasn't have haven't having her",
            "here hers herself him himself his how however i'd i'll i'm i've into isn't it's its",
            "itself just let's like made make many may might more most much must myself never",
            "not now off once one only onto other others our ours ourselves out over own same",
            "she she'd she'll she's should shouldn't since some still such than that that's the",
            "their theirs them themselves then there there's these they they'd they'll they're",
            "they've this those though through thus too under until upon very was wasn't we'd",
            "we'll we're we've were weren't what what's when where which while who whom whose",
            "why will with within without won't would wouldn't yet you you'd you'll you're",
            "you've your yours yourself yourselves dear name tell write describe today going",
            "get got use used really",
        )
    ).split()
)


def _document_counts(texts: Sequence[str]) -> Counter[str]:
    """In how many of ``texts`` each content word occurs."""
    return Counter(
        word
        for text in texts
        for word in set(_WORD.findall(text.lower()))
        if len(word) >= 3 and word not in STOPWORDS
    )


def derive_words(
    prompts: tuple[Sequence[str], Sequence[str]],
    replies: tuple[Sequence[str], Sequence[str]] = ((), ()),
    limit: int = DERIVED_WORDS,
) -> tuple[list[str], list[str]]:
    """Per side, the content words found in more of its examples than of the other side's,
    most telling first. A word in a prompt counts twice (the user wrote it to say what the
    side is; paired prompts that differ only in their mood words yield exactly those), one in
    the model's reply once."""
    counts = [
        _document_counts(prompts[i]) + _document_counts(prompts[i]) + _document_counts(replies[i])
        for i in (0, 1)
    ]
    out = []
    for mine, theirs in ((counts[0], counts[1]), (counts[1], counts[0])):
        scored = [(n - theirs[w], n, w) for w, n in mine.items() if n > theirs[w]]
        out.append([w for _gap, _n, w in sorted(scored, key=lambda s: (-s[0], -s[1], s[2]))])
    return out[0][:limit], out[1][:limit]


def target_words(
    tokenizer: Any,
    section: SweepSection,
    prompts: tuple[Sequence[str], Sequence[str]],
    replies: tuple[Sequence[str], Sequence[str]] = ((), ()),
) -> TargetWords:
    """The recipe's words (an error if a side has none the tokenizer spells in one token),
    else words derived from the two sides' ``prompts`` and ``replies``."""
    derived = not section.positive_words
    if derived:
        positive, negative = derive_words(prompts, replies, limit=4 * DERIVED_WORDS)
    else:
        positive, negative = list(section.positive_words), list(section.negative_words)
    sides = []
    for name, words in (("positive", positive), ("negative", negative)):
        kept, ids = word_ids(tokenizer, words)
        if not ids and not derived:
            raise InvalidArgumentError(
                f"none of {list(words)} is a single token for this model's tokenizer; "
                "give whole common words",
                field=f"sweep.{name}_words",
            )
        sides.append((kept[:DERIVED_WORDS] if derived else kept, ids))
    if derived:  # the ids of the words kept
        sides = [(kept, word_ids(tokenizer, kept)[1]) for kept, _ids in sides]
    source = "derived from the examples" if derived else "given"
    return TargetWords(sides[0][0], sides[1][0], sides[0][1], sides[1][1], source)
