"""First-boot actions for a converted Windows guest: a service that runs a batch script.

Mechanism (nothing beyond what every Windows has):

* ``%SystemRoot%\\p2v\\firstboot.cmd`` holds the actions (install the staged virtio-win
  drivers with pnputil, uninstall VMware Tools with msiexec, ...). Each action that
  succeeds leaves a ``step-N.done`` marker next to the script, so a later boot only
  retries what failed.
* The service ``p2v-firstboot`` (own process, automatic start, LocalSystem, depends on
  PlugPlay) runs ``cmd.exe /c start "" /b cmd.exe /c <script>``. cmd.exe does not speak
  the service-control protocol, so the Service Control Manager records a start failure
  (event 7000/7009) and may kill the process it started; ``start /b`` therefore hands the
  script to a detached cmd.exe that outlives it. ErrorControl is 0 (ignore): a failed
  first-boot action never blocks boot.
* The script counts boots in ``firstboot.attempts``. When every action is done, or after
  ``retries`` boots, it runs ``sc config p2v-firstboot start= disabled`` so it never runs
  again. Everything it does, with exit codes, is appended to ``firstboot.log``.

Exit codes treated as success: pnputil 0, 3010 (reboot needed) and 259 (nothing to
install); msiexec 0, 3010, 1641 (reboot started) and 1605 (product not installed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from p2v.convert.windows.registry import RegValue

SERVICE_NAME = "p2v-firstboot"
FIRSTBOOT_DIR = "p2v"  # below %SystemRoot%
SCRIPT_NAME = "firstboot.cmd"
LOG_NAME = "firstboot.log"
COUNTER_NAME = "firstboot.attempts"


@dataclass(frozen=True)
class FirstBootAction:
    """One command the guest runs at first boot, and the exit codes that mean done."""

    description: str
    command: str
    ok_codes: tuple[int, ...] = (0,)
    # Commands that loop over files cannot report one exit code: they are done when run.
    always_done: bool = False


@dataclass
class FirstBootPlan:
    actions: list[FirstBootAction] = field(default_factory=list)
    retries: int = 3

    @property
    def commands(self) -> list[str]:
        return [a.command for a in self.actions]


def pnputil_action(staged_dir_win: str, *, modern: bool) -> FirstBootAction:
    """Install every .inf under the staged driver folder (Windows path, may use %SystemRoot%)."""
    if modern:
        return FirstBootAction(
            "install the staged virtio-win drivers",
            f'pnputil /add-driver "{staged_dir_win}\\*.inf" /subdirs /install',
            ok_codes=(0, 3010, 259),
        )
    return FirstBootAction(
        "install the staged virtio-win drivers (pnputil -i -a, one .inf at a time)",
        f'for /r "{staged_dir_win}" %%F in (*.inf) do pnputil -i -a "%%F"',
        always_done=True,
    )


def msi_uninstall_action(product: str, guid: str) -> FirstBootAction:
    return FirstBootAction(
        f"uninstall {product}",
        f"msiexec /x {guid} /qn /norestart",
        ok_codes=(0, 3010, 1641, 1605),
    )


def _step(n: int, action: FirstBootAction) -> list[str]:
    done = f'"%P2VDIR%\\step-{n}.done"'
    lines = [
        f"rem step {n}: {action.description}",
        f"if exist {done} goto after{n}",
        f'>>"%LOG%" echo %DATE% %TIME% step {n}: {action.command}',
        f'{action.command} >>"%LOG%" 2>&1',
        "set RC=%ERRORLEVEL%",
        f'>>"%LOG%" echo %DATE% %TIME% step {n}: exit status %RC%',
    ]
    if action.always_done:
        lines.append(f">{done} echo %RC%")
    else:
        lines += [
            "set OK=0",
            *[f'if "%RC%"=="{code}" set OK=1' for code in action.ok_codes],
            f'if "%OK%"=="1" (>{done} echo %RC%) else (set FAILED=1)',
        ]
    lines.append(f":after{n}")
    return lines


def render_script(plan: FirstBootPlan) -> bytes:
    """The batch script, CRLF line endings (cmd.exe labels need them)."""
    lines = [
        "@echo off",
        "rem Written by p2v at conversion. Runs at boot through the p2v-firstboot service until",
        f"rem every step succeeded or {plan.retries} boots were tried, then disables that service.",
        "setlocal EnableExtensions",
        f'set "P2VDIR=%SystemRoot%\\{FIRSTBOOT_DIR}"',
        f'set "LOG=%P2VDIR%\\{LOG_NAME}"',
        f'set "COUNTER=%P2VDIR%\\{COUNTER_NAME}"',
        f"set MAX_ATTEMPTS={plan.retries}",
        "set ATTEMPT=0",
        'if exist "%COUNTER%" set /p ATTEMPT=<"%COUNTER%"',
        "set /a ATTEMPT=ATTEMPT+1",
        '>"%COUNTER%" echo %ATTEMPT%',
        '>>"%LOG%" echo %DATE% %TIME% boot %ATTEMPT% of at most %MAX_ATTEMPTS%',
        "if %ATTEMPT% GTR %MAX_ATTEMPTS% goto giveup",
        "set FAILED=0",
    ]
    for n, action in enumerate(plan.actions, start=1):
        lines += _step(n, action)
    lines += [
        'if "%FAILED%"=="1" goto retry',
        '>>"%LOG%" echo %DATE% %TIME% all first-boot steps done; disabling the service',
        f'sc config {SERVICE_NAME} start= disabled >>"%LOG%" 2>&1',
        "exit /b 0",
        ":retry",
        "if %ATTEMPT% GEQ %MAX_ATTEMPTS% goto giveup",
        '>>"%LOG%" echo %DATE% %TIME% some steps failed; they run again at the next boot',
        "exit /b 1",
        ":giveup",
        '>>"%LOG%" echo %DATE% %TIME% giving up after %MAX_ATTEMPTS% boots; disabling the service',
        f'sc config {SERVICE_NAME} start= disabled >>"%LOG%" 2>&1',
        "exit /b 1",
    ]
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def service_values(retries: int) -> dict[str, RegValue]:
    """Values of Services\\p2v-firstboot."""
    script = f"%SystemRoot%\\{FIRSTBOOT_DIR}\\{SCRIPT_NAME}"
    image = f'%SystemRoot%\\System32\\cmd.exe /c start "p2v" /b %SystemRoot%\\System32\\cmd.exe /c {script}'
    return {
        "Type": RegValue.dword(0x10),  # SERVICE_WIN32_OWN_PROCESS
        "Start": RegValue.dword(2),  # automatic
        "ErrorControl": RegValue.dword(0),  # ignore
        "ImagePath": RegValue.expand_sz(image),
        "ObjectName": RegValue.sz("LocalSystem"),
        "DisplayName": RegValue.sz("p2v first-boot actions"),
        "Description": RegValue.sz(
            f"Finishes the p2v conversion (drivers, guest-tools removal); "
            f"disables itself when done or after {retries} boots. Log: {FIRSTBOOT_DIR}\\{LOG_NAME}"
        ),
        "DependOnService": RegValue.multi_sz(["PlugPlay"]),
    }
