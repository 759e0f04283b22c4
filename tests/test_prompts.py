"""The one prompt generator writes GenEval's own wording (prompts/create_prompts.py): every example below is a
line of GenEval's shipped generation_prompts.txt, and each template is checked against GenEval's phrasing."""
import re

import data

# real lines of GenEval's generation_prompts.txt, one or more per template, with the objects and colours they use
GENEVAL_LINES = {
    "single_object": ["a photo of a bench", "a photo of a cow", "a photo of an apple", "a photo of an umbrella"],
    "two_object": ["a photo of a bench and a sports ball", "a photo of a toaster and an oven",
                   "a photo of a fork and a knife"],
    "counting": ["a photo of two clocks", "a photo of four handbags", "a photo of three sports balls",
                 "a photo of two sheeps", "a photo of two benchs", "a photo of three buses"],
    "colors": ["a photo of a blue fire hydrant", "a photo of a pink car", "a photo of an orange computer mouse"],
    "position": ["a photo of a dog right of a teddy bear", "a photo of a wine glass above a kite",
                 "a photo of a couch below a cup", "a photo of a laptop left of a cow"],
    "color_attr": ["a photo of a purple wine glass and a black apple", "a photo of a green bus and a purple microwave"],
}
OBJECTS = ["bench", "cow", "apple", "umbrella", "sports ball", "toaster", "oven", "fork", "knife", "clock", "handbag",
           "sheep", "bus", "fire hydrant", "car", "computer mouse", "dog", "teddy bear", "wine glass", "kite", "couch",
           "cup", "laptop", "microwave", "person"]


def test_every_genevals_line_is_generated_word_for_word():
    every = set(data.training_prompts(None, objects=OBJECTS))
    for tag, lines in GENEVAL_LINES.items():
        for line in lines:
            assert line in every, (tag, line)


def test_articles_plurals_and_relations_follow_genevals_rules():
    assert [data.with_article(w) for w in ("apple", "orange", "umbrella", "oven", "bench", "person")] == \
        ["an apple", "an orange", "an umbrella", "an oven", "a bench", "a person"]
    # GenEval's naive plural: "es" only after a final s
    assert [data.plural(w) for w in ("bus", "bench", "sheep", "knife", "wine glass", "person")] == \
        ["buses", "benchs", "sheeps", "knifes", "wine glasses", "persons"]
    every = data.training_prompts(None, objects=["apple", "bus", "person"], colors=["orange", "red"])
    relations = {m.group(1) for p in every for m in [re.fullmatch(r"a photo of an? \w+ (.+) an? \w+", p)] if m
                 and " and " not in p}
    assert relations == {"left of", "right of", "above", "below"}
    counts = {p.split()[3] for p in every if re.fullmatch(r"a photo of (two|three|four) \w+", p)}
    assert counts == {"two", "three", "four"}
    assert "a photo of an orange person" not in every and "a photo of an orange apple" in every   # no coloured person
    assert "a photo of a red apple and a red bus" not in every        # two different colours in an attribution
    assert all(p == p.lower() and p.startswith("a photo of ") and not p.endswith(".") for p in every)
