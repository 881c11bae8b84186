"""One exception type for bad input, so every command can print one clear line and exit non-zero."""

from __future__ import annotations


class TraceError(Exception):
    """Bad or unreadable input. The message names the file and, where known, the line, row or field."""

    def __init__(self, message: str, *, path: object | None = None, where: str | None = None):
        self.path = str(path) if path is not None else None
        self.where = where
        parts = []
        if self.path:
            parts.append(self.path if not where else f"{self.path}: {where}")
        elif where:
            parts.append(where)
        parts.append(message)
        super().__init__(": ".join(parts))


def run_cli(main, argv=None) -> int:
    """Run a command's main(); turn TraceError (and other expected input errors) into one line on stderr."""
    import sys

    try:
        return main(argv) or 0
    except TraceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        name = getattr(exc, "filename", None) or ""
        print(f"error: {name}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 1
