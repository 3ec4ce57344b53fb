"""Multi-turn visual tasks whose answers can only come from looking at the pictures.

:class:`ShapesEnv`: each turn draws a new picture with Pillow, a few colored shapes on a plain
background. The question asks how many shapes of one color there are; the reward checks the number
the policy answers against what was drawn. A rollout has several turns, each with its own picture,
so the conversation carries one more image every turn (and every earlier one again).

:class:`ClickEnv`: an agent task with a tool. The screenshot shows one red shape among others; the
policy answers with a ``click`` tool call (OpenAI ``tools``, written in its family's tool-call
format); the reward is 1 when the click lands in the red shape. Every later turn is the tool's
result: a new screenshot in a ``tool`` message.

An environment gives the worker its ``system`` message, its ``tools`` (None: no tools), each turn's
message (``message(turn, k)``) and the reward of a completion's text.
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
from dataclasses import dataclass

from mmstore_client.chat_formats import chat_format
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

    system = {"role": "system", "content": "You count shapes in pictures. Answer with one number."}
    tools: list[dict] | None = None

    def __init__(self, seed: int, turns: int, family: str = "qwen2_vl") -> None:
        self.seed = seed
        self.turns = turns

    def turn(self, k: int) -> Turn:
        rng = random.Random(self.seed * 1000 + k)
        png, counts = _draw(rng)
        color = rng.choice(list(COLORS))
        return Turn(png, f"How many {color} shapes are in this picture? Answer with a number.", counts[color])

    @staticmethod
    def message(turn: Turn, k: int = 0) -> dict:
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


CLICK_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "click",
            "description": "Click the latest screenshot at pixel (x, y).",
            "parameters": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
            },
        },
    }
]


@dataclass(frozen=True)
class Screen:
    image_png: bytes
    target: tuple[int, int, int, int]  # the red shape's box: x0, y0, x1, y1 (inclusive)


def _screen(rng: random.Random) -> Screen:
    w, h = rng.choice(SIZES)
    img = Image.new("RGB", (w, h), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    others = [c for c in COLORS if c != "red"]
    boxes = []
    for color in ["red", *rng.choices(others, k=rng.randint(1, 4))]:
        s = rng.randint(12, 24)
        x, y = rng.randint(0, w - s), rng.randint(0, h - s)
        draw.rectangle((x, y, x + s, y + s), fill=COLORS[color])  # later shapes may cover the red one
        boxes.append((x, y, x + s, y + s))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return Screen(buf.getvalue(), boxes[0])


class ClickEnv:
    """Click the red shape, one screenshot per turn; deterministic per seed, as :class:`ShapesEnv`."""

    system = {"role": "system", "content": "You operate a screen with the click tool. Click the red shape."}
    tools = CLICK_TOOLS

    def __init__(self, seed: int, turns: int, family: str = "qwen2_vl") -> None:
        self.seed, self.turns = seed, turns
        self.format = chat_format(family)  # how this family writes tool calls
        if self.format is None:
            raise ValueError(f"no tool-call format for model type {family!r}: ClickEnv needs one")

    def turn(self, k: int) -> Screen:
        return _screen(random.Random(self.seed * 1000 + k))

    @staticmethod
    def message(screen: Screen, k: int = 0) -> dict:
        """Turn 0: the task and the screenshot; later turns: the click's result, a new screenshot."""
        uri = "data:image/png;base64," + base64.b64encode(screen.image_png).decode()
        image = {"type": "image_url", "image_url": {"url": uri}}
        if k == 0:
            return {"role": "user", "content": [image, {"type": "text", "text": "Click the red shape."}]}
        text = {"type": "text", "text": "Clicked. The screen now:"}
        return {"role": "tool", "tool_call_id": f"click-{k - 1}", "content": [text, image]}

    def reward(self, screen: Screen, completion_text: str) -> float:
        """1 when the first ``click`` call lands in the red shape's box, 0 otherwise (no call, a
        call that does not parse, or a miss)."""
        parsed = self.format.parse(completion_text, thinking=False, opened=False, tools=True)
        for call in parsed.tool_calls:
            if call.name == "click":
                args = json.loads(call.arguments)
                x, y = args.get("x"), args.get("y")
                if not all(isinstance(v, int | float) for v in (x, y)):
                    return 0.0
                x0, y0, x1, y1 = screen.target
                return 1.0 if x0 <= x <= x1 and y0 <= y <= y1 else 0.0
        return 0.0


ENVS = {"shapes": ShapesEnv, "click": ClickEnv}
