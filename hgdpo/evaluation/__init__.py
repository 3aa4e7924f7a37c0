"""Evaluation: SFT against HG-DPO win rates, colour shift, and the HTML reports."""
