# Figures, rebuilt from the tidy tables alone.


rule figures:
    input:
        scores=SCORES,
        em_rates=EM_RATES,
    output:
        **FIGURES,
    params:
        definition=config["evaluation"]["figure_em_definition"],
    log:
        f"{LOGS}/figures/{{judge}}.log",
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/figures.py"
