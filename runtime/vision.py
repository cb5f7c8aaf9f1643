"""The image side every capability starts from: preprocessing, the vision graph and the Q-Former's queries.

    encoder = ImageEncoder(manifest, runners)
    pixel_values = encoder.pixels(images)               # float32 [N, 3, H, W], as BlipImageProcessor makes them
    embeds = encoder.embed(pixel_values)                 # vision graph, max_batch at a time: [N, Np, Dv]
    outputs = encoder.queries(embeds)                    # qformer_query outputs: llm_prompt, image_feats, query KV
"""
import numpy as np

from runtime.image import DEFAULT_MAX_PIXELS, ImageProcessorConfig


def chunks(n: int, size: int):
    """slice objects covering range(n), `size` at a time."""
    for start in range(0, n, size):
        yield slice(start, start + size)


class ImageEncoder:
    def __init__(self, manifest, runners: dict):
        self.preprocess: ImageProcessorConfig = manifest.image
        self.vision, self.query = runners["vision"], runners["qformer_query"]
        self.max_batch = manifest.limits.max_batch
        self.max_image_pixels: int | None = DEFAULT_MAX_PIXELS  # (Blip2Pipeline's setting)

    def pixels(self, images: list) -> np.ndarray:
        return self.preprocess(images, self.max_image_pixels)

    def embed(self, pixel_values: np.ndarray) -> np.ndarray:
        """Vision-tower outputs, max_batch images per call: [N, Np, Dv]."""
        return np.concatenate([self.vision.run({"pixel_values": pixel_values[part]})["image_embeds"]
                               for part in chunks(len(pixel_values), self.max_batch)])

    def embed_images(self, images: list) -> np.ndarray:
        """Preprocess and embed max_batch images at a time (so a large gallery is never decoded all at once)."""
        return np.concatenate([self.embed(self.pixels(images[part])) for part in chunks(len(images), self.max_batch)])

    def queries(self, image_embeds: np.ndarray, names=None) -> dict[str, np.ndarray]:
        """The qformer_query graph's outputs (or those in `names`), max_batch images per call."""
        parts = [self.query.run({"image_embeds": image_embeds[part]})
                 for part in chunks(len(image_embeds), self.max_batch)]
        names = names or self.query.output_names
        return {n: np.concatenate([p[n] for p in parts]) for n in names}
