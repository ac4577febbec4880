"""User-facing errors: bad input that the user can fix.

The CLI prints these as one paragraph and exits non-zero; anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """Bad input (file, params, asset) with a message that names it and says how to fix it."""
