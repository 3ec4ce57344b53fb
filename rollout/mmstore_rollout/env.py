"""A multi-turn visual task whose answers can only come from looking at the pictures.

Each turn draws a new picture with Pillow: a few colored shapes on a plain background. The
question asks how many shapes of one color there are; the reward checks the number the policy
answers against what was drawn. A rollout has several turns, each with its own picture, so the
conversation carries one more image every turn (and every earlier one again).
"""

from __future__ import annotations

import base64
import io
import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("square", "circle", "triangle")
SIZES = [(160, 120), (200, 150), (96, 128), (240, 180), (128, 128)]


@dataclass(frozen=True)
class Turn:
    image_png: bytes
    question: str
    answer: int  # the number of shapes of the asked color


def _draw(rng: random.Random) -> tuple[bytes, dict[str, int]]:
    w, h = rng.choice(SIZES)
    img = Image.new("RGB", (w, h), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    counts = dict.fromkeys(COLORS, 0)
    for _ in range(rng.randint(1, 6)):
        color = rng.choice(list(COLORS))
        counts[color] += 1
        s = rng.randint(10, 24)
        x, y = rng.randint(0, w - s), rng.randint(0, h - s)
        shape = rng.choice(SHAPES)
        if shape == "square":
            draw.rectangle((x, y, x + s, y + s), fill=COLORS[color])
        elif shape == "circle":
            draw.ellipse((x, y, x + s, y + s), fill=COLORS[color])
        else:
            draw.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=COLORS[color])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), counts


class ShapesEnv:
    """Deterministic per seed: every sample of a GRPO group sees the same pictures."""

    def __init__(self, seed: int, turns: int) -> None:
        self.seed = seed
        self.turns = turns

    def turn(self, k: int) -> Turn:
        rng = random.Random(self.seed * 1000 + k)
        png, counts = _draw(rng)
        color = rng.choice(list(COLORS))
        return Turn(png, f"How many {color} shapes are in this picture? Answer with a number.", counts[color])

    @staticmethod
    def message(turn: Turn) -> dict:
        """The user message as a rollout worker writes it: OpenAI-style, the image inline."""
        uri = "data:image/png;base64," + base64.b64encode(turn.image_png).decode()
        return {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": uri}},
                {"type": "text", "text": turn.question},
            ],
        }

    @staticmethod
    def reward(turn: Turn, completion_text: str) -> float:
        """1 for the right number (first number in the answer), 0 otherwise."""
        m = re.search(r"\d+", completion_text)
        return 1.0 if m and int(m.group()) == turn.answer else 0.0
