"""Class names of the synthetic scenes: one source for the generator, the sample transform
and the transfer tasks. Mask ids follow the list: CLASSES[i] -> i + 1, 0 = background."""

from __future__ import annotations

CLASSES = ("disc", "square", "triangle", "ring", "cross", "stripes", "checker", "star")
NUM_CLASSES = len(CLASSES)
