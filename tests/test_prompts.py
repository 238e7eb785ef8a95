import pytest

from prompts import Phrase, parse_prompt, split_prompt

LABELS = ["cats", "house", "traffic_light", "Person", "box"]
PREDICTED = {"cats": ("kitty", "feline")}


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("brown cat_cats", [("brown cat", "cats")]),
        ("brown cat_cats. house", [("brown cat", "cats"), ("house", "house")]),
        ("round thing_cats. box_house", [("round thing", "cats"), ("box", "house")]),
        # separators: '.', ',', ';' and new lines
        ("cat, house; person\nbox", [("cat", "cats"), ("house", "house"), ("person", "Person"), ("box", "box")]),
        # labels with underscores: longest label part first
        ("red light_traffic_light", [("red light", "traffic_light")]),
        ("traffic_light", [("traffic light", "traffic_light")]),
        # a phrase naming a label by its trailing words
        ("red traffic light", [("red traffic light", "traffic_light")]),
        ("brown cat", [("brown cat", "cats")]),
        # case-insensitive and plural-tolerant both ways
        ("CAT", [("cat", "cats")]),
        ("houses", [("houses", "house")]),
        ("persons", [("persons", "Person")]),
        ("boxes", [("boxes", "box")]),
        ("fluffy thing_CAT", [("fluffy thing", "cats")]),
        # predicted_values
        ("kitty", [("kitty", "cats")]),
        ("black feline", [("black feline", "cats")]),
        # duplicates keep the first label; blanks vanish
        ("cat_cats. cat_house", [("cat", "cats")]),
        (" . ,; \n", []),
        ("", []),
    ],
)
def test_phrases_and_labels(prompt, expected):
    plan = parse_prompt(prompt, LABELS, PREDICTED)
    assert [(p.text, p.label) for p in plan.phrases] == expected
    assert plan.skipped == ()


@pytest.mark.parametrize(
    "prompt, skipped_phrase, reason_part",
    [
        ("brown dog_dogs", "brown dog_dogs", "label 'dogs' is not in the labeling config"),
        ("tree", "tree", "names no label"),
        ("house. tree", "tree", "write it as 'tree_<label>'"),
    ],
)
def test_unknown_phrases_are_skipped_with_a_reason(prompt, skipped_phrase, reason_part):
    plan = parse_prompt(prompt, LABELS, PREDICTED)
    (phrase, reason), = plan.skipped
    assert phrase == skipped_phrase
    assert reason_part in reason
    assert "cats" in reason  # names the labels that do exist
    assert all(p.label in LABELS for p in plan.phrases)


def test_skipped_and_kept_together_keep_order():
    plan = parse_prompt("tree. house. brown cat_cats. dog_dogs", LABELS)
    assert plan.phrases == (Phrase("house", "house"), Phrase("brown cat", "cats"))
    assert [p for p, _ in plan.skipped] == ["tree", "dog_dogs"]


def test_split_prompt():
    assert split_prompt("a.. b ,c;\n\nd") == ["a", "b", "c", "d"]
    assert split_prompt(None) == []
