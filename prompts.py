"""Text prompt -> phrases to detect and the config label each one gets. Pure functions.

Grammar: phrases are separated by '.', ',', ';' or new lines. `brown cat_cats` means
"detect 'brown cat', label it 'cats'"; the part after an underscore is matched against the
config's labels, longest first, so labels may contain underscores (`red light_traffic_light`).
A phrase without a label part gets the label it names (case-insensitive, plural-tolerant,
also by its trailing words: 'brown cat' -> cats), or a label whose `predicted_values` lists it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from errors import PromptError

_SEPARATORS = re.compile(r"[.,;\n\r]+")
# The phrase text of "segment everything" (SAM's automatic masks): `*_label` labels every mask `label`; a bare `*`
# next to other phrases gives each mask the label of the detected box it overlaps most (pipeline.py).
EVERYTHING = "*"


@dataclass(frozen=True)
class Phrase:
    text: str  # what Grounding DINO looks for, lower case, single spaces
    label: str  # the config label its regions carry


@dataclass(frozen=True)
class PromptPlan:
    phrases: tuple[Phrase, ...]
    skipped: tuple[tuple[str, str], ...]  # (raw phrase, why it yields no region)


def _normalise(text: str) -> str:
    return " ".join(text.replace("_", " ").replace("-", " ").lower().split())


def _word_forms(word: str) -> set[str]:
    """Singular and plural spellings of one English word (cat/cats, box/boxes, city/cities)."""
    forms = {word, word + "s", word + "es"}
    if word.endswith("y"):
        forms.add(word[:-1] + "ies")
    if word.endswith("ies"):
        forms.add(word[:-3] + "y")
    if word.endswith("es"):
        forms.add(word[:-2])
    if word.endswith("s"):
        forms.add(word[:-1])
    return forms


def _same_name(a: str, b: str) -> bool:
    """Do two normalised names agree, allowing a plural on the last word?"""
    wa, wb = a.split(), b.split()
    if len(wa) != len(wb) or not wa:
        return False
    return wa[:-1] == wb[:-1] and bool(_word_forms(wa[-1]) & _word_forms(wb[-1]))


def _label_named(name: str, labels: Sequence[str], predicted_values: Mapping[str, Sequence[str]]) -> str | None:
    """The label that `name` (normalised) stands for: an exact label first, then plural forms,
    then predicted_values."""
    for label in labels:
        if _normalise(label) == name:
            return label
    for label in labels:
        if _same_name(_normalise(label), name):
            return label
    for label in labels:
        if any(_same_name(_normalise(v), name) for v in predicted_values.get(label, ())):
            return label
    return None


def match_label(name: str, labels: Sequence[str], predicted_values: Mapping[str, Sequence[str]] | None = None
                ) -> str | None:
    """The config label `name` stands for (exact, then case-insensitive and plural-tolerant), or None."""
    return _label_named(_normalise(name), labels, predicted_values or {})


def _label_for_text(text: str, labels: Sequence[str], predicted_values: Mapping[str, Sequence[str]]) -> str | None:
    """The label a phrase names as a whole, else by its longest trailing words ('brown cat' -> cats)."""
    words = text.split()
    for start in range(len(words)):
        label = _label_named(" ".join(words[start:]), labels, predicted_values)
        if label is not None:
            return label
    return None


def split_prompt(prompt: str) -> list[str]:
    """Raw phrases of a prompt, stripped, empty ones dropped, in order."""
    return [p.strip() for p in _SEPARATORS.split(prompt or "") if p.strip()]


def parse_prompt(
    prompt: str, labels: Sequence[str], predicted_values: Mapping[str, Sequence[str]] | None = None
) -> PromptPlan:
    """Map each phrase of `prompt` to (detection text, config label).

    Phrases whose label can't be found are returned in `skipped` with the reason;
    a repeated detection text keeps its first label.
    """
    predicted_values = predicted_values or {}
    phrases: dict[str, Phrase] = {}
    skipped: list[tuple[str, str]] = []
    for raw in split_prompt(prompt):
        phrase = _parse_phrase(raw, labels, predicted_values)
        if isinstance(phrase, str):
            skipped.append((raw, phrase))
        elif phrase.text not in phrases:
            phrases[phrase.text] = phrase
    return PromptPlan(tuple(phrases.values()), tuple(skipped))


def require_phrases(prompt: str, labels: Sequence[str],
                    predicted_values: Mapping[str, Sequence[str]] | None = None) -> PromptPlan:
    """parse_prompt, raising PromptError with every phrase's reason when no phrase maps to a label."""
    plan = parse_prompt(prompt, labels, predicted_values)
    if not plan.phrases:
        reasons = "; ".join(f"{p!r}: {why}" for p, why in plan.skipped) or "it has no phrase"
        raise PromptError(f"prompt {prompt!r} gives nothing to detect: {reasons}")
    if [(p.text, p.label) for p in plan.phrases] == [(EVERYTHING, "")]:
        raise PromptError(f"prompt {prompt!r}: a bare '*' takes its labels from the boxes of other phrases "
                          "('* . cat . house'); alone, write '*_<label>'")
    return plan


def prompt_labels(prompt: str) -> tuple[str, ...]:
    """The labels a prompt names by itself, for a labeling config made from it: the part after the first
    underscore of a `phrase_label` phrase, else the phrase itself ('brown cat_cats. house' -> cats, house)."""
    labels = []
    for raw in split_prompt(prompt):
        if raw.strip() == EVERYTHING:
            continue  # names no label
        text, _, label = raw.partition("_")
        name = " ".join((label if label.strip() and text.strip() else raw.replace("_", " ")).split())
        if name:
            labels.append(name)
    return tuple(dict.fromkeys(labels))


def _parse_phrase(raw: str, labels: Sequence[str], predicted_values: Mapping[str, Sequence[str]]) -> Phrase | str:
    """A Phrase, or the reason (str) why `raw` yields none."""
    if raw.strip().startswith(EVERYTHING):
        return _everything_phrase(raw, labels, predicted_values)
    whole = _normalise(raw)
    if not whole:
        return "it is empty"
    # A phrase that is itself a label ("traffic_light") detects that label's words.
    label = _label_named(whole, labels, predicted_values)
    if label is not None:
        return Phrase(whole, label)
    if "_" in raw:
        # Leftmost underscore first = longest label part first.
        positions = [i for i, ch in enumerate(raw) if ch == "_"]
        for i in positions:
            text, name = _normalise(raw[:i]), _normalise(raw[i + 1 :])
            if not text or not name:
                continue
            label = _label_named(name, labels, predicted_values)
            if label is not None:
                return Phrase(text, label)
        asked = raw[positions[-1] + 1 :].strip()
        return f"label {asked!r} is not in the labeling config (labels: {', '.join(labels) or 'none'})"
    label = _label_for_text(whole, labels, predicted_values)
    if label is not None:
        return Phrase(whole, label)
    return (
        f"it names no label of the labeling config (labels: {', '.join(labels) or 'none'}); "
        f"write it as '{whole}_<label>'"
    )


def _everything_phrase(raw: str, labels: Sequence[str], predicted_values: Mapping[str, Sequence[str]]) -> Phrase | str:
    """`*` -> Phrase("*", "") (labels from the detected boxes); `*_label` -> Phrase("*", label); else a reason."""
    rest = raw.strip()[len(EVERYTHING):].strip()
    if not rest:
        return Phrase(EVERYTHING, "")
    if not rest.startswith("_") or not _normalise(rest[1:]):
        return f"segment everything is written '*' or '*_<label>', got {raw.strip()!r}"
    label = _label_named(_normalise(rest[1:]), labels, predicted_values)
    if label is None:
        return f"label {rest[1:].strip()!r} is not in the labeling config (labels: {', '.join(labels) or 'none'})"
    return Phrase(EVERYTHING, label)
