"""Bundle-local code for progswin_prognosis: only what the JSON configs cannot say.

Self-contained on purpose: nothing here imports the project's ``analysis`` package, so the
bundle can be zipped and run alone.
"""
