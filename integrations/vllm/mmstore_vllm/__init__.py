"""mmstore_vllm: a vLLM plugin that resolves ``mmstore://blobs/<digest>`` image refs.

Install it into the environment of the vLLM you run and set ``VLLM_MEDIA_CONNECTOR=mmstore``
(plus ``MMSTORE_URL`` and ``MMSTORE_TOKEN``). vLLM calls :func:`register` from the
``vllm.general_plugins`` entry point in each of its processes.
"""

from __future__ import annotations

CONNECTOR_NAME = "mmstore"


def register() -> None:
    """Add the ``mmstore`` media connector to vLLM's registry (idempotent: vLLM may call it twice).

    When it is the selected connector, the settings (and ``MMSTORE_MODEL``'s layout) are built
    here: vLLM calls this at start without catching, so a bad setting stops the server with its
    reason instead of failing every image request later.
    """
    from vllm import envs
    from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY

    from .connector import MmstoreMediaConnector

    MEDIA_CONNECTOR_REGISTRY.register(CONNECTOR_NAME)(MmstoreMediaConnector)
    if envs.VLLM_MEDIA_CONNECTOR == CONNECTOR_NAME:
        from .resolve import resolver

        resolver()


__all__ = ["CONNECTOR_NAME", "register"]
