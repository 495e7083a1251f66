"""The method-agnostic machinery: the training loop, evaluation, metrics, processes, interrupts, progress."""
