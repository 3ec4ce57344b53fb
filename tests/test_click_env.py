"""The tool-using example environment: "click the red shape", reward from the click's coordinates."""

from __future__ import annotations

import io

from mmstore_rollout.env import CLICK_TOOLS, ClickEnv
from PIL import Image


def click_text(x: int, y: int) -> str:
    return f'<tool_call>\n{{"name": "click", "arguments": {{"x": {x}, "y": {y}}}}}\n</tool_call>'


def test_reward_from_the_click_coordinates():
    env = ClickEnv(seed=3, turns=2)
    screen = env.turn(0)
    x0, y0, x1, y1 = screen.target
    image = Image.open(io.BytesIO(screen.image_png)).convert("RGB")
    reds = [
        (x, y)
        for x in range(image.width)
        for y in range(image.height)
        if image.getpixel((x, y)) == (220, 40, 40)
    ]
    assert reds and all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in reds)  # the box holds the red pixels
    assert env.reward(screen, click_text((x0 + x1) // 2, (y0 + y1) // 2)) == 1.0
    assert env.reward(screen, click_text(x1 + 1, y1 + 1)) == 0.0
    assert env.reward(screen, "I would click the red one.") == 0.0  # no tool call
    assert env.reward(screen, '<tool_call>\n{"name": "click"') == 0.0  # does not parse
    assert env.turn(0) == ClickEnv(seed=3, turns=2).turn(0)  # every sample of a group sees the same screen


def test_turn_messages_are_a_task_then_tool_results():
    env = ClickEnv(seed=1, turns=3)
    first, later = env.message(env.turn(0), 0), env.message(env.turn(1), 1)
    assert first["role"] == "user" and first["content"][0]["image_url"]["url"].startswith("data:image/png")
    assert later["role"] == "tool" and later["content"][1]["type"] == "image_url"
    assert env.tools == CLICK_TOOLS and env.system["role"] == "system"
