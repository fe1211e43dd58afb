"""What identifies the questions of a VQA results document (metrics.json), without torch: launch/make_table.py reads
documents and must not need the model's dependencies to compare them."""
from __future__ import annotations

import hashlib
import json


def questions_sha256(predictions: list[dict]) -> str:
    """sha256 of the questions evaluated (qid, image, question, ground truth; in any order): equal = same questions."""
    keys = sorted(json.dumps([str(p.get(k, "")) for k in ("qid", "image", "question", "ground_truth")])
                  for p in predictions)
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()
