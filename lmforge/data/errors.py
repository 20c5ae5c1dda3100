"""The one error type for bad input data."""


class DataError(ValueError):
    """Bad input data; the message starts with `file:line:` so the user can find and fix it."""


def json_problem(e: Exception) -> str:
    """What is wrong with a line json could not read: "malformed JSON (unterminated string starting at column
    9)" (json's own message ends in "at" for some problems: said once)."""
    msg, col = getattr(e, "msg", str(e)), getattr(e, "colno", None)
    msg = msg[:1].lower() + msg[1:].removesuffix(" at")
    return f"malformed JSON ({msg}" + (f" at column {col})" if col is not None else ")")
