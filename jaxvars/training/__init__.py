"""Training loops: the recommender (BPR), the defence stages (one joint step, stages as
masks), and self-supervised pretraining of the backbone (SimCLR)."""
