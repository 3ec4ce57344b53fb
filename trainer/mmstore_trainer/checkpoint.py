"""Checkpoints: complete model folders that transformers and vLLM load as they load the original.

``save_pretrained`` writes the weights and ``config.json`` (and ``generation_config.json``);
every other file of the source checkpoint (processor, tokenizer, chat template, ...) is copied
byte for byte, so the tokenizer and the image processor of the checkpoint are exactly those
the samples were rendered with. The folder is written beside its destination and renamed into
place, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Files save_pretrained writes itself (or that belong to the old weights): never copied.
_MODEL_FILES = ("config.json", "generation_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _is_model_file(path: Path) -> bool:
    return path.name in _MODEL_FILES or path.name in _WEIGHT_INDEXES or path.suffix in _WEIGHT_SUFFIXES


def save_checkpoint(
    model: Any,
    source_dir: str | Path,
    dest: str | Path,
    *,
    state: dict[str, Any] | None = None,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` to ``dest`` with the non-weight files of ``source_dir``; return ``dest``.

    ``state`` (step, metrics) goes to ``trainer_state.json``, which loaders ignore.
    ``state_dict``: the weights to write instead of ``model``'s own (a sharded model's full
    state dict, gathered on one rank).
    """
    source, dest = Path(source_dir), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        for f in sorted(source.iterdir()):
            if f.is_file() and not _is_model_file(f) and f.name != "trainer_state.json":
                shutil.copy2(f, tmp / f.name)
        model.save_pretrained(tmp, state_dict=state_dict)
        if state is not None:
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str))
        tmp.chmod(0o755)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
