"""What the loop counts, for its summary: the invariants and the bytes it did not send."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mmstore_client.descriptor import Descriptor
from mmstore_client.layouts import Layout
from mmstore_client.layouts.base import Placement

FLOAT32_BYTES = 4


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
    context_stops: int = 0  # trajectories ended early: the next turn would not fit max_model_len
    inference_retries: int = 0  # requests the inference client re-sent (transport error, 503)
    inference_errors: int = 0  # generate requests that failed after the client's retries
    failures: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)

    def count_request(
        self, descriptors: list[Descriptor], image_bytes: dict[str, int], layout: Layout
    ) -> None:
        """One generate request: what its images cost as refs, as base64, as the float32
        ``pixel_values`` the layout's processor would make of them."""
        self.generate_requests += 1
        for d in descriptors:
            self.bytes_refs += len(d.model_dump_json())
            self.bytes_base64 += len("data:image/png;base64,") + 4 * math.ceil(image_bytes[d.digest] / 3)
            placement = Placement(d.grid, d.num_tokens)
            self.bytes_pixel_values += layout.pixel_values_elements(placement) * FLOAT32_BYTES
