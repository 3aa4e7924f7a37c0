"""AI feedback: the scorers (PickScore, the paper's; CLIP, HPS v2, aesthetic, plug-ins) and ranking by them.

``base`` the scorer interface and the CLIP embedding they share · ``scorers`` the feedback scorers and
PickScore's folder layout · ``metrics`` the evaluation metrics · ``selection`` best-of-N ranking.
"""
