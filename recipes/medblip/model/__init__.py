"""The BLIP model of the MedBLIP recipes: towers, pretraining and VQA models, losses, weights in and out."""
