"""The one exception type the pipeline raises for problems a user can fix."""


class PipelineError(Exception):
    """Bad input or an impossible request. The message names the problem (and the file) and the fix."""
