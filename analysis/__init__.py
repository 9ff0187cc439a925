"""HCC-after-TACE prognosis study: cohort I/O, synthetic cohort, radiomics, statistics, report.

Modules, one concern each: ``io`` (atomic writes), ``cohort`` (contract, validation),
``datalists``, ``synthetic``, ``radiomics``, ``metrics``, ``models`` (classical classifiers),
``mrecist``, ``survival`` (Kaplan-Meier, Cox), ``nomogram``, ``table1``, ``report``, ``study``.
The command line (``python -m analysis VERB``) is a thin fire layer in ``analysis.cli``.
"""

__version__ = "0.1.0"
