"""blip2-edge trainer package: model presets, masks and (later) the stage-1/stage-2 trainer.

`export` imports the presets and the mask builders from here, so training and
export share one definition of each attention mask.
"""
