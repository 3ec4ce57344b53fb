"""Layout adapters against the real transformers processors (parity), plus registry and config.

Every family runs under three configs (its defaults and two others), against three oracles:

* sizing (2000+ sizes): the processor module's own sizing code - ``smart_resize`` and
  ``get_number_of_image_patches`` (Qwen, GLM, Kimi), ``pan_and_scan_batched`` (Gemma 3),
  ``_get_num_multimodal_tokens`` and ``select_best_resolution`` (LLaVA-OneVision), the image
  processor's ``resize`` / ``resize_for_vision_encoder`` / ``split_images`` methods on
  shape-only ("meta") tensors (Idefics3, SmolVLM) - and the processor's ``replace_image_token``
  for the placeholder text. Microseconds to a millisecond per size.
* pipeline (edge cases + random sizes): the whole processor call, ``processor(text, images)``,
  on meta tensors: every resize, split and patchify runs, only no pixel is computed. The
  placeholder text is what the processor substituted (``return_text_replacement_offsets``).
* real images: PNG/JPEG bytes (EXIF-rotated ones included) read by ``decode.probe`` for the
  layout and by ``decode.decode_rgb`` for the full processor; sizes kept small for speed.

``from_pretrained`` is checked against ``AutoProcessor.from_pretrained`` on the same folder.

The HF processors are built locally with a tiny in-memory tokenizer holding the family's special
tokens (no hub access). Sizes the processor refuses (it raises) must raise LayoutRefusal.
"""

from __future__ import annotations

import copy
import inspect
import io
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import transformers
from mmstore_client import decode, layouts
from mmstore_client.layouts import Layout, LayoutConfigError, LayoutRefusal, Placement
from PIL import Image
from pydantic import ValidationError
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.image_processing_utils import select_best_resolution
from transformers.models.glm4v import image_processing_glm4v
from transformers.models.kimi_k25 import image_processing_kimi_k25
from transformers.models.qwen2_vl import image_processing_qwen2_vl
from transformers.models.smolvlm import processing_smolvlm

T = transformers
ROW_COL_TAGS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
IDEFICS_TOKENS = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    """Meta tensors make the LANCZOS resize fall back to BICUBIC with a warning (same output
    size); silence that for this module only."""
    level = T.logging.get_verbosity()
    T.logging.set_verbosity_error()
    yield
    T.logging.set_verbosity(level)


def fake_tokenizer(specials: list[str], image_token: str, **named: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer knowing only the family's special tokens: enough for a processor."""
    vocab = {"<unk>": 0} | {token: i + 1 for i, token in enumerate(specials)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        additional_special_tokens=specials,
        extra_special_tokens={"image_token": image_token, **named},
    )


def meta(height: int, width: int) -> torch.Tensor:
    """A shape-only image: the processor computes every size, but no pixel."""
    return torch.empty((3, height, width), dtype=torch.uint8, device="meta")


# --- sizes -------------------------------------------------------------------------------------


def sizes(text: str) -> list[tuple[int, int]]:
    """(width, height) pairs from "WxH" words."""
    return [(int(w), int(h)) for w, h in (word.split("x") for word in text.split())]


EDGE_SIZES = [(w, h) for w in (1, 2, 3, 5) for h in (1, 2, 3, 5)] + sizes(
    """
    13x13 14x14 15x14 27x28 28x28 29x29 55x57 56x56 57x56 1x199 1x200 1x201 199x1 200x1 201x1
    2x400 2x401 401x2 400x2 3x600 3x601 28x5600 28x5601 5600x28 5601x28 20000x300 300x20000
    20000x100 100x20000 20000x99 99x20000 16384x1 1x16384 30000x30000 10000x10000 4096x4096
    4097x4096 8192x8192 364x1456 1456x364 365x1456 1456x365 1456x729 1457x1456 384x384 385x384
    768x384 1153x944 2304x2304 2305x2304 896x896 255x255 256x256 257x256 300x250 360x300 512x511
    1000x1
"""
)
MULTIPLES = [  # exact multiples of every family's factor, and one off
    (f * a + d, f * b - d)
    for f in (14, 16, 28, 32, 364, 384, 448, 512)
    for a, b in ((1, 1), (2, 3), (7, 5), (20, 31), (50, 9))
    for d in (0, 1)
]


def random_sizes(count: int, seed: int = 0) -> list[tuple[int, int]]:
    """Log-uniform areas and aspect ratios (1/300 to 300), plus uniform sides up to 4000."""
    rng = random.Random(seed)
    drawn = []
    while len(drawn) < count:
        if rng.random() < 0.5:
            area, ratio = 10 ** rng.uniform(0, 8), 10 ** rng.uniform(-2.5, 2.5)
            drawn.append((max(1, round(math.sqrt(area * ratio))), max(1, round(math.sqrt(area / ratio)))))
        else:
            drawn.append((rng.randint(1, 4000), rng.randint(1, 4000)))
    return drawn


SIZES = EDGE_SIZES + MULTIPLES + random_sizes(2000)
PIPELINE_SIZES = EDGE_SIZES + MULTIPLES[::4] + random_sizes(120, seed=1)
REAL_SIZES = sizes("1x1 3x5 29x57 100x30 333x517 640x480 20x600 2x401 255x255 384x385")
ROTATED = [(300, 120), (517, 333)]  # stored (width, height); EXIF orientation 6 swaps them


# --- the families ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One processor config, said twice: as our overrides and as HF's saved/call kwargs."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    image_processor: dict[str, Any] = field(default_factory=dict)  # image processor kwargs
    processor: dict[str, Any] = field(default_factory=dict)  # processor __init__ kwargs
    call: dict[str, Any] = field(default_factory=dict)  # processor call kwargs


@dataclass(frozen=True)
class Family:
    family: str
    build: Callable[[Config], Any]  # Config -> HF processor
    sizing: Callable[[Any, Config, int, int], tuple[tuple[int, ...], str]]  # (proc, cfg, h, w)
    grids: Callable[[Any, list[str]], list[tuple[int, ...]]]  # (output, texts) -> grids
    configs: tuple[Config, ...]
    observe: dict[str, Any] = field(default_factory=dict)  # call kwargs exposing per-image output


def fresh(saved: dict[str, Any]) -> dict[str, Any]:
    """A deep copy: ``Qwen2VLImageProcessor.__init__`` writes min/max pixels into the very ``size``
    dict it is given, which would leak one config into the next."""
    return copy.deepcopy(saved)


def images_kwargs(processor: Any, config: Config) -> dict[str, Any]:
    """The kwargs the processor passes to its image processor: its defaults, then the call's."""
    defaults = type(processor).valid_processor_kwargs._defaults.get("images_kwargs", {})
    return {**defaults, **config.call}


def qwen_like(proc_cls, image_cls, video_cls, specials, image_token):
    def build(config: Config):
        return proc_cls(
            image_processor=image_cls(**fresh(config.image_processor)),
            tokenizer=fake_tokenizer(specials, image_token),
            video_processor=video_cls(),
            **config.processor,
        )

    return build


def thw_grids(out, texts) -> list[tuple[int, ...]]:
    return [tuple(row) for row in out["image_grid_thw"].tolist()]


def thw_text(processor, grid) -> str:
    return processor.replace_image_token({"image_grid_thw": torch.tensor([grid])}, 0)


def qwen_sizing(processor, config, height, width):
    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    rh, rw = image_processing_qwen2_vl.smart_resize(
        height, width, factor, ip.size["shortest_edge"], ip.size["longest_edge"]
    )
    grid = (1, rh // ip.patch_size, rw // ip.patch_size)
    assert ip.get_number_of_image_patches(height, width, {}) == grid[1] * grid[2]
    return grid, thw_text(processor, grid)


def glm_sizing(processor, config, height, width):
    ip = processor.image_processor
    rh, rw = image_processing_glm4v.smart_resize(
        num_frames=ip.temporal_patch_size,
        height=height,
        width=width,
        temporal_factor=ip.temporal_patch_size,
        factor=ip.patch_size * ip.merge_size,
        min_pixels=ip.size["shortest_edge"],
        max_pixels=ip.size["longest_edge"],
    )
    grid = (1, rh // ip.patch_size, rw // ip.patch_size)
    assert ip.get_number_of_image_patches(height, width, {}) == grid[1] * grid[2]
    return grid, thw_text(processor, grid)


def kimi_sizing(processor, config, height, width):
    ip = processor.image_processor
    _, (ph, pw) = image_processing_kimi_k25.navit_resize(
        height, width, ip.patch_size, ip.merge_size, ip.max_patches, ip.size["max_height"]
    )
    grid = (1, ph // ip.patch_size, pw // ip.patch_size)
    assert ip.get_number_of_image_patches(height, width, {}) == grid[1] * grid[2]
    return grid, thw_text(processor, grid)


def gemma_sizing(processor, config, height, width):
    kwargs = images_kwargs(processor, config)
    crops = 0
    if kwargs["do_pan_and_scan"]:
        crops = len(
            processor.image_processor.pan_and_scan_batched(
                meta(height, width),
                kwargs["pan_and_scan_min_crop_size"],
                kwargs["pan_and_scan_max_num_crops"],
                kwargs["pan_and_scan_min_ratio_to_activate"],
            )
        )
    return (crops,), processor.replace_image_token({"num_crops": [crops]}, 0)


def llava_sizing(processor, config, height, width):
    ip = processor.image_processor
    tile = ip.size["height"]
    best_h, best_w = select_best_resolution((height, width), ip.image_grid_pinpoints)
    count = processor._get_num_multimodal_tokens(image_sizes=[(height, width)]).num_image_tokens[0]
    inputs = {
        "batch_num_images": [1],
        "image_sizes": [(height, width)],
        "pixel_values": [torch.empty((1, 3, tile, tile), device="meta")],
    }
    text = processor.replace_image_token(inputs, 0)
    assert text.count("<image>") == count  # the processor's two token counts agree
    return (best_h // tile, best_w // tile), text


def idefics_sizing(processor, config, height, width):
    """The image processor's own methods on a meta tensor (its get_number_of_image_patches
    disagrees with its pipeline for some configs, so the pipeline's methods are the oracle)."""
    ip = processor.image_processor
    image = ip.resize(meta(height, width)[None], ip.size)
    if ip.do_image_splitting:
        image = ip.resize_for_vision_encoder(image, ip.max_image_size["longest_edge"])
        _, rows, cols = ip.split_images(image, ip.max_image_size)
        grid = (rows[0], cols[0])
    else:
        grid = (0, 0)
    if ip.size["longest_edge"] % ip.max_image_size["longest_edge"] == 0:
        # vLLM counts with this shortcut; it agrees with the pipeline for such configs only
        assert ip.get_number_of_image_patches(height, width, {})[1:] == grid
    return grid, processor.replace_image_token({"rows": [[grid[0]]], "cols": [[grid[1]]]}, 0)


def llava_grids(out, texts) -> list[tuple[int, ...]]:
    """Only the tile count is observable: 1 + rows * cols squares (with do_pad=False)."""
    return [(len(tiles) - 1,) for tiles in out["pixel_values"]]


def gemma_grids(out, texts) -> list[tuple[int, ...]]:
    """The processor drops ``num_crops``; its text spells it out, one block per square."""
    return [(text.count("<start_of_image>") - 1,) for text in texts]


def idefics_grids(out, texts) -> list[tuple[int, ...]]:
    """The processor drops ``rows``/``cols``; its text tags every tile with its row and column."""
    return [(text.count("_col_1>"), text.count("<row_1_col_")) for text in texts]


def build_gemma(config: Config):
    tok = fake_tokenizer(
        ["<start_of_image>", "<end_of_image>", "<image_soft_token>"],
        "<image_soft_token>",
        boi_token="<start_of_image>",
        eoi_token="<end_of_image>",
    )
    return T.Gemma3Processor(T.Gemma3ImageProcessor(**fresh(config.image_processor)), tok, **config.processor)


def build_llava(config: Config):
    tok = fake_tokenizer(["<image>", "<video>"], "<image>")
    kwargs = {"num_image_tokens": 729, "vision_feature_select_strategy": "full"} | config.processor
    return T.LlavaOnevisionProcessor(
        image_processor=T.LlavaOnevisionImageProcessor(**fresh(config.image_processor)),
        tokenizer=tok,
        video_processor=T.LlavaOnevisionVideoProcessor(),
        **kwargs,
    )


def build_idefics(config: Config):
    tok = fake_tokenizer(IDEFICS_TOKENS + ROW_COL_TAGS, "<image>")
    return T.Idefics3Processor(
        T.Idefics3ImageProcessor(**fresh(config.image_processor)), tok, **config.processor
    )


def build_smolvlm(config: Config):
    tok = fake_tokenizer([*IDEFICS_TOKENS, "<video>", *ROW_COL_TAGS], "<image>")
    return T.SmolVLMProcessor(
        T.SmolVLMImageProcessor(**fresh(config.image_processor)),
        tok,
        T.SmolVLMVideoProcessor(),
        **config.processor,
    )


QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN3 = {"size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16}
SQUARE_224 = [[224 * r, 224 * c] for r in range(1, 5) for c in range(1, 5)]

FAMILIES = [
    Family(
        "qwen2_vl",
        qwen_like(
            T.Qwen2VLProcessor, T.Qwen2VLImageProcessor, T.Qwen2VLVideoProcessor, QWEN_TOKENS, "<|image_pad|>"
        ),
        qwen_sizing,
        thw_grids,
        (
            Config("default"),
            Config(
                "small-4.x-keys",
                {"min_pixels": 4 * 784, "max_pixels": 64 * 784},
                {"min_pixels": 4 * 784, "max_pixels": 64 * 784},
            ),
            Config(
                "large-5.x-size",
                {"min_pixels": 256 * 784, "max_pixels": 16384 * 784},
                {"size": {"shortest_edge": 256 * 784, "longest_edge": 16384 * 784}},
            ),
        ),
    ),
    Family(
        "qwen3_vl",
        qwen_like(
            T.Qwen3VLProcessor, T.Qwen2VLImageProcessor, T.Qwen3VLVideoProcessor, QWEN_TOKENS, "<|image_pad|>"
        ),
        qwen_sizing,
        thw_grids,
        (
            Config("default", {}, QWEN3),
            Config(
                "small",
                {"min_pixels": 1024, "max_pixels": 256 * 1024},
                {"patch_size": 16, "min_pixels": 1024, "max_pixels": 256 * 1024},
            ),
            Config(
                "merge1",
                {"merge_size": 1, "max_pixels": 1 << 20},
                {**QWEN3, "merge_size": 1, "max_pixels": 1 << 20},
            ),
        ),
    ),
    Family(
        "glm4v",
        qwen_like(
            T.Glm4vProcessor,
            T.Glm4vImageProcessor,
            T.Glm4vVideoProcessor,
            [
                "<|begin_of_image|>",
                "<|end_of_image|>",
                "<|image|>",
                "<|video|>",
                "<|begin_of_video|>",
                "<|end_of_video|>",
            ],
            "<|image|>",
        ),
        glm_sizing,
        thw_grids,
        (
            Config("default"),
            Config(
                "small",
                {"max_pixels": 300 * 784},
                {"size": {"shortest_edge": 12544, "longest_edge": 300 * 784}},
            ),
            Config(
                "large",
                {"min_pixels": 3136, "max_pixels": 20000 * 784},
                {"size": {"shortest_edge": 3136, "longest_edge": 20000 * 784}},
            ),
        ),
    ),
    Family(
        "gemma3",
        build_gemma,
        gemma_sizing,
        gemma_grids,
        (
            Config("default"),
            Config("pan-and-scan", {"do_pan_and_scan": True}, call={"do_pan_and_scan": True}),
            Config(
                "pan-and-scan-custom",
                {
                    "do_pan_and_scan": True,
                    "pan_and_scan_min_crop_size": 100,
                    "pan_and_scan_max_num_crops": 7,
                    "pan_and_scan_min_ratio_to_activate": 1.5,
                    "image_seq_length": 64,
                },
                processor={"image_seq_length": 64},
                call={
                    "do_pan_and_scan": True,
                    "pan_and_scan_min_crop_size": 100,
                    "pan_and_scan_max_num_crops": 7,
                    "pan_and_scan_min_ratio_to_activate": 1.5,
                },
            ),
        ),
    ),
    Family(
        "llava_onevision",
        build_llava,
        llava_sizing,
        llava_grids,
        (
            Config("default"),
            Config(
                "max4-default-strategy",
                {"vision_aspect_ratio": "anyres_max_4", "vision_feature_select_strategy": "default"},
                processor={
                    "vision_aspect_ratio": "anyres_max_4",
                    "vision_feature_select_strategy": "default",
                },
            ),
            Config(
                "tiles-224",
                {"image_size": 224, "num_image_tokens": 256, "image_grid_pinpoints": SQUARE_224},
                {"size": {"height": 224, "width": 224}, "image_grid_pinpoints": SQUARE_224},
                {"num_image_tokens": 256},
            ),
        ),
        observe={"do_pad": False},
    ),
    Family(
        "idefics3",
        build_idefics,
        idefics_sizing,
        idefics_grids,
        (
            Config("default"),
            Config("no-split", {"do_image_splitting": False}, {"do_image_splitting": False}),
            Config(
                "odd-edges",
                {"longest_edge": 1000, "max_image_size": 384, "image_seq_len": 81},
                {"size": {"longest_edge": 1000}, "max_image_size": {"longest_edge": 384}},
                {"image_seq_len": 81},
            ),
        ),
    ),
    Family(
        "smolvlm",
        build_smolvlm,
        idefics_sizing,
        idefics_grids,
        (
            Config("default"),
            Config(
                "smolvlm-instruct",
                {"longest_edge": 1536, "max_image_size": 384, "image_seq_len": 81},
                {"size": {"longest_edge": 1536}, "max_image_size": {"longest_edge": 384}},
                {"image_seq_len": 81},
            ),
            Config(
                "smolvlm2",
                {"longest_edge": 2048, "max_image_size": 512, "image_seq_len": 64},
                {"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}},
                {"image_seq_len": 64},
            ),
        ),
    ),
    Family(
        "kimi_k25",
        qwen_like(
            T.Kimi_K25Processor,
            T.Kimi_K25ImageProcessor,
            T.Kimi_K25VideoProcessor,
            [
                "<|media_begin|>",
                "<|media_content|>",
                "<|media_pad|>",
                "<|media_end|>",
                "<|kimi_k25_video_placeholder|>",
            ],
            "<|media_pad|>",
        ),
        kimi_sizing,
        thw_grids,
        (
            Config("default"),
            Config(
                "small",
                {"max_patches": 1024, "max_patches_per_side": 64},
                {"max_patches": 1024, "size": {"max_height": 64, "max_width": 64}},
            ),
            Config(
                "patch16",
                {"patch_size": 16, "max_patches": 4096, "max_patches_per_side": 100},
                {"patch_size": 16, "max_patches": 4096, "size": {"max_height": 100, "max_width": 100}},
            ),
        ),
    ),
]
CASES = [pytest.param(fam, cfg, id=f"{fam.family}-{cfg.name}") for fam in FAMILIES for cfg in fam.configs]


@pytest.fixture(autouse=True, scope="module")
def _smolvlm_without_num2words():
    """SmolVLMProcessor refuses to start without num2words, which only its video prompts use."""
    saved = processing_smolvlm.num2words
    processing_smolvlm.num2words = saved or str
    yield
    processing_smolvlm.num2words = saved


def check(layout: Layout, width: int, height: int, grid, text: str, tiles_only: bool = False) -> None:
    """The layout's placement and placeholder text equal the oracle's."""
    placement = layout.place(width, height)
    if tiles_only:  # LLaVA pipeline: only 1 + rows * cols is observable
        assert (placement.grid[0] * placement.grid[1],) == grid, (width, height)
    else:
        assert placement.grid == tuple(grid), (width, height)
    assert placement.num_tokens == text.count(layout.image_token), (width, height)
    assert layout.placeholder_text(placement) == text, (width, height)


REFUSED = object()


def outcome(oracle: Callable[[], Any]) -> Any:
    """The oracle's result, or REFUSED where the processor raises (ValueError from smart_resize,
    TypeError from LLaVA's select_best_resolution finding no fit)."""
    try:
        return oracle()
    except (ValueError, TypeError):
        return REFUSED


def expect_refusal(layout: Layout, width: int, height: int) -> None:
    with pytest.raises(LayoutRefusal, match=layout.family):
        layout.place(width, height)


@pytest.mark.parametrize(("fam", "config"), CASES)
def test_parity_sizing(fam: Family, config: Config) -> None:
    """All sizes against the processor's own sizing code and replace_image_token."""
    layout = layouts.from_config(fam.family, **config.overrides)
    processor = fam.build(config)
    assert len(SIZES) >= 2000
    refused = 0
    for width, height in SIZES:
        result = outcome(lambda w=width, h=height: fam.sizing(processor, config, h, w))
        if result is REFUSED:
            expect_refusal(layout, width, height)
            refused += 1
        else:
            check(layout, width, height, *result)
    assert refused < len(SIZES) // 10


def run_processor(fam: Family, processor, config: Config, images: list) -> tuple[list, list[str]]:
    """One whole processor call, one prompt per image: grids from its output, and the text it
    substituted for each image's placeholder."""
    out = call_processor(fam, processor, config, images)
    texts = replacements(out)
    return fam.grids(out, texts), texts


def replacements(out: Any) -> list[str]:
    """The text the processor substituted for each prompt's one image placeholder."""
    return [spans[0]["replacement"] for spans in out["text_replacement_offsets"]]


def call_processor(fam: Family, processor, config: Config, images: list) -> Any:
    return processor(
        text=[layouts.layout_class(fam.family).template_text] * len(images),
        images=[[image] for image in images],
        return_text_replacement_offsets=True,
        **config.call,
        **fam.observe,
    )


def pixel_values_elements(out: Any) -> int:
    """Numbers in a processor output's ``pixel_values`` (a tensor, or a list of per-image ones)."""
    values = out["pixel_values"]
    return sum(v.numel() for v in values) if isinstance(values, list) else values.numel()


@pytest.mark.parametrize(("fam", "config"), CASES)
def test_parity_pipeline(fam: Family, config: Config) -> None:
    """Edge and random sizes through the whole processor call, on shape-only tensors."""
    layout = layouts.from_config(fam.family, **config.overrides)
    processor = fam.build(config)
    accepted = []
    for width, height in PIPELINE_SIZES:
        if outcome(lambda w=width, h=height: fam.sizing(processor, config, h, w)) is REFUSED:
            assert (
                outcome(lambda w=width, h=height: run_processor(fam, processor, config, [meta(h, w)]))
                is REFUSED
            )
            expect_refusal(layout, width, height)
        else:
            accepted.append((width, height))
    grids, texts = run_processor(fam, processor, config, [meta(h, w) for w, h in accepted])
    for (width, height), grid, text in zip(accepted, grids, texts, strict=True):
        check(layout, width, height, grid, text, tiles_only=fam.family == "llava_onevision")


def encoded(width: int, height: int, orientation: int = 1) -> bytes:
    """Image bytes: a gradient PNG, or a JPEG carrying an EXIF orientation."""
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    out = io.BytesIO()
    if orientation == 1:
        image.save(out, format="PNG")
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(out, format="JPEG", exif=exif.tobytes())
    return out.getvalue()


REAL_IMAGES = [encoded(w, h) for w, h in REAL_SIZES] + [encoded(w, h, 6) for w, h in ROTATED]


@pytest.mark.parametrize(("fam", "config"), CASES)
def test_parity_real_images(fam: Family, config: Config) -> None:
    """Decoded images through the full processor; the layout sees only the probed header size."""
    layout = layouts.from_config(fam.family, **config.overrides)
    processor = fam.build(config)
    for data in REAL_IMAGES:
        header = decode.probe(data)
        image = decode.decode_rgb(data)
        assert image.size == (header.width, header.height)
        result = outcome(lambda image=image: call_processor(fam, processor, config, [image]))
        if result is REFUSED:
            expect_refusal(layout, header.width, header.height)
        else:
            (text,) = replacements(result)
            (grid,) = fam.grids(result, [text])
            check(layout, header.width, header.height, grid, text, tiles_only=fam.family == "llava_onevision")
            placement = layout.place(header.width, header.height)
            assert layout.pixel_values_elements(placement) == pixel_values_elements(result), header


# --- checkpoint folders ------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder's processor files, for one HF model type; ``family`` names the entry
    of FAMILIES whose tokens and grid reader apply."""

    model_type: str
    family: str
    image_processor: dict[str, Any]
    processor: dict[str, Any] = field(default_factory=dict)
    nested: bool = False  # image processor saved inside processor_config.json (5.x style)


CHECKPOINTS = [
    Checkpoint(
        "qwen2_vl",
        "qwen2_vl",
        {"min_pixels": 3136, "max_pixels": 50 * 784, "size": {"shortest_edge": 1, "longest_edge": 2}},
    ),
    Checkpoint(
        "qwen2_5_vl", "qwen2_vl", {"size": {"shortest_edge": 784, "longest_edge": 90 * 784}}, nested=True
    ),
    Checkpoint("qwen3_5", "qwen3_vl", {"size": {"shortest_edge": 1024, "longest_edge": 256 * 1024}}),
    Checkpoint(
        "qwen3_vl_moe",
        "qwen3_vl",
        {**QWEN3, "max_pixels": 300 * 1024, "image_processor_type": "Qwen2VLImageProcessorFast"},
    ),
    Checkpoint(
        "glm4v_moe",
        "glm4v",
        {
            "size": {"shortest_edge": 3136, "longest_edge": 50 * 784},
            "max_pixels": 9,
            "image_processor_type": "Glm4vImageProcessor",
        },
    ),
    Checkpoint(
        "gemma3",
        "gemma3",
        {"size": {"height": 896, "width": 896}, "do_pan_and_scan": True},
        {"image_seq_length": 64},
    ),
    Checkpoint(
        "llava_onevision",
        "llava_onevision",
        {"size": {"height": 384, "width": 384}, "image_grid_pinpoints": [[384, 384], [384, 768], [768, 384]]},
        {
            "num_image_tokens": 729,
            "vision_feature_select_strategy": "default",
            "vision_aspect_ratio": "anyres_max_2",
        },
    ),
    Checkpoint(
        "smolvlm",
        "smolvlm",
        {"size": {"longest_edge": 1536}, "max_image_size": {"longest_edge": 384}},
        {"image_seq_len": 81},
        nested=True,
    ),
    Checkpoint("kimi_k25", "kimi_k25", {"size": {"max_height": 64, "max_width": 64}, "max_patches": 1024}),
]
FAMILY_BY_NAME = {fam.family: fam for fam in FAMILIES}


def write_checkpoint(folder, checkpoint: Checkpoint) -> None:
    """config.json, the processor files and a tokenizer: what AutoProcessor needs offline."""
    fam = FAMILY_BY_NAME[checkpoint.family]
    fam.build(Config("default")).tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": checkpoint.model_type}))
    processor = dict(checkpoint.processor)
    if checkpoint.nested:
        processor["image_processor"] = checkpoint.image_processor
        (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"longest_edge": 7}}))
    else:
        (folder / "preprocessor_config.json").write_text(json.dumps(checkpoint.image_processor))
    (folder / "processor_config.json").write_text(json.dumps(processor))


@pytest.mark.parametrize("checkpoint", CHECKPOINTS, ids=lambda c: c.model_type)
def test_from_pretrained_matches_auto_processor(tmp_path, checkpoint: Checkpoint) -> None:
    """Both read the same folder: same family, same overrides, same placements.

    Covers 4.x keys winning over ``size`` (Qwen), nested image processor configs (5.x),
    keys the processor ignores (GLM's min/max_pixels, Gemma 3's saved pan-and-scan)."""
    write_checkpoint(tmp_path, checkpoint)
    layout = layouts.from_pretrained(tmp_path)
    assert layout == Layout.from_pretrained(tmp_path)
    assert type(layout) is layouts.layout_class(checkpoint.model_type)
    processor = T.AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    fam = FAMILY_BY_NAME[checkpoint.family]
    sizes = [s for s in PIPELINE_SIZES[::3] if max(s) / min(s) < 150] + [(1300, 500), (500, 1300)]
    grids, texts = run_processor(fam, processor, Config("saved"), [meta(h, w) for w, h in sizes])
    for (width, height), grid, text in zip(sizes, grids, texts, strict=True):
        check(layout, width, height, grid, text, tiles_only=fam.family == "llava_onevision")


def test_from_pretrained_overrides_and_defaults(tmp_path) -> None:
    write_checkpoint(tmp_path, CHECKPOINTS[0])
    assert layouts.from_pretrained(tmp_path).config.max_pixels == 50 * 784
    layout = layouts.from_pretrained(tmp_path, max_pixels=1000 * 784)
    assert (layout.config.min_pixels, layout.config.max_pixels) == (3136, 1000 * 784)
    # a Qwen3 checkpoint lacking patch_size gets the processor class's 14, as HF loads it
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    assert layouts.from_pretrained(tmp_path).config.patch_size == 14
    assert layouts.from_config("qwen3_vl").config.patch_size == 16


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "no config.json"),
        ({"config.json": {"architectures": []}}, "no config.json with a model_type"),
        ({"config.json": {"model_type": "llama"}}, "known: gemma3, glm46v"),
        ({"config.json": {"model_type": "qwen2_vl"}}, "neither preprocessor_config.json"),
        (
            {
                "config.json": {"model_type": "qwen2_vl"},
                "preprocessor_config.json": {"size": {"min_pixels": 1}},
            },
            "must hold 'shortest_edge' and 'longest_edge'",
        ),
        (
            {"config.json": {"model_type": "llava_onevision"}, "preprocessor_config.json": {}},
            "no num_image_tokens",
        ),
        (
            {
                "config.json": {"model_type": "llava_onevision"},
                "processor_config.json": {"num_image_tokens": 729},
                "preprocessor_config.json": {"size": {"height": 384, "width": 336}},
            },
            "only square tiles",
        ),
        (
            {"config.json": {"model_type": "idefics3"}, "preprocessor_config.json": {"size": {"height": 9}}},
            "only size=",
        ),
        (
            {
                "config.json": {"model_type": "kimi_k25"},
                "preprocessor_config.json": {"size": {"max_height": 9}},
            },
            "equal 'max_height' and 'max_width'",
        ),
        (
            {
                "config.json": {"model_type": "gemma3"},
                "processor_config.json": {"image_seq_length": 0},
                "preprocessor_config.json": {},
            },
            "invalid gemma3 layout config",
        ),
        ({"config.json": "[1]"}, "does not hold a JSON object"),
    ],
)
def test_from_pretrained_errors(tmp_path, files: dict[str, Any], message: str) -> None:
    for name, content in files.items():
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(LayoutConfigError, match=message):
        layouts.from_pretrained(tmp_path)


MEDIA_PROC_CFGS = [
    {"patch_size": 14, "merge_kernel_size": [2, 2], "in_patch_limit": 16384, "patch_limit_on_one_side": 512},
    {"patch_size": 14, "merge_kernel_size": 2, "in_patch_limit": 4096, "patch_limit_on_one_side": 64},
]


@pytest.mark.parametrize("media", MEDIA_PROC_CFGS)
def test_kimi_reads_moonshot_media_proc_cfg(tmp_path, media: dict[str, Any]) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "kimi_k25"}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"media_proc_cfg": media}))
    config = layouts.from_pretrained(tmp_path).config
    assert (config.patch_size, config.merge_size, config.max_patches, config.max_patches_per_side) == (
        14,
        2,
        media["in_patch_limit"],
        media["patch_limit_on_one_side"],
    )
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"media_proc_cfg": {**media, "fixed_output_tokens": 64}})
    )
    with pytest.raises(LayoutConfigError, match="fixed_output_tokens is not mirrored"):
        layouts.from_pretrained(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("media", MEDIA_PROC_CFGS)
def test_kimi_parity_with_vllm(media: dict[str, Any]) -> None:
    """vLLM counts Kimi K2.5 tokens with its own copy of the Moonshot resize (importing it takes
    about 15 s, hence slow); all sizes must agree with it too."""
    from vllm.transformers_utils.processors.kimi_k25_vision_fused import navit_resize_image

    layout = layouts.from_config(
        "kimi_k25", **layouts.KimiK25Layout.overrides_from_hf({"media_proc_cfg": media}, {})
    )
    for width, height in SIZES:
        expected = navit_resize_image(
            width, height, 14, 2, media["in_patch_limit"], media["patch_limit_on_one_side"], None
        )
        assert layout.place(width, height).num_tokens == expected["num_tokens"], (width, height)


# --- defaults, registry, fingerprints ----------------------------------------------------------


def signature_default(cls, name: str) -> Any:
    return inspect.signature(cls.__init__).parameters[name].default


def test_defaults_match_hf_classes() -> None:
    """Each adapter's defaults are its processor's class defaults (and processor __init__ /
    ``_defaults`` kwargs); Qwen3-VL's are its published checkpoint constants, as transformers
    has no Qwen3 image processor class of its own."""
    for config, ip in (
        (layouts.Qwen2VLConfig(), T.Qwen2VLImageProcessor()),
        (layouts.Qwen3VLConfig(), T.Qwen2VLImageProcessor(**fresh(QWEN3))),
        (layouts.Glm4vConfig(), T.Glm4vImageProcessor()),
    ):
        assert config.model_dump() == {
            "patch_size": ip.patch_size,
            "merge_size": ip.merge_size,
            "temporal_patch_size": ip.temporal_patch_size,
            "min_pixels": ip.size["shortest_edge"],
            "max_pixels": ip.size["longest_edge"],
        }
    gemma = T.models.gemma3.processing_gemma3.Gemma3ProcessorKwargs._defaults["images_kwargs"]
    assert layouts.Gemma3Config().model_dump() == {
        "image_seq_length": signature_default(T.Gemma3Processor, "image_seq_length"),
        "image_size": T.Gemma3ImageProcessor().size["height"],
        **{key: value for key, value in gemma.items() if key != "do_convert_rgb"},
    }
    llava, vision = T.LlavaOnevisionImageProcessor(), T.LlavaOnevisionConfig().vision_config
    assert layouts.LlavaOnevisionConfig().model_dump() == {
        "image_size": llava.size["height"],
        "image_grid_pinpoints": tuple(map(tuple, llava.image_grid_pinpoints)),
        "num_image_tokens": (vision.image_size // vision.patch_size) ** 2,  # HF: None, checkpoints: 729
        "vision_aspect_ratio": signature_default(T.LlavaOnevisionProcessor, "vision_aspect_ratio"),
        "vision_feature_select_strategy": "full",  # HF: None, which counts as "full"
    }
    for ip_cls, proc_cls in (
        (T.Idefics3ImageProcessor, T.Idefics3Processor),
        (T.SmolVLMImageProcessor, T.SmolVLMProcessor),
    ):
        ip = ip_cls()
        assert layouts.Idefics3Config().model_dump() == {
            "longest_edge": ip.size["longest_edge"],
            "max_image_size": ip.max_image_size["longest_edge"],
            "do_image_splitting": ip.do_image_splitting,
            "image_seq_len": signature_default(proc_cls, "image_seq_len"),
        }
    kimi = T.Kimi_K25ImageProcessor()
    assert layouts.KimiK25Config().model_dump() == {
        "patch_size": kimi.patch_size,
        "merge_size": kimi.merge_size,
        "max_patches": kimi.max_patches,
        "max_patches_per_side": kimi.size["max_height"],
    }


def test_every_adapter_names_its_hf_classes() -> None:
    for model_type in layouts.known_model_types():
        cls = layouts.layout_class(model_type)
        assert hasattr(T, cls.hf_processor), cls
        assert cls.placeholder in cls.template_text, cls
    assert {fam.family for fam in FAMILIES} >= {
        cls.family for cls in map(layouts.layout_class, layouts.known_model_types())
    }


def test_registry_table() -> None:
    assert layouts.known_model_types() == [
        "gemma3",
        "glm46v",
        "glm4v",
        "glm4v_moe",
        "idefics3",
        "kimi_k25",
        "llava_onevision",
        "qwen2_5_vl",
        "qwen2_vl",
        "qwen3_5",
        "qwen3_5_moe",
        "qwen3_vl",
        "qwen3_vl_moe",
        "smolvlm",
    ]
    assert layouts.layout_class("qwen2_5_vl") is layouts.Qwen2VLLayout
    assert layouts.layout_class("smolvlm") is layouts.Idefics3Layout
    assert issubclass(layouts.Qwen3VLLayout, layouts.Qwen2VLLayout)
    assert issubclass(layouts.Glm4vLayout, layouts.Qwen2VLLayout)
    with pytest.raises(LayoutConfigError, match=r"no image layout for model type 'llava'.*known: gemma3"):
        Layout.from_config("llava")
    with pytest.raises(LayoutConfigError, match="invalid qwen2_vl layout config"):
        layouts.from_config("qwen2_vl", max_pixel=5)


def test_registry_refuses_duplicates() -> None:
    from mmstore_client.layouts.registry import register

    class Twin(layouts.Qwen2VLLayout):
        family = "twin"

    with pytest.raises(TypeError, match="already registered: 'qwen2_vl'"):
        register("twin", "qwen2_vl")(Twin)
    assert "twin" not in layouts.known_model_types()
    with pytest.raises(TypeError, match="must be one of"):
        register("other")(Twin)


def test_fingerprint() -> None:
    qwen = layouts.from_config("qwen2_vl")
    # Pinned: the canonical form is part of the descriptor contract; change it on purpose only.
    assert qwen.fingerprint == "be4d0dde37d2a004"
    assert qwen == layouts.from_config("qwen2_5_vl") == layouts.Qwen2VLLayout()
    assert len({qwen, layouts.from_config("qwen2_vl")}) == 1
    glm_same_numbers = layouts.Glm4vLayout(layouts.Glm4vConfig(**qwen.config.model_dump()))
    assert glm_same_numbers.fingerprint != qwen.fingerprint  # the family is part of it
    assert layouts.from_config("qwen2_vl", max_pixels=1 << 20).fingerprint != qwen.fingerprint
    with pytest.raises(TypeError, match="takes a Qwen2VLConfig"):
        layouts.Qwen2VLLayout(layouts.Glm4vConfig())
    with pytest.raises(ValidationError):
        qwen.config.patch_size = 16  # frozen


@pytest.mark.parametrize("family", sorted({fam.family for fam in FAMILIES}))
def test_config_round_trips_through_json(family: str) -> None:
    """A descriptor carries family and config as JSON; rebuilding from them gives the same layout."""
    layout = layouts.from_config(family)
    rebuilt = layouts.from_config(
        layout.family, **json.loads(json.dumps(layout.config.model_dump(mode="json")))
    )
    assert rebuilt == layout and rebuilt.config == layout.config


def test_refusal_is_an_image_error() -> None:
    with pytest.raises(LayoutRefusal) as info:
        layouts.from_config("qwen2_vl").place(201, 1)
    assert isinstance(info.value, decode.ImageError)
    assert info.value.code == "image_refused_by_layout"
    assert "qwen2_vl" in str(info.value) and "aspect ratio" in str(info.value)


def test_placement_is_frozen() -> None:
    placement = layouts.from_config("gemma3").place(10, 10)
    assert placement == Placement(grid=(0,), num_tokens=256)
    with pytest.raises(AttributeError):
        placement.num_tokens = 1  # type: ignore[misc]


def test_exports() -> None:
    assert layouts.__all__ == sorted(layouts.__all__)
    assert all(hasattr(layouts, name) for name in layouts.__all__)
