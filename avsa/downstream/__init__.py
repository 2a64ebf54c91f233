"""Downstream transfer of pretrained audio-visual networks (METHOD.md §6).

- `binary`: AVC-Bin (which clip?) and AVSA-Bin (which direction?) heads on frozen features;
- `action`: clip classification by fine-tuning or probing the video encoder (synthetic shards
  or a UCF101 / HMDB51 folder, `ucf`);
- `segmentation`: an FPN head on the frozen video encoder, optionally conditioned on audio and
  viewpoint context;
- `heads`, `fit`: the pair head, features cached once per split, and the one head-training loop
  (early stopping on held-out training clips) that every task uses;
- `stats`: IoU from confusion matrices and bootstrap confidence intervals;
- `run`: `avsa transfer` (one tracked MLflow run per transfer and seed); `compare`:
  `avsa compare` (seeds pooled per cell, with 95% intervals).
"""
