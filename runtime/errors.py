"""Typed errors raised by the runtime.

Every error message says what is wrong *and* how to fix it, for a deployment
engineer who has never read the code. All inherit from `Blip2EdgeError`, so
callers can catch one type:

    from runtime.errors import Blip2EdgeError
    try:
        pipe = Blip2Pipeline.from_dir("engines/demo/onnx")
    except Blip2EdgeError as e:
        print(e)
"""


class Blip2EdgeError(Exception):
    """Base class of every error blip2-edge raises on purpose."""


class EngineFolderError(Blip2EdgeError):
    """The engine folder is missing, incomplete, corrupt or from another format version."""


class ImageInputError(Blip2EdgeError, ValueError):
    """An image could not be read or is of a kind the pipeline cannot use."""


class ImageTooLargeError(ImageInputError):
    """An image has more pixels than the caller allows (checked from its header, before it is decoded)."""


class ImageFormatError(ImageInputError):
    """Bytes in a file format the caller does not take (services take PNG, JPEG, WebP, BMP and GIF)."""


class PromptError(Blip2EdgeError, ValueError):
    """A prompt or a generation setting is out of range (empty, too long, ...)."""


class BackendError(Blip2EdgeError):
    """The requested inference backend (onnxruntime / tensorrt) is unavailable or failed."""


class RequestError(Blip2EdgeError):
    """A request a service answers with a 4xx (or 503/504) status, before running anything or instead of it."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}
