"""What several recipes share: BLIP's tokenizer and text normalisation, image-caption samples, VQA-RAD."""
