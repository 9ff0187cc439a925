"""HCC-after-TACE prognosis study: cohort I/O, synthetic cohort, radiomics, statistics, report.

Modules, one concern each: ``io`` (atomic writes, ``save_figure``), ``cohort`` (contract,
validation), ``datalists``, ``synthetic``, ``radiomics``, ``metrics``, ``calibration``, ``models``
(classical classifiers), ``burden``, ``segmentation_agreement``, ``mrecist``; survival in four:
``survival_table`` (reading and joining the per-patient table, duration/event checks),
``km`` (Kaplan-Meier, log-rank, the Fig. 6 grid), ``cox`` (Cox model, Wald tests, the study's
covariate choice and penalty fallback) and ``survival_plots`` (their figures); ``nomogram``,
``table1``, ``report``, ``pipeline`` and ``study`` (the end-to-end runner), ``bundle_archive``;
DICOM in three: ``dicom_import`` (series -> cohort folder, with its checks), ``dicom_seg`` (masks ->
DICOM Segmentation objects) and ``dicom_synth`` (synthetic series, the import's test input).

Figures: a plot function takes ``ax=None`` and returns the Axes (multi-panel: ``fig=None``, returns
the Figure) and never writes a file; callers save with ``analysis.io.save_figure`` (PNG + the data
behind it as CSV). The command line (``python -m analysis VERB``) is a thin fire layer in
``analysis.cli``, the only place that chooses matplotlib's backend.
"""

__version__ = "0.1.0"
