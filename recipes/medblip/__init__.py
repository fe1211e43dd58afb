"""MedBLIP: BLIP (ITC + ITM + LM) adapted to radiology, with DAPT, self-distillation and VQA-RAD recipes."""
