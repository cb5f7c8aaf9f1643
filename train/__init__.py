"""blip2-edge's PyTorch side: the BLIP-2 model and its checkpoints (train.blip2, what export builds on), the
ShapesCaps demo (train.shapescaps), training on users' data (train.training) and its evaluation (train.evaluation).
`python -m train --help` lists the commands."""
