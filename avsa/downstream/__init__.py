"""Downstream transfer of pretrained audio-visual networks (METHOD.md §6).

- `run`: `avsa transfer` (one tracked MLflow run per transfer and seed) and the task registry
  `TASKS` (task name -> its class), dispatched by `run_task`;
- `fit`: the one head-training path every task takes (`TransferHead`): features cached once
  per split, `fit_head` with early stopping on held-out training clips;
- `binary`: AVC-Bin (which clip?) and AVSA-Bin (which direction?) heads on frozen features;
- `action`: clip classification by fine-tuning or probing the video encoder (synthetic shards
  or a UCF101 / HMDB51 folder, `ucf`);
- `segmentation`: an FPN head on the frozen video encoder, optionally conditioned on audio and
  viewpoint context;
- `heads`: the pair head, frozen features, cached encodings; `sources`: shard splits;
- `stats`: IoU from confusion matrices and bootstrap confidence intervals; `compare`:
  `avsa compare` (seeds pooled per cell, with 95% intervals).
"""
