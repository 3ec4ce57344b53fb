"""What the loop counts, for its summary: the invariants and the bytes it did not send."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mmstore_client.descriptor import Descriptor


def pixel_values_bytes(desc: Descriptor) -> int:
    """Size of the float32 ``pixel_values`` a processor would produce for this image.

    Qwen-style families: one row of ``channels * temporal_patch * patch**2`` floats per patch
    of ``grid_thw``; other families: their grid's product times a patch of the same shape.
    """
    patch = int(desc.layout.get("patch_size", 14))
    temporal = int(desc.layout.get("temporal_patch_size", 1) or 1)
    return math.prod(desc.grid) * 3 * temporal * patch * patch * 4


@dataclass
class LoopStats:
    rollouts: int = 0
    turns: int = 0
    generate_requests: int = 0
    images: int = 0  # image parts offloaded (a picture re-sent in a later turn counts again)
    digests: set[str] = field(default_factory=set)
    bytes_refs: int = 0  # what crossed to inference for images: descriptors (refs inside)
    bytes_base64: int = 0  # the same requests carrying every image as a base64 data URI
    bytes_pixel_values: int = 0  # ... or as float32 pixel_values
    placeholder_mismatches: int = 0
    processed_payloads: int = 0
    missing_images: int = 0
    inference_retries: int = 0
    failures: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)

    def count_request(self, descriptors: list[Descriptor], image_bytes: dict[str, int]) -> None:
        """One generate request: what its images cost as refs, as base64, as pixel_values."""
        self.generate_requests += 1
        for d in descriptors:
            self.bytes_refs += len(d.model_dump_json())
            self.bytes_base64 += len("data:image/png;base64,") + 4 * math.ceil(image_bytes[d.digest] / 3)
            self.bytes_pixel_values += pixel_values_bytes(d)
