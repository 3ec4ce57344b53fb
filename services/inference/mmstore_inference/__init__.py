"""mmstore_inference: vLLM serving that pulls images from mmstore by digest."""
