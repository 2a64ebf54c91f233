"""Downstream transfer of pretrained audio-visual networks (METHOD.md §6): `run` is
`avsa transfer` and holds the task registry (`TASKS`); every task's head trains through `fit`;
`compare` is `avsa compare`, the table of transfer results with bootstrap intervals (`stats`).
"""
