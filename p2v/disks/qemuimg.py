"""Thin, typed wrappers over qemu-img (explicit formats always; qemu never probes)."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2v.errors import InvalidInput, MissingComponent, OutputError

QEMU_IMG = "qemu-img"
_PROGRESS_RE = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def _run(args: list[str], *, what: str, timeout: float = 600, error: type = InvalidInput) -> str:
    try:
        proc = subprocess.run(
            [QEMU_IMG, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise MissingComponent("qemu-img not found", hint="apt-get install qemu-utils") from exc
    except subprocess.TimeoutExpired as exc:
        raise error(f"{what}: qemu-img {args[0]} timed out after {timeout:.0f}s") from exc
    if proc.returncode != 0:
        msg = _last_line(proc.stderr) or f"exit status {proc.returncode}"
        raise error(f"{what}: {msg}")
    return proc.stdout


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    # qemu-img repeats "Could not open 'x': Could not open 'x': reason": keep the reason.
    line = lines[-1]
    line = re.sub(r"^qemu-img: ", "", line)
    parts = [p.strip() for p in re.split(r"Could not open '[^']*':", line) if p.strip()]
    return parts[-1] if parts else line


def info(filename: str, fmt: str, *, what: str, backing_chain: bool = False) -> Any:
    args = ["info", "--output=json", "-f", fmt]
    if backing_chain:
        args.append("--backing-chain")
    args.append(filename)
    return json.loads(_run(args, what=what, timeout=60))


def check(filename: str, fmt: str, *, what: str) -> dict[str, Any]:
    """``qemu-img check``; returns its JSON plus ``_rc`` (0 clean, 2 corrupt, 3 leaks only,
    63 no check for this format) and ``_error`` (qemu's first ERROR line) when it failed."""
    try:
        proc = subprocess.run(
            [QEMU_IMG, "check", "--output=json", "-f", fmt, filename],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
    except FileNotFoundError as exc:
        raise MissingComponent("qemu-img not found", hint="apt-get install qemu-utils") from exc
    except subprocess.TimeoutExpired as exc:
        raise InvalidInput(f"{what}: qemu-img check did not finish in 600 s") from exc
    if proc.returncode in (0, 2, 3) and proc.stdout.strip().startswith("{"):
        data: dict[str, Any] = json.loads(proc.stdout)
        data["_rc"] = proc.returncode
        return data
    if proc.returncode == 63:  # format does not support checks
        return {"_rc": 63}
    errors = [ln.split("ERROR:", 1)[1].strip() for ln in proc.stderr.splitlines() if "ERROR:" in ln]
    return {"_rc": proc.returncode, "_error": errors[0] if errors else _last_line(proc.stderr)}


def verify_integrity(filename: str, fmt: str, *, what: str, label: str | None = None) -> int:
    """Raise :class:`InvalidInput` naming ``what`` when the image is truncated or corrupt.

    Leaked clusters (rc 3) are harmless for reading. Returns the number of check errors (0).
    """
    result = check(filename, fmt, what=what)
    rc = result.get("_rc")
    if rc == 63:
        return 0
    name = label or fmt
    if rc not in (0, 2, 3):
        raise InvalidInput(f"{what}: {name} image is corrupt or truncated ({result.get('_error')})")
    corrupt = int(result.get("corruptions", 0) or 0)
    errors = int(result.get("check-errors", 0) or 0)
    if corrupt or errors or rc == 2:
        raise InvalidInput(
            f"{what}: {name} image is corrupt or truncated (qemu-img check: {corrupt} corruptions, "
            f"{errors} check errors)"
        )
    return 0


def create_overlay(overlay: Path, backing: str, backing_fmt: str) -> None:
    _run(
        ["create", "-q", "-f", "qcow2", "-F", backing_fmt, "-b", backing, str(overlay)],
        what=str(overlay), error=OutputError,
    )  # fmt: skip


def rebase_unsafe(overlay: Path, backing: str, backing_fmt: str) -> None:
    _run(
        ["rebase", "-u", "-f", "qcow2", "-F", backing_fmt, "-b", backing, str(overlay)],
        what=str(overlay), error=OutputError,
    )  # fmt: skip


def commit(overlay: Path) -> None:
    """Write the overlay's data into its backing file (the overlay is left empty)."""
    _run(["commit", "-q", "-f", "qcow2", "-d", str(overlay)], what=str(overlay), error=OutputError)


class ConvertJob:
    """A running ``qemu-img convert`` (copy ``src`` into a new ``dst``, zeroes skipped).

    Progress is parsed from ``-p`` output and reported as a 0..1 fraction. ``wait()``
    raises :class:`InvalidInput` naming the source when the copy fails; ``cancel()``
    kills it and removes ``dst``.
    """

    def __init__(
        self,
        src: str,
        src_fmt: str,
        dst: Path,
        dst_fmt: str = "qcow2",
        *,
        what: str,
        progress: Callable[[float], None] | None = None,
        compress: bool = False,
    ) -> None:
        self.dst = dst
        self.what = what
        self._progress = progress
        args = [QEMU_IMG, "convert", "-p", "-W", "-m", "8", "-f", src_fmt, "-O", dst_fmt]
        if dst_fmt == "qcow2":
            args += ["-o", "compat=1.1"]
            if compress:
                args.append("-c")
        args += [src, str(dst)]
        self.t0 = time.monotonic()
        self.finished_at: float | None = None
        self.seconds = 0.0
        try:
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError as exc:
            raise MissingComponent("qemu-img not found", hint="apt-get install qemu-utils") from exc
        self._err = b""
        self._t_err = threading.Thread(target=self._read_err, daemon=True)
        self._t_out = threading.Thread(target=self._read_out, daemon=True)
        self._t_err.start()
        self._t_out.start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self._err = self.proc.stderr.read()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        while True:
            chunk = self.proc.stdout.read1(256)  # type: ignore[attr-defined]
            if not chunk:
                break
            buf = (buf + chunk)[-256:]
            matches = _PROGRESS_RE.findall(buf)
            if matches and self._progress:
                self._progress(float(matches[-1]) / 100.0)
        self.finished_at = time.monotonic()

    def wait(self) -> float:
        rc = self.proc.wait()
        self._t_out.join()
        self._t_err.join()
        self.seconds = (self.finished_at or time.monotonic()) - self.t0
        if rc != 0:
            self.dst.unlink(missing_ok=True)
            msg = _last_line(self._err.decode(errors="replace"))
            raise InvalidInput(f"{self.what}: reading the disk failed: {msg or f'qemu-img exit {rc}'}")
        if self._progress:
            self._progress(1.0)
        return self.seconds

    def cancel(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._t_out.join(timeout=5)
        self._t_err.join(timeout=5)
        self.dst.unlink(missing_ok=True)


def convert(
    src: str,
    src_fmt: str,
    dst: Path,
    dst_fmt: str = "qcow2",
    *,
    what: str,
    progress: Callable[[float], None] | None = None,
) -> float:
    """Copy ``src`` into a new image ``dst``; returns seconds taken."""
    job = ConvertJob(src, src_fmt, dst, dst_fmt, what=what, progress=progress)
    try:
        return job.wait()
    except BaseException:
        job.cancel()
        raise
