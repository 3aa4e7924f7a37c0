"""Evaluation: SFT against HG-DPO as the paper measures it (Tables 1-3, 5, 6; Fig. 5b).

``evaluate`` the run · ``winrate`` win rates with ties counting half and their intervals ·
``colorshift`` the HSV shift · ``statistics`` latent statistics · ``report`` the evaluation report ·
``dataset_report`` a dataset's report · ``figures`` the plots and contact sheets both reports use.
"""
