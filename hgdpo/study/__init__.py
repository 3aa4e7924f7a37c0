"""The pairwise user study (paper Fig. 3, 5a): ``store`` its SQLite store, ``app`` its web app."""
