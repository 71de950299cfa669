"""Rule-based failure categories of a prompt (text, style, composition, counting, creative,
location, colors, spatial): which text-to-image failure modes the prompt is exposed to.

A prompt gets every category whose cue it contains, in :data:`CATEGORIES` order; a prompt
with no cue is ``counting`` when it is a plain "<quantity> <object>" phrase, else
``creative``. The categories choose the few-shot examples of the LLM request.
"""
from __future__ import annotations

import re

from tn_ray.prompts.quantities import parse

CATEGORIES = ("text", "style", "composition", "counting", "creative", "location", "colors", "spatial")

_NUMBERS = ("one two three four five six seven eight nine ten eleven twelve dozen dozens several "
            "couple pair pairs few many multiple single").split()
_COLORS = ("red green blue yellow purple pink brown black white gray grey violet cyan magenta "
           "golden silver beige turquoise teal maroon navy colored coloured colorful colourful").split()
_STYLE = ("painting painted paint watercolor watercolour oil sketch sketched drawing drawn cartoon anime "
          "manga comic style illustration illustrated pixel render rendered 3d digital art artwork "
          "impressionist cubist surrealist baroque renaissance vintage retro poster sticker pencil crayon "
          "charcoal ink pastel lego origami claymation mosaic graffiti").split()
_PLACES = ("forest jungle ocean sea beach desert city street road mountain mountains park garden field "
           "meadow river lake pond island snow space moon mars kitchen room bedroom office library "
           "museum classroom farm village town cave sky underwater table grass savannah tundra "
           "rainforest countryside paris london tokyo new york").split()
_CREATIVE = ["made of", "texture of", "in the shape of", *("astronaut dragon unicorn robot alien wizard fantasy "
                                                           "surreal "
              "magical dream dreamlike futuristic cyberpunk steampunk shaped floating flying wearing riding "
              "dressed giant tiny glowing").split()]
_SPATIAL = (
    r"on top of|to the left of|to the right of|on the left of|on the right of|left of|right of|"
    r"above|below|under|underneath|beneath|behind|in front of|next to|beside|between|inside|"
    r"atop|on the left|on the right"
)
_TEXT = (
    r"['\"\u2018\u2019\u201c\u201d]|\b(?:sign|says|saying|written|writing|reads|text|word|words"
    r"|letters|lettering|logo|title|caption|spelled|spelling|label|font|typography)\b"
)


def _words(options) -> re.Pattern:
    return re.compile(r"\b(?:%s)\b" % "|".join(re.escape(o) for o in options), re.IGNORECASE)


_CUES: dict[str, re.Pattern] = {
    "text": re.compile(_TEXT, re.IGNORECASE),
    "style": _words(_STYLE),
    "composition": re.compile(r"\b(?:and|with|together|beside each other)\b|&", re.IGNORECASE),
    "counting": re.compile(r"\b(?:%s)\b|\b\d+\b" % "|".join(_NUMBERS), re.IGNORECASE),
    "creative": re.compile(r"\b(?:%s)\b|\w-like\b" % "|".join(re.escape(c) for c in _CREATIVE), re.IGNORECASE),
    "location": _words(_PLACES),
    # "orange" is a colour only before another word and not after an article ("an orange" is a fruit)
    "colors": re.compile(r"\b(?:%s)\b|(?<!\ban )(?<!\ba )\borange\s+(?!and\b)[a-z]" % "|".join(_COLORS), re.IGNORECASE),
    "spatial": re.compile(r"\b(?:%s)\b" % _SPATIAL, re.IGNORECASE),
}


def categorize(prompt: str) -> list[str]:
    """The failure categories of ``prompt`` (at least one), in :data:`CATEGORIES` order."""
    found = [c for c in CATEGORIES if _CUES[c].search(prompt)]
    if found:
        return found

    return ["counting"] if parse(prompt) is not None else ["creative"]
