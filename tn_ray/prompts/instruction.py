"""The LLM request: system instruction and few-shot examples chosen by failure category.

The instruction and the examples are this project's own, written in the spirit of common
text-to-image failure cases (one or two per category). :data:`INSTRUCTION_VERSION` hashes
them, so editing either invalidates the answer cache.

The paper's own request (Kim et al., ICLR 2024, Appendix D) is the ``paper`` preset:
:data:`PAPER_SYSTEM` and :data:`PAPER_EXAMPLES` are Algorithm 1's system prompt and Table 19's
few-shot examples copied verbatim, and :func:`paper_messages` assembles them as Algorithm 1
does (each category's block appended to the system message, then x0 as the user message).
"""
from __future__ import annotations

import hashlib
import json

from tn_ray.prompts.categories import categorize

SYSTEM = """You write contrastive prompts for testing whether an image matches a text prompt.
Given a prompt x0, write {n} prompts that stay syntactically close to x0 (same structure, mostly the
same words) but mean something different, so that an image generated for one of them would NOT
match x0. Change one or two details at a time, preferring the details text-to-image models get
wrong: the number of objects, which objects appear, their colours, their positions relative to
each other, the place, the words written in the image, the art style. Never repeat x0 and never
paraphrase it with the same meaning. Answer with a numbered list of {n} prompts, one per line,
and nothing else."""

# (x0, contrastive prompts): two per category, the first is preferred
EXAMPLES: dict[str, list[tuple[str, list[str]]]] = {
    "text": [
        (
            "a storefront sign that reads 'OPEN 24 HOURS'",
            [
                "a storefront sign that reads 'CLOSED 24 HOURS'",
                "a storefront sign that reads 'OPEN 12 HOURS'",
                "a storefront sign that reads 'OPEN 24 HOUSES'",
                "a storefront sign that reads 'PEN 24 HOURS'",
                "a blank storefront sign",
                "a storefront sign that reads 'OPEN 42 HOURS'",
            ],
        ),
        (
            "a birthday cake with 'Happy 30th Mia' written in icing",
            [
                "a birthday cake with 'Happy 40th Mia' written in icing",
                "a birthday cake with 'Happy 30th Max' written in icing",
                "a birthday cake with 'Happy Birthday' written in icing",
                "a birthday cake with no writing on it",
                "a wedding cake with 'Happy 30th Mia' written in icing",
            ],
        ),
    ],
    "style": [
        (
            "a watercolor painting of a lighthouse at dusk",
            [
                "an oil painting of a lighthouse at dusk",
                "a pencil sketch of a lighthouse at dusk",
                "a photograph of a lighthouse at dusk",
                "a pixel-art image of a lighthouse at dusk",
                "a watercolor painting of a windmill at dusk",
                "a watercolor painting of a lighthouse at noon",
            ],
        ),
        (
            "a fox in the style of Japanese woodblock prints",
            [
                "a fox in the style of cubist paintings",
                "a fox in the style of a children's cartoon",
                "a photo of a fox",
                "a wolf in the style of Japanese woodblock prints",
                "a fox in the style of pop art posters",
            ],
        ),
    ],
    "composition": [
        (
            "a cat and a teapot on a wooden table",
            [
                "a cat on a wooden table",
                "a teapot on a wooden table",
                "two cats and a teapot on a wooden table",
                "a dog and a teapot on a wooden table",
                "a cat and a vase on a wooden table",
                "a cat-shaped teapot on a wooden table",
            ],
        ),
        (
            "a violin and a trumpet lying on a bed",
            [
                "a violin lying on a bed",
                "two violins and a trumpet lying on a bed",
                "a guitar and a trumpet lying on a bed",
                "a violin and a drum lying on a bed",
                "a violin and a trumpet lying on the floor",
            ],
        ),
    ],
    "counting": [
        (
            "a photo of four red apples",
            [
                "a photo of three red apples",
                "a photo of five red apples",
                "a photo of one red apple",
                "a photo of two red apples",
                "a photo of four green apples",
                "a photo of four red tomatoes",
            ],
        ),
        (
            "two children flying kites on a hill",
            [
                "one child flying a kite on a hill",
                "three children flying kites on a hill",
                "five children flying kites on a hill",
                "two children flying one kite on a hill",
                "two dogs chasing kites on a hill",
            ],
        ),
    ],
    "creative": [
        (
            "an astronaut riding a horse on the moon",
            [
                "a horse riding an astronaut on the moon",
                "an astronaut walking next to a horse on the moon",
                "an astronaut riding a horse in a desert",
                "a cowboy riding a horse on the moon",
                "an astronaut riding a camel on the moon",
                "an astronaut riding a bicycle on the moon",
            ],
        ),
        (
            "a teapot made of ice",
            [
                "a teapot made of glass",
                "a teapot made of wood",
                "a block of ice shaped like a kettle",
                "a teapot full of ice",
                "a cup made of ice",
            ],
        ),
    ],
    "location": [
        (
            "a red fox in a snowy forest",
            [
                "a red fox in a desert",
                "a red fox on a sandy beach",
                "a red fox in a city street",
                "a red fox in a green summer forest",
                "a red fox in a living room",
                "a gray wolf in a snowy forest",
            ],
        ),
        (
            "a rowing boat on a calm lake",
            [
                "a rowing boat on a stormy sea",
                "a rowing boat on a beach",
                "a rowing boat in a garage",
                "a sailboat on a calm lake",
                "a rowing boat on a frozen lake",
            ],
        ),
    ],
    "colors": [
        (
            "a blue car parked next to a yellow fire hydrant",
            [
                "a yellow car parked next to a blue fire hydrant",
                "a red car parked next to a yellow fire hydrant",
                "a blue car parked next to a red fire hydrant",
                "a blue truck parked next to a yellow fire hydrant",
                "a black and white photo of a car next to a fire hydrant",
            ],
        ),
        (
            "a green umbrella",
            [
                "a red umbrella",
                "a blue umbrella",
                "a green and white striped umbrella",
                "a green raincoat",
                "a black umbrella",
            ],
        ),
    ],
    "spatial": [
        (
            "a book on top of a laptop",
            [
                "a laptop on top of a book",
                "a book under a laptop",
                "a book next to a laptop",
                "a book to the left of a laptop",
                "a mug on top of a laptop",
                "a book inside a laptop bag",
            ],
        ),
        (
            "a dog to the left of a bicycle",
            [
                "a dog to the right of a bicycle",
                "a dog behind a bicycle",
                "a dog riding a bicycle",
                "a bicycle to the left of a dog",
                "a cat to the left of a bicycle",
            ],
        ),
    ],
}

INSTRUCTION_VERSION = "v1-" + hashlib.sha256(json.dumps([SYSTEM, EXAMPLES], sort_keys=True).encode()).hexdigest()[:10]


def examples_for(x0: str, max_examples: int) -> list[tuple[str, list[str]]]:
    """Few-shot examples for x0: the first example of each of its categories, then the second."""
    cats = categorize(x0)
    chosen = [EXAMPLES[c][rank] for rank in range(2) for c in cats if rank < len(EXAMPLES[c])]
    return [e for e in chosen if e[0] != x0][:max_examples]


def numbered(prompts: list[str]) -> str:
    return "\n".join(f"{i}. {p}" for i, p in enumerate(prompts, 1))


def messages(x0: str, n_prompts: int, max_examples: int) -> list[dict[str, str]]:
    """Chat messages: system instruction, few-shot (user x0 -> assistant list) pairs, then x0."""
    out = [{"role": "system", "content": SYSTEM.format(n=n_prompts)}]
    for ex_x0, ex_prompts in examples_for(x0, max_examples):
        out += [{"role": "user", "content": ex_x0}, {"role": "assistant", "content": numbered(ex_prompts)}]
    out.append({"role": "user", "content": x0})
    return out


# ---- the paper's request (Appendix D: Algorithm 1 and Table 19), verbatim ---------------------

PAPER_MODEL = "gpt-4-0613"
PAPER_PARAMS = {"temperature": 0.0, "frequency_penalty": 0.2}
PAPER_SYSTEM = (
    "Create captions that are different from the original input used for the text-to-image generation "
    "model, referencing the provided failure cases. The new captions should offer perspectives that are "
    "distinct from the original context of the images. Ensure that each contrasting caption provides a "
    "distinct perspective, while maintaining the integrity of the image's subject matters. Let's think "
    "step "
    "by step."
)
# Table 19: one example per category, {"original_prompt", "proper_candidates"} as Algorithm 1 reads them
PAPER_EXAMPLES: dict[str, list[dict]] = {
    "text": [
        {
            "original_prompt": "A sign that says \u2018Diffusion\u2019.",
            "proper_candidates": [
                "A sign misspelled as \u2018Difision\u2019.",
                "A sign containing a bizarre accent \u2018Dif\u0161ion\u2019.",
            ],
        }
    ],
    "style": [
        {
            "original_prompt": "Greek statue of a man tripping over a cat.",
            "proper_candidates": [
                "Greek statue of a man",
                "Greek statue of two men",
                "Greek statue of two men tripping over a cat.",
                "Greek statue of a man tripping over a dog.",
                "Greek statue of two men tripping over a dog.",
                "Greek statue of a man tripping over a ball.",
            ],
        }
    ],
    "composition": [
        {
            "original_prompt": "A red car and a white sheep.",
            "proper_candidates": [
                "A red car and two white sheep.",
                "A red car and a herd of sheep.",
                "A red car and a dominant white sheep among the gray ones.",
                "A red car with two real sheep on the side.",
            ],
        }
    ],
    "counting": [
        {
            "original_prompt": "Four cars on the street.",
            "proper_candidates": [
                "Two cars on the street.",
                "Three cars on the street.",
                "Five cars on the street.",
                "Six cars on the street.",
            ],
        }
    ],
    "creative": [
        {
            "original_prompt": "A heart made of chocolate",
            "proper_candidates": [
                "a star made of caramel",
                "a flower made of marshmallows",
                "a diamond made of gummy bears",
                "a moon made of licorice",
                "a sun made of jelly beans",
                "a butterfly made of lollipops",
                "a crown made of cotton candy",
                "a rainbow made of skittles",
                "a cloud made of cotton candy",
                "a tree made of chocolate-covered pretzels",
                "a snowflake made of peppermint candies",
                "a fish made of sour gummies",
                "a bird made of chocolate-covered almonds",
                "a car made of chocolate bars",
                "a house made of chocolate cookies",
                "a boat made of chocolate-covered strawberries",
                "an airplane made of chocolate truffles",
                "a guitar made of chocolate wafer sticks",
                "a camera made of chocolate coins",
                "a dinosaur made of chocolate eggs",
            ],
        }
    ],
    "location": [
        {
            "original_prompt": "A glowing mushroom in the forest",
            "proper_candidates": [
                "a sparkling flower in the garden",
                "a luminous firefly in the night sky",
                "a shimmering starfish in the ocean",
                "a radiant sunflower in the field",
                "a glowing jellyfish in the deep sea",
                "a gleaming diamond in the jewelry store",
                "a luminescent moon in the night sky",
                "a glowing firefly in the meadow",
                "a sparkling gemstone in the cave",
                "a luminous butterfly in the garden",
                "a shimmering seashell on the beach",
                "a radiant rainbow in the sky",
                "a glowing lantern in the dark",
                "a luminescent lightning bug in the field",
                "a sparkling crystal in the cave",
                "a shimmering waterfall in the forest",
                "a radiant star in the night sky",
                "a glowing firefly in the park",
                "a luminous pearl in the oyster",
                "a sparkling diamond in the jewelry box",
            ],
        }
    ],
    "colors": [
        {
            "original_prompt": "A blue bird and a brown bear.",
            "proper_candidates": [
                "A pair of bears, one blue and the other brown.",
                "A blue bear and a brown bear, no bird in sight.",
                "Two bears, both brown, no blue bird.",
                "Two bears, one brown and the other unexpectedly blue.",
            ],
        }
    ],
    "spatial": [
        {
            "original_prompt": "An umbrella on top of a spoon.",
            "proper_candidates": [
                "A spoon.",
                "An umbrella.",
                "An umbrella on the right of a spoon.",
                "An umbrella on the left of a spoon.",
                "An umbrella at the bottom of a spoon.",
                "Two umbrellas on top of a spoon.",
            ],
        }
    ],
}
PAPER_INSTRUCTION_VERSION = (
    "paper-" + hashlib.sha256(json.dumps([PAPER_SYSTEM, PAPER_EXAMPLES], sort_keys=True).encode()).hexdigest()[:10]
)
_ONE = ("a", "an", "one")


def paper_categories(x0: str) -> list[str]:
    """Algorithm 1's ``category_allocation`` (the paper does not give it): this project's rule-based
    categories, plus ``counting`` for a prompt that names one object with "a"/"an"/"one" (an implicit
    count of one), which gives Appendix D's example "A black colored car" its colors and counting."""
    cats = categorize(x0)
    words = x0.strip().lower().split()
    if "counting" not in cats and words and words[0] in _ONE:
        cats = [*cats, "counting"]
    return cats


def paper_messages(x0: str, categories: list[str] | None = None) -> list[dict[str, str]]:
    """Algorithm 1's ``messages`` for x0: the system prompt followed by each category's few-shot block
    (``category[`` / ``Original prompt:..`` / ``Contrasting captions:1. ..`` / ``]``), then x0."""
    content = PAPER_SYSTEM
    for category in paper_categories(x0) if categories is None else categories:
        block = category + "[\n"
        for example in PAPER_EXAMPLES[category]:
            block += "Original prompt:" + example["original_prompt"] + "\n"
            block += "Contrasting captions:"
            for idx, caption in enumerate(example["proper_candidates"]):
                block += f"{idx + 1}. {caption}\n"
        block += "]\n"
        content += block
    return [{"role": "system", "content": content}, {"role": "user", "content": x0}]
