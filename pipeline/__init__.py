"""LoLCATs linearization library: hybrid attention swap, data, training, evaluation, tracking."""
