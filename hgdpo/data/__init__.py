"""Preference data: prompts, the AI-feedback dataset builder, winner/loser selection, the triplet format."""
