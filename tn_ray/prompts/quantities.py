"""Quantity phrases in prompts: find "<quantity> <object>" slots, re-render them.

A prompt such as "a realistic photo of three deer" or "One cat and two dogs sitting on the
grass." is split into a prefix, one or two slots (quantity word + noun phrase) and a
suffix. Plurals and articles come from ``inflect`` (irregular nouns: deer, sheep, people,
knives, mice...), so a slot can be rendered with any other quantity or object.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

MAX_NUMBER_WORD = 20
# words that end a noun phrase: what follows is the prompt's suffix, kept as it is
BOUNDARY_WORDS = frozenset("""
    a an the and or of in on at with by for from to into onto over under near behind above below beside
    between inside outside next through across against along around during while that which who whose
    is are was were be sitting standing lying running walking flying playing eating holding wearing
    riding swimming jumping sleeping looking made covered filled parked floating hanging
""".split())


@lru_cache(maxsize=1)
def _engine():
    import inflect

    return inflect.engine()


@lru_cache(maxsize=1)
def number_words() -> dict[str, int]:
    words = {_engine().number_to_words(i): i for i in range(1, MAX_NUMBER_WORD + 1)}
    return {"a": 1, "an": 1, **words}


def _qty_pattern() -> str:
    words = sorted(number_words(), key=len, reverse=True)
    return r"(?:%s|\d+)" % "|".join(words)


def _np_pattern(name: str) -> str:
    # one to three words, none a boundary word (checked after matching), shortest first
    return rf"(?P<{name}>[A-Za-z][\w'-]*(?:\s+[A-Za-z][\w'-]*){{0,2}}?)"


_SUFFIX = r"(?P<suffix>(?:\s*[,;:].*|\s+(?:%s)\b.*)?[.!?]?)" % "|".join(sorted(BOUNDARY_WORDS))


@lru_cache(maxsize=1)
def _patterns() -> tuple[re.Pattern, re.Pattern]:
    q = _qty_pattern()
    pair = re.compile(rf"^(?P<prefix>(?:.*\s)?)(?P<q1>{q})\s+{_np_pattern('n1')}\s+and\s+(?P<q2>{q})\s+"
                      rf"{_np_pattern('n2')}{_SUFFIX}$", re.IGNORECASE | re.DOTALL)
    single = re.compile(rf"^(?P<prefix>(?:.*\s)?)(?P<q1>{q})\s+{_np_pattern('n1')}{_SUFFIX}$",
                        re.IGNORECASE | re.DOTALL)
    return pair, single


@lru_cache(maxsize=4096)
def singular(noun: str) -> str:
    """Singular of a (possibly multi-word) noun phrase; unchanged if already singular."""
    return _engine().singular_noun(noun) or noun


@lru_cache(maxsize=4096)
def plural(noun: str) -> str:
    return _engine().plural_noun(noun)


@lru_cache(maxsize=4096)
def with_article(noun: str) -> str:
    """"a deer", "an apple" (inflect's a/an rules)."""
    return _engine().a(noun)


@dataclass(frozen=True)
class Slot:
    """One "<quantity> <noun>" phrase: the count, the singular noun and x0's own words."""

    count: int
    noun: str  # singular form
    text: str = ""  # the phrase as x0 wrote it ("three deer"); "" for a new slot


@dataclass(frozen=True)
class QuantityPrompt:
    """``prefix + slot ( + " and " + slot) + suffix``, re-rendered with other slots."""

    prefix: str
    slots: tuple[Slot, ...]
    suffix: str
    one_as_word: bool  # x0 writes 1 as "one" (else "a"/"an")
    digits: bool  # x0 writes counts as digits
    capital: bool  # the first slot opens the prompt with a capital letter

    def with_slot(self, i: int, count: int | None = None, noun: str | None = None) -> tuple[Slot, ...]:
        """The slots with slot ``i`` given another count and/or noun."""
        slots = list(self.slots)
        slots[i] = Slot(count=self.slots[i].count if count is None else count,
                        noun=self.slots[i].noun if noun is None else noun)
        return tuple(slots)

    def render(self, slots: tuple[Slot, ...] | None = None) -> str:
        slots = self.slots if slots is None else slots
        parts = [self._phrase(i, s) for i, s in enumerate(slots)]
        return self.prefix + " and ".join(parts) + self.suffix

    def _phrase(self, i: int, slot: Slot) -> str:
        if i < len(self.slots) and (slot.count, slot.noun) == (self.slots[i].count, self.slots[i].noun):
            return self.slots[i].text  # unchanged: x0's own words
        if slot.count == 1 and not (self.one_as_word or self.digits):
            phrase = with_article(slot.noun)
        else:
            qty = str(slot.count) if self.digits else _engine().number_to_words(slot.count)
            phrase = f"{qty} {slot.noun if slot.count == 1 else plural(slot.noun)}"
        return _capitalize(phrase) if i == 0 and self.capital else phrase


def _capitalize(s: str) -> str:
    return s[:1].upper() + s[1:]


def _valid_np(np_text: str) -> bool:
    words = np_text.lower().split()
    return bool(words) and not any(w in BOUNDARY_WORDS or w in number_words() for w in words)


def _count(word: str) -> int:
    return int(word) if word.isdigit() else number_words()[word.lower()]


def parse(prompt: str) -> QuantityPrompt | None:
    """Split ``prompt`` into prefix, one or two quantity slots and suffix; None if it has none.

    The pair form "<q> <X> and <q> <Y>" is tried first; otherwise the last "<q> <X>" of the
    prompt is the slot (so "a realistic photo of three deer" has prefix "a realistic photo of ").
    """
    text = prompt.strip()
    pair, single = _patterns()
    for pattern, names in ((pair, ("1", "2")), (single, ("1",))):
        m = pattern.match(text)
        if not m or not all(_valid_np(m.group(f"n{i}")) for i in names):
            continue
        slots, words = [], []
        for i in names:
            word, noun = m.group(f"q{i}"), re.sub(r"\s+", " ", m.group(f"n{i}"))
            count = _count(word)
            if count == 0:
                return None
            words.append(word)
            slots.append(Slot(count=count, noun=noun if count == 1 else singular(noun), text=f"{word} {noun}"))
        lower = [w.lower() for w in words]
        return QuantityPrompt(prefix=m.group("prefix"), slots=tuple(slots), suffix=m.group("suffix"),
                              one_as_word="one" in lower, digits=any(w.isdigit() for w in lower),
                              capital=m.group("prefix") == "" and words[0][:1].isupper())
    return None
