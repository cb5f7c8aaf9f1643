"""ShapesCaps, the synthetic demo: images of coloured shapes with captions and questions (synthetic), the recipe
that trains `models/demo` from scratch (recipe, stages, backbones, reading) and its held-out evaluation (evaluate).
`python -m train demo` runs it."""
