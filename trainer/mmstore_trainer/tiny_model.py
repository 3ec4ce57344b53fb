"""Random-weight Qwen2-VL / Qwen3-VL checkpoints, built locally (model hubs are unreachable).

Two sizes: ``tiny`` (about 0.5 M parameters, float32: tests and smoke runs on CPU) and, for
Qwen2-VL, ``2b`` (Qwen2-VL-2B-Instruct's shapes and image processor, 2.2 B parameters, bfloat16:
benchmarks and smoke runs on a GPU, where the cost of the real model's size is the point). Both
share the tiny byte-level tokenizer and the Qwen2-VL chat template; the 2B embedding keeps the
real vocabulary size (151936 rows), so sampled ids beyond the tokenizer decode to nothing.

The folders load with transformers (``AutoModelForImageTextToText``, ``AutoProcessor``,
``AutoTokenizer``); the Qwen2-VL ones also load in vLLM. The weights are random, so the outputs
are noise, but the shapes, the token layout and the image-token expansion are those of the real
models.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
VOCAB_SIZE = 512  # special tokens take ids 0..6, then the 256 byte symbols, then merges
SEED = 0
SIZES = ("tiny", "2b")

TINY_FAMILY = "qwen2_vl"
"""The family of the default tiny model: what ``make smoke``, ``mmstore-smoke up``, the tests and
the benches serve when given no model (its tiny model loads in vLLM as well as transformers)."""
TINY_MODELS_DIR = Path(".cache") / "tiny-models"
"""Where built models are kept, relative to the repository root (git-ignored, rebuilt on demand);
one folder per model, named by :func:`tiny_model_folder`."""

# Qwen2-VL-2B-Instruct's config.json (text and vision towers); token ids come from the tokenizer.
QWEN2_VL_2B_TEXT = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 28,
    "tie_word_embeddings": True,
}
QWEN2_VL_2B_VISION = {
    "depth": 32,
    "embed_dim": 1280,
    "hidden_size": 1536,
    "hidden_act": "quick_gelu",
    "mlp_ratio": 4,
    "num_heads": 16,
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
# Qwen2-VL-2B-Instruct's preprocessor_config.json
QWEN2_VL_2B_IMAGE_PROCESSOR = {
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 1280,
}

# The chat template of Qwen2-VL-*-Instruct. The tiny Qwen3-VL uses it too (the real Qwen3-VL one
# has no default system message and adds tool calls; the image part is the same).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "You are a helpful assistant.",
    "Describe the image. What is in the picture? How many objects are there?",
    "The answer is 42. The cat sits on the mat. A red square, a blue circle, a green triangle.",
    "system user assistant image video picture color shape count left right top bottom",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 yes no true false maybe",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Reward: correct. Reward: wrong. Think step by step, then answer in one word.",
    "Hello, world! def main(): return x + y * (z - 1) / 2",
]


def _build_tokenizer(chat_template: str = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        extra_special_tokens={},
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = chat_template
    return fast


def _ids(tok) -> dict[str, int]:
    return {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def _text_config(tok, size: str) -> dict:
    ids = _ids(tok)
    special = dict(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    if size == "2b":
        return {**QWEN2_VL_2B_TEXT, "rope_parameters": dict(QWEN2_VL_2B_TEXT["rope_parameters"]), **special}
    return dict(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,  # vLLM's CPU attention rejects small head dims (16); 64 works
        max_position_embeddings=4096,
        max_window_layers=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        **special,
    )


def _save_common(model, tok, processor, out: Path) -> None:
    model.generation_config.do_sample = True
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.pad_token_id]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)  # also writes the tokenizer files and chat_template.jinja
    tok.save_pretrained(out)  # keeps the template in tokenizer_config.json for AutoTokenizer


def _token_ids(tok) -> dict[str, int]:
    ids = _ids(tok)
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def qwen2_vl_2b_config(tok=None):
    """Qwen2-VL-2B-Instruct's model config with the special-token ids of ``tok`` (default: the
    tiny tokenizer), as :func:`build_qwen2_vl_2b` saves it."""
    from transformers.models import qwen2_vl

    tok = tok or _build_tokenizer()
    text = _text_config(tok, "2b")
    return qwen2_vl.Qwen2VLConfig(text_config=text, vision_config=QWEN2_VL_2B_VISION, **_token_ids(tok))


def _build_into(out: Path, family: str, size: str = "tiny", chat_template: str = CHAT_TEMPLATE) -> Path:
    if size not in SIZES or (size != "tiny" and family != "qwen2_vl"):
        raise ValueError(f"unknown size {size!r} for {family}; expected 'tiny' (or '2b' for qwen2_vl)")
    import torch
    from transformers.models import qwen2_vl, qwen3_vl
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    torch.manual_seed(SEED)
    tok = _build_tokenizer(chat_template)
    token_ids = _token_ids(tok)
    text = _text_config(tok, size)
    vision = {"depth": 2, "num_heads": 2, "spatial_merge_size": 2, "temporal_patch_size": 2}
    pix = {"merge_size": 2, "temporal_patch_size": 2}
    dtype = torch.float32
    if family == "qwen2_vl" and size == "2b":
        config = qwen2_vl_2b_config(tok)
        dtype = torch.bfloat16
        # random init where it is fast: 2.2 B parameters take seconds on a GPU, a minute on CPU
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = qwen2_vl.Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
        image_processor = qwen2_vl.Qwen2VLImageProcessor(**QWEN2_VL_2B_IMAGE_PROCESSOR)
        video_processor = Qwen2VLVideoProcessor(**QWEN2_VL_2B_IMAGE_PROCESSOR)
        processor_cls = qwen2_vl.Qwen2VLProcessor
    elif family == "qwen2_vl":
        text["rope_parameters"]["mrope_section"] = [8, 12, 12]  # sums to head_dim / 2
        text.pop("head_dim")  # Qwen2-VL derives it: 128 / 2 heads = 64
        vision.update(embed_dim=32, hidden_size=128, mlp_ratio=2, patch_size=14)
        config = qwen2_vl.Qwen2VLConfig(text_config=text, vision_config=vision, **token_ids)
        model = qwen2_vl.Qwen2VLForConditionalGeneration(config)
        pix.update(patch_size=14, min_pixels=56 * 56, max_pixels=28 * 28 * 64)
        image_processor = qwen2_vl.Qwen2VLImageProcessor(**pix)
        video_processor = Qwen2VLVideoProcessor(**pix)
        processor_cls = qwen2_vl.Qwen2VLProcessor
    elif family == "qwen3_vl":
        text["rope_parameters"].update(mrope_section=[8, 12, 12], mrope_interleaved=True)
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=128, patch_size=16)
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        config = qwen3_vl.Qwen3VLConfig(text_config=text, vision_config=vision, **token_ids)
        model = qwen3_vl.Qwen3VLForConditionalGeneration(config)
        pix.update(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        image_processor = qwen2_vl.Qwen2VLImageProcessor(min_pixels=64 * 64, max_pixels=32 * 32 * 64, **pix)
        video_processor = Qwen3VLVideoProcessor(
            size={"shortest_edge": 64 * 64, "longest_edge": 32 * 32 * 256}, **pix
        )
        processor_cls = qwen3_vl.Qwen3VLProcessor
    else:
        raise ValueError(f"unknown family {family!r}")
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        chat_template=chat_template,
    )
    _save_common(model.to(dtype), tok, processor, out)
    return out


def _build_atomic(
    path: Path, family: str, replace: bool = True, size: str = "tiny", chat_template: str = CHAT_TEMPLATE
) -> Path:
    """Build into a temp folder beside ``path``, then rename it into place (never half-built).

    With ``replace=False`` a folder that appeared meanwhile (a concurrent build) is kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _build_into(tmp, family, size, chat_template)
        tmp.chmod(0o755)  # mkdtemp makes it 0700, safetensors writes 0600
        for f in tmp.iterdir():
            f.chmod(0o644)
        if path.exists() and replace:
            shutil.rmtree(path)
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_tiny_qwen2_vl(path: Path) -> Path:
    """Build a tiny random Qwen2-VL checkpoint (about 0.5 M parameters) in ``path``; return it.

    Text: hidden 128, 2 layers, 2 heads, 1 KV head, head_dim 64, mrope_section [8, 12, 12].
    Vision: depth 2, embed_dim 32, patch 14, spatial merge 2, temporal patch 2.
    Tokenizer: byte-level BPE (512 ids, specials at 0..6), Qwen2-VL chat template.
    Image processor: ``Qwen2VLImageProcessor(min_pixels=56*56, max_pixels=28*28*64)``.
    Loads in transformers and vLLM. Same seed and corpus: same files on every build.
    An existing folder at ``path`` is replaced (the build goes to a temp folder, then renamed).
    """
    return _build_atomic(path, "qwen2_vl")


def build_tiny_qwen3_vl(path: Path) -> Path:
    """Build a tiny random Qwen3-VL checkpoint in ``path``; return it.

    Same tokenizer, template and text sizes as :func:`build_tiny_qwen2_vl` (head_dim 64,
    interleaved mrope [8, 12, 12]); vision: depth 2, hidden 32, patch 16, merge 2,
    temporal patch 2, deepstack on both layers. Processor: ``Qwen3VLProcessor`` with a
    ``Qwen2VLImageProcessor`` at patch 16 (min_pixels 64*64, max_pixels 32*32*64, mean/std 0.5).
    """
    return _build_atomic(path, "qwen3_vl")


def build_qwen2_vl_2b(path: Path) -> Path:
    """Build a Qwen2-VL-2B-sized random checkpoint in ``path`` (bfloat16, about 4.4 GB); return it.

    Text and vision towers: Qwen2-VL-2B-Instruct's config (:data:`QWEN2_VL_2B_TEXT`,
    :data:`QWEN2_VL_2B_VISION`); image processor: its preprocessor config (max_pixels 28*28*1280,
    so a 1280x720 screenshot is 1196 tokens). Tokenizer and chat template: the tiny model's.
    Built on the GPU when there is one. Replaces an existing folder, as the tiny builders do.
    """
    return _build_atomic(path, "qwen2_vl", size="2b")


def tiny_model_folder(name: str = TINY_FAMILY, root: Path = Path()) -> Path:
    """The folder of the built model ``name`` (a family, or a family and a variant such as
    ``qwen2_vl-2b``) under ``root``: the repository root; the default, the current folder, is where
    ``make`` runs."""
    return Path(root) / TINY_MODELS_DIR / name


# Qwen3-VL-Instruct's chat template (tools, tool calls, images in tool results; its source is
# named in tests/data/chat_templates/README.md): Qwen2-VL's, which the tiny models carry, ignores
# ``tools``, and a renderer refuses tools a template would drop.
TOOLS_CHAT_TEMPLATE = Path(__file__).parent / "chat_templates" / "qwen3_vl_instruct.jinja"


def ensure_default_tiny_model(root: Path = Path(), *, tools: bool = False) -> Path:
    """The default tiny model (:data:`TINY_FAMILY`) under ``root``, built there on first use;
    ``tools``: the same model carrying a chat template that renders tools
    (:data:`TOOLS_CHAT_TEMPLATE`), in a folder of its own."""
    if tools:
        folder = tiny_model_folder(f"{TINY_FAMILY}-tools", root)
        return ensure_tiny_model(folder, TINY_FAMILY, chat_template=TOOLS_CHAT_TEMPLATE.read_text())
    return ensure_tiny_model(tiny_model_folder(TINY_FAMILY, root), TINY_FAMILY)


def ensure_tiny_model(
    path: Path, family: str = TINY_FAMILY, size: str = "tiny", chat_template: str = CHAT_TEMPLATE
) -> Path:
    """Return ``path``, building the ``family`` model of ``size`` there first if it is absent.

    ``chat_template`` replaces the Qwen2-VL one (e.g. a real model's template with tool calls or
    thinking, which the tests keep as data files); ``path`` should name it, since an existing
    folder is returned as it is."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    if family not in ("qwen2_vl", "qwen3_vl"):
        raise ValueError(f"unknown family {family!r}; expected 'qwen2_vl' or 'qwen3_vl'")
    return _build_atomic(path, family, replace=False, size=size, chat_template=chat_template)
