"""omni_train: train a shared multimodal representation (speech, video, images, text) in one backbone."""

__version__ = "0.1.0"
