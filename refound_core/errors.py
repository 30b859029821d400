"""User-facing errors. Every bad input raises :class:`InputError` with one actionable message:
what was wrong, which input, what to do. The CLI prints it as one line (no traceback), the
plugin shows it in the message bar, the server returns it as a 400 response."""


class InputError(ValueError):
    """Bad user input (file, layer, extent, CRS, field name, checkpoint...)."""


class CheckpointError(InputError):
    """A checkpoint folder that is missing, of another format version, or inconsistent."""
