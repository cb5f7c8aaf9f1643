"""The BLIP-2 model and its checkpoints: what `export` builds on.

model (Blip2Edge, the PyTorch definition, readable top to bottom), masks (every attention mask), families (OPT and
T5 behind one interface), presets (published configurations, tiny to full size), checkpoint (reading and writing
`save_pretrained` folders), reference (Hugging Face's public API as its users call it: the parity reference),
random_checkpoint (`python -m train.blip2.random_checkpoint`: random weights at a preset's shapes, with trained-like
scales), tokenizers (the tokenizers random and ShapesCaps checkpoints ship), logs (quiet third-party logging).
"""
