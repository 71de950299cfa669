"""The LLM request: system instruction and few-shot examples chosen by failure category.

The instruction and the examples are this project's own, written in the spirit of common
text-to-image failure cases (one or two per category). :data:`INSTRUCTION_VERSION` hashes
them, so editing either invalidates the answer cache.
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
        ("a storefront sign that reads 'OPEN 24 HOURS'",
         ["a storefront sign that reads 'CLOSED 24 HOURS'", "a storefront sign that reads 'OPEN 12 HOURS'",
          "a storefront sign that reads 'OPEN 24 HOUSES'", "a storefront sign that reads 'PEN 24 HOURS'",
          "a blank storefront sign", "a storefront sign that reads 'OPEN 42 HOURS'"]),
        ("a birthday cake with 'Happy 30th Mia' written in icing",
         ["a birthday cake with 'Happy 40th Mia' written in icing", "a birthday cake with 'Happy 30th Max' written in icing",
          "a birthday cake with 'Happy Birthday' written in icing", "a birthday cake with no writing on it",
          "a wedding cake with 'Happy 30th Mia' written in icing"]),
    ],
    "style": [
        ("a watercolor painting of a lighthouse at dusk",
         ["an oil painting of a lighthouse at dusk", "a pencil sketch of a lighthouse at dusk",
          "a photograph of a lighthouse at dusk", "a pixel-art image of a lighthouse at dusk",
          "a watercolor painting of a windmill at dusk", "a watercolor painting of a lighthouse at noon"]),
        ("a fox in the style of Japanese woodblock prints",
         ["a fox in the style of cubist paintings", "a fox in the style of a children's cartoon",
          "a photo of a fox", "a wolf in the style of Japanese woodblock prints",
          "a fox in the style of pop art posters"]),
    ],
    "composition": [
        ("a cat and a teapot on a wooden table",
         ["a cat on a wooden table", "a teapot on a wooden table", "two cats and a teapot on a wooden table",
          "a dog and a teapot on a wooden table", "a cat and a vase on a wooden table",
          "a cat-shaped teapot on a wooden table"]),
        ("a violin and a trumpet lying on a bed",
         ["a violin lying on a bed", "two violins and a trumpet lying on a bed", "a guitar and a trumpet lying on a bed",
          "a violin and a drum lying on a bed", "a violin and a trumpet lying on the floor"]),
    ],
    "counting": [
        ("a photo of four red apples",
         ["a photo of three red apples", "a photo of five red apples", "a photo of one red apple",
          "a photo of two red apples", "a photo of four green apples", "a photo of four red tomatoes"]),
        ("two children flying kites on a hill",
         ["one child flying a kite on a hill", "three children flying kites on a hill",
          "five children flying kites on a hill", "two children flying one kite on a hill",
          "two dogs chasing kites on a hill"]),
    ],
    "creative": [
        ("an astronaut riding a horse on the moon",
         ["a horse riding an astronaut on the moon", "an astronaut walking next to a horse on the moon",
          "an astronaut riding a horse in a desert", "a cowboy riding a horse on the moon",
          "an astronaut riding a camel on the moon", "an astronaut riding a bicycle on the moon"]),
        ("a teapot made of ice",
         ["a teapot made of glass", "a teapot made of wood", "a block of ice shaped like a kettle",
          "a teapot full of ice", "a cup made of ice"]),
    ],
    "location": [
        ("a red fox in a snowy forest",
         ["a red fox in a desert", "a red fox on a sandy beach", "a red fox in a city street",
          "a red fox in a green summer forest", "a red fox in a living room", "a gray wolf in a snowy forest"]),
        ("a rowing boat on a calm lake",
         ["a rowing boat on a stormy sea", "a rowing boat on a beach", "a rowing boat in a garage",
          "a sailboat on a calm lake", "a rowing boat on a frozen lake"]),
    ],
    "colors": [
        ("a blue car parked next to a yellow fire hydrant",
         ["a yellow car parked next to a blue fire hydrant", "a red car parked next to a yellow fire hydrant",
          "a blue car parked next to a red fire hydrant", "a blue truck parked next to a yellow fire hydrant",
          "a black and white photo of a car next to a fire hydrant"]),
        ("a green umbrella",
         ["a red umbrella", "a blue umbrella", "a green and white striped umbrella", "a green raincoat",
          "a black umbrella"]),
    ],
    "spatial": [
        ("a book on top of a laptop",
         ["a laptop on top of a book", "a book under a laptop", "a book next to a laptop",
          "a book to the left of a laptop", "a mug on top of a laptop", "a book inside a laptop bag"]),
        ("a dog to the left of a bicycle",
         ["a dog to the right of a bicycle", "a dog behind a bicycle", "a dog riding a bicycle",
          "a bicycle to the left of a dog", "a cat to the left of a bicycle"]),
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
