"""The p2v exception tree.

Every error the library raises on purpose is a :class:`P2VError`. Each class
carries the process exit code the CLI uses for it, so the exit-code table in
the README is this module (``p2v.errors.EXIT_CODES`` lists it, and a test
checks that the README agrees).

Messages name the input that was wrong and what to do about it; ``hint``
carries the "how to fix" line where there is one. Library exceptions from
below (guestfs ``RuntimeError``, ``paramiko.SSHException``, QMP errors) are
wrapped at our boundary with ``raise ... from exc`` so the cause is kept.
"""

from __future__ import annotations


class P2VError(Exception):
    """Unexpected p2v failure."""

    exit_code = 1

    def __init__(self, message: str | None = None, *, hint: str | None = None) -> None:
        self.message = message or (self.__doc__ or self.__class__.__name__).strip()
        self.hint = hint
        super().__init__(self.message)

    def to_dict(self) -> dict[str, object]:
        return {
            "error": self.__class__.__name__,
            "message": self.message,
            "hint": self.hint,
            "exit_code": self.exit_code,
        }


class UsageError(P2VError):
    """Bad command-line usage."""

    exit_code = 2


class SourceNotFound(P2VError):
    """The source does not exist or cannot be opened."""

    exit_code = 3


class InvalidInput(P2VError):
    """The input is corrupt, malformed or unsafe to process."""

    exit_code = 4


class UnsafeInput(InvalidInput):
    """The input tries to escape its directory or exhaust resources."""


class ChecksumMismatch(InvalidInput):
    """A file does not match the checksum recorded for it."""


class UnsupportedGuest(P2VError):
    """The guest cannot be converted (no OS, encrypted, unsupported version, no drivers)."""

    exit_code = 5


class DriversNotFound(UnsupportedGuest):
    """No matching drivers for this guest in the driver source."""


class HostKeyError(P2VError):
    """The SSH host key is not trusted."""

    exit_code = 6


class UnknownHostKey(HostKeyError):
    """The SSH host is not in the known_hosts file."""


class ChangedHostKey(HostKeyError):
    """The SSH host key differs from the one recorded in known_hosts."""


class RemoteError(P2VError):
    """The remote source failed (connection, authentication, transfer, remote command)."""

    exit_code = 7


class MissingComponent(P2VError):
    """A tool p2v drives is missing or broken on this host."""

    exit_code = 8


class ConversionError(P2VError):
    """A conversion step failed inside the guest."""

    exit_code = 9


class VmError(P2VError):
    """The QEMU runtime failed."""

    exit_code = 10


class OutputError(P2VError):
    """The output location cannot be written."""

    exit_code = 11


class SiteError(P2VError):
    """The DR site or its catalog cannot be used (unknown machine, newer schema, damaged catalog)."""

    exit_code = 12


class UnknownMachine(SiteError):
    """No protected machine has this name at the site."""


class Busy(P2VError):
    """Another p2v process holds this machine's lock (a sync, retention or removal is running)."""

    exit_code = 13


class VerifyFailed(P2VError):
    """A recovery point does not match its recorded hashes or its source."""

    exit_code = 14


class SourceChanged(P2VError):
    """The source no longer matches what the site recorded for it (size or identity changed)."""

    exit_code = 15


class RunFailed(P2VError):
    """A drill, failover or fallback run ended failed or aborted (see `p2v run show`)."""

    exit_code = 16


class SplitBrain(P2VError):
    """Production was written to after failover: it no longer matches the recovery point DR started from."""

    exit_code = 17


class Interrupted(P2VError):
    """Interrupted by the user; partial output was removed."""

    exit_code = 130


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected internal error (a bug: please report it with the log)",
    2: "usage error: bad command-line arguments or options",
    3: "source not found or not readable",
    4: "invalid or unsafe input: corrupt image, bad checksum, path escape, XML bomb, bad descriptor",
    5: "unsupported guest: no OS found, encrypted root without key, no matching drivers",
    6: "SSH host key not trusted or changed (run `p2v trust`)",
    7: "remote source failed: SSH connection, authentication or transfer",
    8: "a required host component is missing or broken (run `p2v doctor`)",
    9: "conversion step failed inside the guest",
    10: "QEMU runtime failure (VM start/stop/console)",
    11: "output location cannot be written (exists, not empty, no space)",
    12: "DR site problem: unknown machine, damaged catalog, catalog from a newer p2v",
    13: "busy: another p2v process holds the machine's lock (a sync is running)",
    14: "verification failed: a recovery point does not match its hashes or its source",
    15: "source changed: its size or identity differs from what the site recorded",
    16: "run failed: a drill, failover or fallback step failed or the run was aborted",
    17: "split-brain: production changed after failover (use --discard-production-changes to overwrite it)",
    130: "interrupted (Ctrl-C); partial output removed",
}
