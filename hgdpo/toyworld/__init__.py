"""A toy world of human figures in which HG-DPO can be watched fixing anatomy on a CPU (see README, "Toy world")."""
