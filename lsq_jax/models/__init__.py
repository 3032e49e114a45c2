"""Models: one backbone with a choice of sequence mixer (BaseConv, softmax or linear attention)."""
