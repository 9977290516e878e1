"""Training: the AGW recipe (``loop``, ``state``, ``schedules``, ``losses``) and the attribute
head on frozen embeddings (``attribute_training``)."""
