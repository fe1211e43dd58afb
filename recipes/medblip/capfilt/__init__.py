"""CapFilt (BLIP section 3.3) for radiology captions: bootstrap image-caption shards with the model's own captioner
(nucleus-sampled synthetic captions) and filter (ITM match probability >= a threshold). docs/capfilt.md.

Modules by job: models (loading a run as captioner/filter, precision, weight digest), generation (seeded nucleus
sampling), scoring (ITM probabilities, decisions), writing (one shard in, one shard out, the manifest), bootstrap
(the plan, ranks, resuming), ranks (failures as one line), report (histogram PNG, TensorBoard, Markdown), noise
(known swapped captions, precision/recall), compare (the stages of launch/demo.py --compare).
"""
