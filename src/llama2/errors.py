"""Errors a user can cause: bad files, flags, fields or requests.

They print as one line (no traceback); the CLI maps UsageError to exit code 2, the rest to 1.
"""


class Llama2Error(Exception):
    """A problem with the user's input that is reported as one line, not a traceback."""


class UsageError(Llama2Error):
    """A bad command-line flag or argument (exit code 2)."""


class FormatError(Llama2Error):
    """A file that is not what its header or extension says it is."""


class RequestError(Llama2Error):
    """An argument or request field that cannot be served: names the field (`param`), as
    OpenAI's error object does. The server answers it with a 400."""

    def __init__(self, param: str, message: str, code: str = "invalid_value"):
        super().__init__(f"{param}: {message}")
        self.param, self.code = param, code
