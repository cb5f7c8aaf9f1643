"""blip2-edge runtime: pure inference over engine folders (numpy + onnxruntime/tensorrt + tokenizers + pillow).

    from runtime import Blip2Pipeline
    pipe = Blip2Pipeline.from_dir("engines/demo/onnx")
    print(pipe.caption("examples/blue_circle_left.png"))

Command line: `python -m runtime caption --engines engines/demo/onnx IMAGE...`.
This package never imports torch or transformers.
"""
from runtime.errors import Blip2EdgeError, EngineFolderError, ImageInputError, PromptError
from runtime.pipeline import Blip2Pipeline
from runtime.retrieval import ImageGallery

__all__ = ["Blip2Pipeline", "ImageGallery", "Blip2EdgeError", "EngineFolderError", "ImageInputError", "PromptError"]
