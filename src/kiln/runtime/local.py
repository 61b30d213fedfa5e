"""The local runtime: each instance sealed in a bubblewrap sandbox.

The image's unpacked rootfs is bound read-only as ``/``; ``/tmp`` is a fresh
tmpfs; the instance has its own PID, IPC and UTS namespaces and runs as the
image's unprivileged user with no capabilities (on the host too, also when
kiln itself runs as root); its environment is exactly what kiln passes. It
shares the host's network, listening on loopback at the port kiln gives it.

Instances are started in a session of their own and are not tied to the
daemon's life: a daemon that dies leaves them serving, and the next daemon
adopts them (``find``). Output goes straight to log files (stdout to
``<id>.out``, stderr to ``<id>.err``, see :mod:`kiln.logs.files`), never
through a pipe the daemon must drain, so a dead or slow daemon never blocks
an app.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from kiln import procs
from kiln.errors import MissingTool, RuntimeFailure
from kiln.logs.files import stderr_path, stdout_path
from kiln.runtime.base import InstanceHandle, InstanceSpec, Runtime

# util-linux is essential in Debian, so every Debian-based image has it.
SETPRIV = "/usr/bin/setpriv"


def _bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise MissingTool(
            "bubblewrap (bwrap) is not installed; the local runtime seals every instance with it",
            hint="sudo apt-get install bubblewrap, or run 'make setup'",
        )
    return path


class LocalRuntime(Runtime):
    name = "local"

    def check(self) -> None:
        _bwrap()

    def argv(self, spec: InstanceSpec) -> list[str]:
        args = [
            _bwrap(),
            "--ro-bind", str(spec.rootfs), "/",
            "--proc", "/proc",
            "--dev", "/dev",
            "--perms", "1777", "--tmpfs", "/tmp",
            "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--hostname", spec.id,
            "--chdir", spec.workdir,
            "--clearenv",
        ]  # fmt: skip
        for path, host in sorted(spec.volumes.items()):
            args += ["--bind", str(host), path]
        for key, value in sorted(spec.env.items()):
            args += ["--setenv", key, value]
        if os.geteuid() != 0:
            # Unprivileged kiln: a user namespace maps the app's uid onto ours.
            args += ["--unshare-user", "--uid", str(spec.uid), "--gid", str(spec.gid)]
            return [*args, "--", *spec.command]
        # kiln as root: no user namespace (its uid 1000 would be host root);
        # the image's own setpriv drops to the app's uid with no capabilities,
        # so the app is unprivileged on the host too.
        drop = [
            SETPRIV,
            f"--reuid={spec.uid}",
            f"--regid={spec.gid}",
            "--clear-groups",
            "--no-new-privs",
            "--bounding-set=-all",
            "--inh-caps=-all",
        ]
        return [*args, "--", *drop, *spec.command]

    def start(self, spec: InstanceSpec) -> InstanceHandle:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with (
            open(stdout_path(spec.log_path), "ab") as out,
            open(stderr_path(spec.log_path), "ab") as err,
        ):
            try:
                proc = subprocess.Popen(
                    self.argv(spec),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise RuntimeFailure(f"cannot start instance {spec.id}: {exc}") from exc
        started = procs.start_time(proc.pid)
        if started is None:
            proc.wait()
            raise RuntimeFailure(f"instance {spec.id} exited at once (exit {proc.returncode})")
        return InstanceHandle(spec.id, proc.pid, started)

    def alive(self, handle: InstanceHandle) -> bool:
        return procs.alive(handle.pid, handle.started)

    def stop(self, handle: InstanceHandle, grace: float) -> bool:
        if not self.alive(handle):
            return True
        # bwrap → its init in the new PID namespace → the app. Signal the app
        # itself (as a container engine signals PID 1): signalling bwrap would
        # only kill bwrap and leave the app to die untidily.
        app = self.app_pids(handle)
        for pid in app:
            procs.signal_pid(pid, signal.SIGTERM)
        if app and procs.wait_gone(handle.pid, handle.started, grace):
            return True
        procs.signal_group(handle.pid, signal.SIGKILL)
        procs.wait_gone(handle.pid, handle.started, 5)
        return False

    def app_pids(self, handle: InstanceHandle) -> list[int]:
        """The app's top processes (children of the sandbox's init)."""
        return [c for init in procs.children(handle.pid) for c in procs.children(init)]

    def find(self, marker: Path) -> list[InstanceHandle]:
        prefix = str(marker).rstrip("/") + "/"
        found = []
        for pid in procs.all_pids():
            args = procs.cmdline(pid)
            if not args or os.path.basename(args[0]) != "bwrap":
                continue
            if "--ro-bind" not in args or not args[args.index("--ro-bind") + 1].startswith(prefix):
                continue
            # Only the outer bwrap: its child (the namespace's init) has the same argv.
            parent_args = procs.cmdline(_ppid(pid))
            if parent_args == args:
                continue
            instance = _setenv_value(args, "KILN_INSTANCE")
            started = procs.start_time(pid)
            if instance and started is not None:
                found.append(InstanceHandle(instance, pid, started))
        return found


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def _setenv_value(args: list[str], key: str) -> str | None:
    for i, arg in enumerate(args[:-2]):
        if arg == "--setenv" and args[i + 1] == key:
            return args[i + 2]
    return None


from kiln.runtime import register  # noqa: E402

register(LocalRuntime)
