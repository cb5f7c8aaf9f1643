"""Training on users' data: data sets (COCO captions, JSONL, WebDataset shards: datasets, streaming, sources), the
stage-1, stage-2 and fine-tuning tasks (tasks, options), the loop (trainer: data parallel, resumable) and the
losses (ITC, ITM with hard negatives, ITG, LM). `python -m train stage1|stage2|finetune` runs it."""
