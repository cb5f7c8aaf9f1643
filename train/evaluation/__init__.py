"""Standard evaluation on users' data: captioning (BLEU-4, CIDEr), VQA (VQAv2 accuracy) and retrieval (R@1/5/10)
metrics, and the tasks that compute them for a checkpoint or an engine folder. `python -m train eval --data` runs
it."""
