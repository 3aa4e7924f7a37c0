"""The pairwise user study: its SQLite store and its web app."""
