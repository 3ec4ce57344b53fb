"""The tiny random Qwen2-VL checkpoint: transformers loads it and runs it on an image."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from mmstore_trainer.tiny_model import build_tiny_qwen2_vl, ensure_tiny_model, qwen2_vl_2b_config
from PIL import Image


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny") / "qwen2_vl")


def _messages(img):
    text = {"type": "text", "text": "What is in the picture?"}
    return [{"role": "user", "content": [{"type": "image", "image": img}, text]}]


def test_folder_is_complete(tiny_dir: Path):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    assert not [p for p in tiny_dir.parent.iterdir() if ".tmp-" in p.name]  # no temp left over


def test_transformers_forward_with_image(tiny_dir: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_dir)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"

    img = Image.new("RGB", (100, 140), (200, 30, 30))  # width 100, height 140
    inputs = processor.apply_chat_template(
        _messages(img),
        tokenize=True,
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    grid = inputs["image_grid_thw"]
    n_pads = int((inputs["input_ids"][0] == processor.image_token_id).sum())
    assert n_pads == int(grid.prod()) // 4 == 20  # merge 2x2; grid (1, 10, 8) for 140x112

    with torch.no_grad():
        out = model(**inputs)
    seq = inputs["input_ids"].shape[1]
    assert out.logits.shape == (1, seq, model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()


def test_tokenizer_and_template(tiny_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    # Unexpanded: exactly one pad per image, as vLLM wants it.
    ids = tok.apply_chat_template(
        _messages(None), tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert list(ids).count(tok.convert_tokens_to_ids("<|image_pad|>")) == 1
    assert tok.decode(tok.encode("Hello, world!")) == "Hello, world!"


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_deterministic_and_idempotent(tiny_dir: Path, tmp_path: Path):
    again = ensure_tiny_model(tmp_path / "m")  # absent: builds
    assert _digest(again) == _digest(tiny_dir)
    mtime = (again / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(again) == again  # present: untouched
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime


def test_qwen2_vl_2b_config_has_the_real_models_size_and_the_tokenizers_ids():
    from transformers.models.qwen2_vl import Qwen2VLForConditionalGeneration

    config = qwen2_vl_2b_config()
    with torch.device("meta"):  # shapes only: the 2B build itself (4.4 GB) is for a GPU machine
        model = Qwen2VLForConditionalGeneration(config)
    n = sum(p.numel() for p in model.parameters())
    assert 2.20e9 < n < 2.22e9  # Qwen2-VL-2B-Instruct: 2.21 B
    assert config.text_config.vocab_size == 151936 and config.vision_config.depth == 32
    # the special tokens vLLM and the renderer look for are the tiny tokenizer's
    assert max(config.image_token_id, config.vision_start_token_id, config.text_config.eos_token_id) < 512


def test_2b_size_is_refused_for_qwen3_vl_before_building(tmp_path: Path):
    with pytest.raises(ValueError, match="'2b'"):
        ensure_tiny_model(tmp_path / "m", "qwen3_vl", size="2b")
    assert not (tmp_path / "m").exists()
