"""The one exception type that means "the user gave us something wrong" (exit code 2, one line, no traceback)."""


class DistillError(Exception):
    """A problem with the user's input: recipe, files, models or data. The message is shown as one line."""
