"""Preference data (paper Section 3.1, Eq. 4-6): the triplet format and the dataset builder.

``format`` the on-disk triplet format and its paths · ``writers`` / ``readers`` write and read it ·
``builder`` makes pools from your model, scores them with the AI feedback and keeps the winner and
the loser · ``people`` the people filter · ``pickapic`` Pick-a-Pic parquet input · ``synthetic``
plumbing-test triplets.
"""
