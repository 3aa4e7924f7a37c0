"""AI feedback: the scorers (PickScore and others) and the metrics built on them."""
