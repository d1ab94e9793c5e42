"""Local backend: Debian's bubblewrap (0.8) plus host-side limits and egress control.

Mechanism, in order, for one run:
  1. bwrap starts with every namespace unshared (user, pid, net, ipc, uts, cgroup), all
     capabilities dropped, further user namespaces disabled and a seccomp filter (seccomp.py),
     and blocks (`--block-fd`) before
     it runs the command, reporting its pid-1 process on `--info-fd`.
  2. While it is blocked the host puts that process in a fresh cgroup (memory, pids, cpu),
     applies rlimits to it (inherited by everything it forks), and — only if the run may use the
     network or a credential endpoint — enters the sandbox's network namespace from a short-lived
     thread to open listeners on 127.0.0.1 there. Connections to them are served by this process
     (the egress proxy, credential endpoints): there is no helper process inside the sandbox and
     no host socket path visible to it. The sandbox has no other interface than loopback, so no
     DNS and no direct TCP/UDP.
  3. The command is released; the host enforces the wall clock (SIGTERM to every process in the
     sandbox's pid namespace, then SIGKILL of its pid 1, which makes the kernel kill the whole
     namespace, daemons included), the output cap, the pids cap and the disk cap.

Filesystem: /usr read-only, a curated read-only /etc (no shadow, no ssh host keys, no resolver),
no host home or /work, the workspace the only writable bind (its .git/hooks and .git/config
read-only), a size-bounded private /tmp, its own /proc and a minimal /dev.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import errno
import json
import math
import os
import resource
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from adapters.sandbox.base import (
    INPUTS_DIR,
    OUTBOX_DIR,
    HeartbeatCallback,
    Outcome,
    SandboxError,
    SandboxJob,
    SandboxJobResult,
    SandboxResult,
    SandboxSpec,
)
from adapters.sandbox import seccomp
from adapters.sandbox.cgroups import Cgroup
from adapters.sandbox.egress import Dialer, EgressProxy, Resolver
from adapters.sandbox.model_proxy import ModelProxy, credential_env
from adapters.sandbox.patch import OUTBOX_FILE_CAP, patch_spec, read_patch_result

PROXY_PORT = 3128
WORKSPACE = "/workspace"
CLONE_NEWNET = 0x40000000
HEARTBEAT_EVERY_S = 5.0
TRUNCATION_MARK = b"\n[conveyor: output truncated at %d bytes]\n"

# Read-only /etc entries a toolchain needs. Everything else in /etc stays out (shadow, ssh host
# keys, ssl/private, package-manager credentials such as pip.conf/npmrc, resolv.conf).
ETC_ENTRIES = (
    "passwd", "group", "hosts", "nsswitch.conf", "ld.so.cache", "ld.so.conf", "ld.so.conf.d",
    "ssl/certs", "ssl/openssl.cnf", "ca-certificates", "ca-certificates.conf", "alternatives",
    "localtime", "timezone", "mime.types", "protocols", "services", "os-release", "debian_version",
    "gai.conf", "host.conf", "inputrc", "profile", "bash.bashrc", "shells", "python3", "python3.11",
    "magic", "magic.mime", "terminfo", "locale.alias", "java-17-openjdk",
)

BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
    "TMPDIR": "/tmp",
    "TERM": "dumb",
    "GIT_CONFIG_NOSYSTEM": "1",
}

_libc = ctypes.CDLL(None, use_errno=True)


class _Stop(Exception):
    pass


_WORKING_BWRAP: set[str] = set()
"""bwrap binaries that created a sandbox in this process."""


class BubblewrapSandbox:
    """The local Sandbox. Constructor arguments exist for tests and benchmarks:
    `resolver`/`dial` are passed to the egress proxy (see egress.py), `environ` is where
    credential endpoints read keys (default: the worker's os.environ)."""

    name = "local"

    def __init__(
        self,
        *,
        bwrap: str = "bwrap",
        resolver: Resolver | None = None,
        dial: Dialer | None = None,
        environ: Mapping[str, str] | None = None,
        term_grace_s: float = 5.0,
        use_cgroups: bool = True,
        use_seccomp: bool | None = None,
        scratch_dir: Path | None = None,
    ) -> None:
        self.bwrap = shutil.which(bwrap) or bwrap
        self.resolver = resolver
        self.dial = dial
        self.environ = environ if environ is not None else os.environ
        self.term_grace_s = term_grace_s
        self.use_cgroups = use_cgroups
        self.use_seccomp = seccomp.supported() if use_seccomp is None else use_seccomp
        self.scratch_dir = scratch_dir
        self._probe: str | None | bool = False  # False = not probed yet
        self.last_proxies: list[EgressProxy] = []
        self.cgroups_used = False

    # ---- availability (fail closed) ----------------------------------------------------------

    def available(self) -> str | None:
        if self._probe is not False:
            return self._probe  # type: ignore[return-value]
        if self.bwrap in _WORKING_BWRAP:  # a backend is made per run; probe a working bwrap once per process
            self._probe = None
            return None
        if not os.path.isfile(self.bwrap) or not os.access(self.bwrap, os.X_OK):
            self._probe = "bubblewrap (bwrap) is not installed; install the 'bubblewrap' package"
            return self._probe
        try:
            import subprocess

            probe = subprocess.run(
                [self.bwrap, *_NAMESPACE_ARGS, "--ro-bind", "/usr", "/usr", *_usr_links(), "--", "/bin/true"],
                capture_output=True,
                timeout=10,
                env={},
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            self._probe = f"bubblewrap cannot start: {exc}"
            return self._probe
        if probe.returncode != 0:
            err = probe.stderr.decode(errors="replace").strip()
            self._probe = f"bubblewrap cannot create namespaces here: {err or probe.returncode}"
            return self._probe
        self._probe = None
        _WORKING_BWRAP.add(self.bwrap)  # failures are not cached: installing bwrap needs no restart
        return None

    # ---- public API --------------------------------------------------------------------------

    async def run(self, spec: SandboxSpec, heartbeat: HeartbeatCallback | None = None) -> SandboxResult:
        started = time.monotonic()
        try:
            return await self._run(spec, heartbeat)
        except SandboxError as exc:
            return SandboxResult(outcome=Outcome.refused, detail=str(exc), duration_s=time.monotonic() - started)

    async def run_job(self, job: SandboxJob, heartbeat: HeartbeatCallback | None = None) -> SandboxJobResult:
        setup = None
        if job.setup is not None:
            setup = await self.run(job.setup, heartbeat)
            if setup.outcome != Outcome.ok:
                skipped = SandboxResult(outcome=Outcome.refused, detail="not run: the setup step failed")
                return SandboxJobResult(setup=setup, agent=skipped, patch_error="setup step failed")
        agent = await self.run(job.agent, heartbeat)
        result = SandboxJobResult(setup=setup, agent=agent, sandbox_id=agent.sandbox_id)
        if agent.outcome == Outcome.refused:
            result.patch_error = "agent step was refused"
            return result
        try:
            spec = patch_spec(job)
        except ValueError as exc:
            result.patch_error = str(exc)
            return result
        patch_run = await self.run(spec, heartbeat)
        result.patch, result.patch_error = read_patch_result(patch_run, job.max_patch_bytes)
        return result

    # ---- one run -----------------------------------------------------------------------------

    async def _run(self, spec: SandboxSpec, heartbeat: HeartbeatCallback | None) -> SandboxResult:
        reason = self.available()
        if reason:
            raise SandboxError(reason)
        workspace = _checked_workspace(spec.workspace)
        run_id = "lsb-" + uuid.uuid4().hex[:12]
        decisions: list[str] = []
        models = []
        for secret in spec.secrets:
            try:
                models.append(ModelProxy.from_environ(secret, self.environ, decisions))
            except (KeyError, ValueError) as exc:
                raise SandboxError(f"credential endpoint unavailable: {exc.args[0]}") from None
        env = {**BASE_ENV, **credential_env(spec.secrets), **spec.env}
        if spec.allow_domains:
            proxy_url = f"http://127.0.0.1:{PROXY_PORT}"
            for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
                env[key] = proxy_url
            env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        _check_env(env)
        scratch = Path(tempfile.mkdtemp(prefix="conveyor-sbx-", dir=self.scratch_dir))
        try:
            inputs_dir = scratch / "in"
            outbox_dir = scratch / "out"
            inputs_dir.mkdir()
            if spec.outbox:
                outbox_dir.mkdir()
                (inputs_dir / "out").mkdir()
            for name, content in spec.inputs.items():
                if "/" in name or name in ("", ".", "..", "out"):
                    raise SandboxError(f"input name {name!r} is not a plain file name")
                (inputs_dir / name).write_text(content)
            argv = self.bwrap_argv(spec, workspace, inputs_dir, outbox_dir if spec.outbox else None)
            result = await self._execute(spec, argv, env, workspace, outbox_dir, models, decisions, heartbeat, run_id)
            if spec.outbox:
                result.outbox = _read_outbox(outbox_dir)
            return result
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def bwrap_argv(self, spec: SandboxSpec, workspace: Path, inputs_dir: Path, outbox_dir: Path | None) -> list[str]:
        """The mechanism for a spec's filesystem policy (namespaces and mounts), without the fds."""
        argv = [self.bwrap, *_NAMESPACE_ARGS, "--hostname", "sandbox"]
        argv += ["--ro-bind", "/usr", "/usr", *_usr_links()]
        argv += ["--ro-bind", str(etc_snapshot()), "/etc"]
        # The sandbox runs as host uid 0 without capabilities, and sysctls check only the uid:
        # /proc/sys (core_pattern!), sysrq-trigger and the rest of /proc are mounted read-only.
        argv += ["--proc", "/proc", "--remount-ro", "/proc", "--dev", "/dev"]
        argv += ["--size", str(spec.tmp_mb * 1024 * 1024), "--perms", "1777", "--tmpfs", "/tmp"]
        argv += ["--dir", "/var", "--symlink", "/tmp", "/var/tmp"]
        for path in spec.read_only_paths:
            if not path.is_absolute() or not path.is_dir() or path.resolve() == Path("/"):
                raise SandboxError(f"read-only path {path} must be an existing absolute directory")
            argv += ["--ro-bind", str(path.resolve()), str(path.resolve())]
        argv += ["--ro-bind", str(inputs_dir), INPUTS_DIR]
        if outbox_dir is not None:
            argv += ["--bind", str(outbox_dir), OUTBOX_DIR]
        argv += ["--bind", str(workspace), WORKSPACE]
        git = workspace / ".git"
        if git.is_dir():
            for name in ("hooks", "config"):
                if (git / name).exists():
                    argv += ["--ro-bind", str(git / name), f"{WORKSPACE}/.git/{name}"]
        argv += ["--remount-ro", "/", "--chdir", WORKSPACE]
        return argv

    async def _execute(
        self,
        spec: SandboxSpec,
        argv: list[str],
        env: dict[str, str],
        workspace: Path,
        outbox_dir: Path,
        models: list[ModelProxy],
        decisions: list[str],
        heartbeat: HeartbeatCallback | None,
        run_id: str,
    ) -> SandboxResult:
        started = time.monotonic()
        info_r, info_w = os.pipe()
        block_r, block_w = os.pipe()
        fds = [info_w, block_r]
        full = [*argv, "--info-fd", str(info_w), "--block-fd", str(block_r)]
        if self.use_seccomp:
            filter_fd = seccomp.program_fd()
            fds.append(filter_fd)
            full += ["--seccomp", str(filter_fd)]
        full += ["--", *spec.argv]
        try:
            proc = _Child(full, env, tuple(fds), bool(spec.stdin))
        except OSError as exc:
            for fd in (info_r, block_w, *fds):
                os.close(fd)
            raise SandboxError(f"bubblewrap could not be started: {exc}") from None
        for fd in fds:
            os.close(fd)
        cgroup: Cgroup | None = None
        servers: list[asyncio.AbstractServer] = []
        proxies: list[EgressProxy] = []
        child = 0
        try:
            try:
                info = await asyncio.wait_for(asyncio.to_thread(_read_info, info_r), 10)
                child = int(info["child-pid"])
                pid_ns = int(info["pid-namespace"])
            except (asyncio.TimeoutError, ValueError, KeyError, TypeError):
                os.close(block_w)
                block_w = -1
                _kill(proc.pid)
                await proc.wait(5)
                out = bytes(proc.output[:4096])
                raise SandboxError(f"bubblewrap failed to set up the sandbox: {out.decode(errors='replace').strip()}")
            finally:
                os.close(info_r)
            try:
                if self.use_cgroups:
                    cgroup = Cgroup.create(run_id)
                if cgroup is not None:
                    cgroup.limit(spec.memory_mb * 1024 * 1024, spec.pids, spec.cpus)
                    cgroup.attach(proc.pid)
                    cgroup.attach(child)
                self.cgroups_used = cgroup is not None
                _apply_rlimits(child, spec, with_cgroup=cgroup is not None)
                ports = ([PROXY_PORT] if spec.allow_domains else []) + [m.endpoint.port for m in models]
                if ports:
                    sockets = _listen_in_netns(child, ports)
                    handlers = []
                    if spec.allow_domains:
                        proxy = EgressProxy(
                            spec.allow_domains, spec.allow_ports, resolver=self.resolver, dial=self.dial, decisions=decisions
                        )
                        proxies.append(proxy)
                        handlers.append(proxy.handle)
                    handlers += [m.handle for m in models]
                    for sock, handler in zip(sockets, handlers):
                        servers.append(await asyncio.start_server(handler, sock=sock))
            except (OSError, ValueError) as exc:
                raise SandboxError(f"sandbox limits or network could not be set up: {exc}") from None
            self.last_proxies = proxies
            os.write(block_w, b"1")  # release the command
            os.close(block_w)
            block_w = -1
            result = await self._supervise(proc, spec, child, pid_ns, cgroup, [workspace, outbox_dir], heartbeat, started)
            result.sandbox_id = run_id
            result.egress = decisions
            return result
        except BaseException:
            if child:
                _kill(child)
            _kill(proc.pid)
            await proc.wait(5)
            raise
        finally:
            if block_w != -1:
                os.close(block_w)
            proc.close()
            for server in servers:
                server.close()
            for proxy in proxies:
                await proxy.aclose()
            if cgroup is not None:
                for _ in range(50):
                    cgroup.destroy()
                    if not any(p.exists() for p in cgroup.paths.values()):
                        break
                    await asyncio.sleep(0.01)

    async def _supervise(
        self,
        proc: "_Child",
        spec: SandboxSpec,
        child: int,
        pid_ns: int,
        cgroup: Cgroup | None,
        disk_roots: list[Path],
        heartbeat: HeartbeatCallback | None,
        started: float,
    ) -> SandboxResult:
        cap = spec.output_cap_bytes
        proc.start_reading(cap)
        feeder = asyncio.ensure_future(asyncio.to_thread(proc.feed, spec.stdin)) if spec.stdin else None
        waiter = asyncio.ensure_future(proc.exited.wait())
        overflow_wait = asyncio.ensure_future(proc.overflow.wait())
        deadline = started + spec.wall_clock_s
        inode_cap = spec.inodes or max(4096, spec.disk_mb * 64)
        disk_limit = spec.disk_mb * 1024 * 1024
        disk_task: asyncio.Future | None = None
        next_disk = time.monotonic() + 0.1
        disk_every = 0.25
        last_beat = time.monotonic()
        stop: Outcome | None = None
        detail = ""
        tmp_full = False
        try:
            while not waiter.done():
                await asyncio.wait({waiter, overflow_wait}, timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    break
                now = time.monotonic()
                if proc.overflow.is_set():
                    stop, detail = Outcome.output_cap, f"output passed the {cap}-byte cap"
                elif now >= deadline:
                    stop, detail = Outcome.timeout, f"wall clock of {spec.wall_clock_s:g}s exceeded"
                elif cgroup is not None and cgroup.pids_hits():
                    stop, detail = Outcome.pids, f"process limit of {spec.pids} reached"
                elif disk_task is not None and disk_task.done():
                    used, entries, scan_s = disk_task.result()
                    disk_task = None
                    disk_every = max(0.1, scan_s * 5)
                    next_disk = now + disk_every
                    if used > disk_limit or entries > inode_cap:
                        stop = Outcome.disk
                        detail = f"workspace grew past {spec.disk_mb} MB or {inode_cap} files"
                elif disk_task is None and now >= next_disk:
                    disk_task = asyncio.ensure_future(asyncio.to_thread(_disk_usage, disk_roots, disk_limit, inode_cap))
                    tmp_full = tmp_full or _tmp_full(child)
                if stop is not None:
                    await self._stop(proc, waiter, child, pid_ns, graceful=stop == Outcome.timeout, wall=spec.wall_clock_s)
                    break
                if heartbeat is not None and now - last_beat >= HEARTBEAT_EVERY_S:
                    last_beat = now
                    heartbeat()
            await waiter
            code = await proc.wait(5)
            try:
                await asyncio.wait_for(proc.eof.wait(), 2)
            except asyncio.TimeoutError:
                pass
        finally:
            for task in (feeder, waiter, overflow_wait):
                if task is not None:
                    task.cancel()
            if disk_task is not None:
                disk_task.cancel()
        truncated = proc.overflow.is_set()
        if stop is None:
            if truncated:
                stop, detail = Outcome.output_cap, f"output passed the {cap}-byte cap"
            elif cgroup is not None and cgroup.oom_kills():
                stop, detail = Outcome.memory, f"memory limit of {spec.memory_mb} MB reached (OOM kill)"
            elif cgroup is not None and cgroup.pids_hits():
                stop, detail = Outcome.pids, f"process limit of {spec.pids} reached"
            elif code == 128 + signal.SIGXFSZ:
                stop, detail = Outcome.disk, f"file size limit of {spec.disk_mb} MB reached"
            elif code and tmp_full:
                stop, detail = Outcome.disk, f"/tmp ({spec.tmp_mb} MB) filled up"
        data = bytes(proc.output)
        if truncated:
            data += TRUNCATION_MARK % cap
        if stop is None:
            outcome = Outcome.ok if code == 0 else Outcome.exit_nonzero
            detail = "" if code == 0 else f"exited with {code}"
        else:
            outcome = stop
        return SandboxResult(
            outcome=outcome,
            exit_code=code,
            output=data,
            output_truncated=truncated,
            duration_s=time.monotonic() - started,
            detail=detail,
        )

    async def _stop(
        self, proc: "_Child", waiter: asyncio.Future, child: int, pid_ns: int, graceful: bool, wall: float
    ) -> None:
        """SIGTERM every process in the sandbox (when graceful), then SIGKILL its pid 1: the kernel
        then kills everything left in the pid namespace, daemons included."""
        if graceful:
            for pid in _pids_in_namespace(pid_ns):
                if pid != child:
                    _kill(pid, signal.SIGTERM)
            grace = min(self.term_grace_s, max(0.2, wall / 4))
            try:
                await asyncio.wait_for(asyncio.shield(waiter), grace)
                return
            except asyncio.TimeoutError:
                pass
        _kill(child)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), 5)
        except asyncio.TimeoutError:
            _kill(proc.pid)


class _Child:
    """bwrap as a child process watched through a pidfd and a non-blocking stdout reader, so
    exit and output are events on the running loop (no watcher thread, no polling)."""

    def __init__(self, argv: list[str], env: dict[str, str], pass_fds: tuple[int, ...], with_stdin: bool) -> None:
        import subprocess

        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if with_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=pass_fds,
            env=env,
            start_new_session=True,
            bufsize=0,
        )
        self.pid = self.popen.pid
        self.loop = asyncio.get_running_loop()
        self.output = bytearray()
        self.cap = 64 * 1024
        self.exited = asyncio.Event()
        self.eof = asyncio.Event()
        self.overflow = asyncio.Event()
        self.pidfd = os.pidfd_open(self.pid)
        self.loop.add_reader(self.pidfd, self._on_exit)
        assert self.popen.stdout is not None
        self.out_fd = self.popen.stdout.fileno()
        os.set_blocking(self.out_fd, False)
        self.loop.add_reader(self.out_fd, self._on_output)

    def start_reading(self, cap: int) -> None:
        self.cap = cap

    def _on_exit(self) -> None:
        self.loop.remove_reader(self.pidfd)
        self.exited.set()

    def _on_output(self) -> None:
        try:
            chunk = os.read(self.out_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.loop.remove_reader(self.out_fd)
            self.eof.set()
            return
        room = self.cap - len(self.output)
        if room > 0:
            self.output.extend(chunk[:room])
        if len(chunk) > room:
            self.overflow.set()

    def feed(self, data: bytes) -> None:
        """Runs in a worker thread: stdin may be larger than the pipe buffer."""
        stdin = self.popen.stdin
        if stdin is None:
            return
        try:
            stdin.write(data)
            stdin.close()
        except OSError:
            pass

    async def wait(self, timeout: float) -> int | None:
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
        except asyncio.TimeoutError:
            return None
        return self.popen.wait()

    def close(self) -> None:
        for fd in (self.pidfd, self.out_fd):
            try:
                self.loop.remove_reader(fd)
            except (ValueError, RuntimeError):
                pass
        try:
            os.close(self.pidfd)
        except OSError:
            pass
        if self.popen.returncode is None:
            _kill(self.pid)
            try:
                self.popen.wait(5)
            except Exception:
                pass
        for stream in (self.popen.stdout, self.popen.stdin):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


_NAMESPACE_ARGS = (
    "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
    "--disable-userns", "--cap-drop", "ALL", "--die-with-parent", "--new-session",
)


_etc_lock = threading.Lock()
_etc_cache: dict[str, tuple[Path, float]] = {}
ETC_REFRESH_S = 300.0


def etc_snapshot() -> Path:
    """A copy of the curated /etc entries, refreshed every few minutes: one bind mount per run
    instead of thirty (each read-only bind makes bwrap re-read the mount table)."""
    with _etc_lock:
        cached = _etc_cache.get("etc")
        if cached and cached[0].is_dir() and time.monotonic() - cached[1] < ETC_REFRESH_S:
            return cached[0]
        target = Path(tempfile.mkdtemp(prefix="conveyor-etc-"))
        for entry in ETC_ENTRIES:
            source = Path("/etc") / entry
            dest = target / entry
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                if source.is_dir() and not source.is_symlink():
                    shutil.copytree(source, dest, symlinks=True)
                elif source.exists() or source.is_symlink():
                    shutil.copy2(source, dest, follow_symlinks=False)
            except OSError:
                continue  # unreadable entries are simply absent in the sandbox
        target.chmod(0o755)
        if cached:
            shutil.rmtree(cached[0], ignore_errors=True)
        else:
            atexit.register(lambda: shutil.rmtree(_etc_cache["etc"][0], ignore_errors=True))
        _etc_cache["etc"] = (target, time.monotonic())
        return target


def _usr_links() -> list[str]:
    """Merged-/usr systems: /bin, /lib... are symlinks; otherwise bind them read-only."""
    args: list[str] = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), f"/{name}"]
        elif path.is_dir():
            args += ["--ro-bind", str(path), f"/{name}"]
    return args


def _checked_workspace(workspace: Path) -> Path:
    """Refuse trees whose binds would reach outside the workspace (symlinked .git, hooks, config)."""
    try:
        st = os.lstat(workspace)
    except OSError as exc:
        raise SandboxError(f"workspace {workspace} is not accessible: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SandboxError(f"workspace {workspace} is not a directory (symlinks are refused)")
    git = workspace / ".git"
    try:
        git_mode = os.lstat(git).st_mode
    except FileNotFoundError:
        return workspace.resolve()
    if stat.S_ISLNK(git_mode):
        raise SandboxError("workspace .git is a symlink; refusing to run")
    if stat.S_ISDIR(git_mode):
        for name, want_dir in (("hooks", True), ("config", False)):
            try:
                mode = os.lstat(git / name).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(mode) or stat.S_ISDIR(mode) != want_dir or not (want_dir or stat.S_ISREG(mode)):
                raise SandboxError(f"workspace .git/{name} is a symlink or not a plain {'directory' if want_dir else 'file'}")
    return workspace.resolve()


def _check_env(env: dict[str, str]) -> None:
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise SandboxError(f"environment variable {key!r} is not valid")


def _read_info(fd: int) -> dict:
    data = b""
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
        try:
            return json.loads(data)
        except ValueError:
            continue
    raise ValueError("bubblewrap exited before reporting its sandbox")


def _apply_rlimits(pid: int, spec: SandboxSpec, with_cgroup: bool) -> None:
    limits = {
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_FSIZE: spec.disk_mb * 1024 * 1024,
        resource.RLIMIT_NOFILE: 8192,
        resource.RLIMIT_CPU: int(math.ceil(spec.wall_clock_s * max(1.0, spec.cpus))) + 5,
    }
    if not with_cgroup:
        # Without a memory cgroup the address-space cap is the only memory bound we have.
        limits[resource.RLIMIT_AS] = spec.memory_mb * 1024 * 1024
    for kind, value in limits.items():
        resource.prlimit(pid, kind, (value, value))


def _listen_in_netns(pid: int, ports: list[int]) -> list[socket.socket]:
    """Open listeners on 127.0.0.1 inside the sandbox's network namespace.

    setns() changes only the calling thread, so this runs in a throwaway thread (never a pooled
    one, which could later serve unrelated work from inside the sandbox's namespace)."""
    result: list[socket.socket] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into the sandbox network namespace: {os.strerror(err)}")
            finally:
                os.close(fd)
            for port in ports:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                result.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                # bwrap brings up loopback in its child after reporting the pid: wait for it.
                deadline = time.monotonic() + 5
                while True:
                    try:
                        sock.bind(("127.0.0.1", port))
                        break
                    except OSError as exc:
                        if exc.errno != errno.EADDRNOTAVAIL or time.monotonic() > deadline:
                            raise
                        time.sleep(0.0005)
                sock.listen(128)
                sock.setblocking(False)
        except BaseException as exc:  # reported to the caller: the run is refused
            failure.append(exc)

    thread = threading.Thread(target=work, name="conveyor-netns", daemon=True)
    thread.start()
    thread.join()
    if failure:
        for sock in result:
            sock.close()
        exc = failure[0]
        raise OSError(getattr(exc, "errno", errno.EPERM), f"egress listener could not be set up: {exc}")
    return result


def _pids_in_namespace(pid_ns: int) -> list[int]:
    want = f"pid:[{pid_ns}]"
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == want:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tmp_full(child: int) -> bool:
    try:
        st = os.statvfs(f"/proc/{child}/root/tmp")
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


def _disk_usage(roots: list[Path], limit: int, inode_cap: int) -> tuple[int, int, float]:
    """Bytes allocated and entries under `roots` (no symlinks followed); stops early past a cap."""
    started = time.monotonic()
    used = entries = 0
    stack = [str(r) for r in roots if r.exists()]
    while stack:
        path = stack.pop()
        try:
            with os.scandir(path) as it:
                for entry in it:
                    entries += 1
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    used += st.st_blocks * 512
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(entry.path)
                    if used > limit or entries > inode_cap:
                        return used, entries, time.monotonic() - started
        except OSError:
            continue
    return used, entries, time.monotonic() - started


def _read_outbox(outbox: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    try:
        entries = sorted(os.scandir(outbox), key=lambda e: e.name)
    except OSError:
        return files
    for entry in entries[:32]:
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # symlinks and unreadable entries are ignored
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            data = os.read(fd, OUTBOX_FILE_CAP)
        finally:
            os.close(fd)
        files[entry.name] = data.decode("utf-8", errors="replace")
    return files
