"""BLIP-2 recipes: Q-Former stage 1 (stage1.py), LLM stage 2 (stage2.py), VQA-RAD (vqa.py); see docs/blip2.md."""
