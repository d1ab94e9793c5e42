"""A small seccomp filter for the local sandbox (x86_64), built as raw classic BPF for bwrap's
`--seccomp FD` (no libseccomp needed).

Denied with EPERM: kernel surfaces a coding agent never needs and that are frequent exploit
entry points or could reach host-wide state — keyrings, bpf, perf events, userfaultfd, io_uring,
module/kexec/reboot/swap/accounting, mount and namespace manipulation, handle-based opens — and
the terminal-injection ioctls TIOCSTI/TIOCLINUX. Foreign ABIs (i386 via int 0x80, x32) get ENOSYS.
"""

from __future__ import annotations

import errno
import os
import platform
import struct

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000

# x86_64 syscall numbers (asm/unistd_64.h)
DENIED_SYSCALLS = {
    "syslog": 103, "uselib": 134, "vhangup": 153, "pivot_root": 155, "_sysctl": 156, "acct": 163, "mount": 165,
    "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "iopl": 172, "ioperm": 173, "create_module": 174,
    "init_module": 175, "delete_module": 176, "get_kernel_syms": 177, "query_module": 178, "quotactl": 179,
    "nfsservctl": 180, "lookup_dcookie": 212, "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250,
    "unshare": 272, "perf_event_open": 298, "fanotify_init": 300, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "setns": 308, "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
}
SYS_IOCTL = 16
DENIED_IOCTLS = {"TIOCSTI": 0x5412, "TIOCLINUX": 0x541C}

_LD_W_ABS = 0x20
_JEQ = 0x15
_JGE = 0x35
_RET = 0x06


def supported() -> bool:
    return platform.machine() in ("x86_64", "AMD64")


def program() -> bytes:
    """The filter as `struct sock_filter[]` bytes."""
    denied = sorted(DENIED_SYSCALLS.values())
    ins: list[tuple[int, int, int, int]] = []
    # layout: [arch check][nr load][x32][denied...][ioctl?][ld arg1][ioctl cmds...][ALLOW][EPERM][ENOSYS]
    n_fixed_head = 4  # ld arch, jeq arch, ld nr, jge x32
    n_ioctl = 2 + len(DENIED_IOCTLS)  # jeq ioctl, ld arg1, cmds
    allow_at = n_fixed_head + len(denied) + n_ioctl
    eperm_at, enosys_at = allow_at + 1, allow_at + 2

    def jump(target: int) -> int:
        offset = target - len(ins) - 1
        assert 0 <= offset < 256
        return offset

    ins.append((_LD_W_ABS, 0, 0, 4))  # seccomp_data.arch
    ins.append((_JEQ, 0, jump(enosys_at), AUDIT_ARCH_X86_64))
    ins.append((_LD_W_ABS, 0, 0, 0))  # seccomp_data.nr
    ins.append((_JGE, jump(enosys_at), 0, X32_SYSCALL_BIT))
    for nr in denied:
        ins.append((_JEQ, jump(eperm_at), 0, nr))
    ins.append((_JEQ, 0, jump(allow_at), SYS_IOCTL))
    ins.append((_LD_W_ABS, 0, 0, 16 + 8))  # low 32 bits of args[1]: the kernel truncates cmd to int
    for cmd in DENIED_IOCTLS.values():
        ins.append((_JEQ, jump(eperm_at), 0, cmd))
    assert len(ins) == allow_at
    ins.append((_RET, 0, 0, RET_ALLOW))
    ins.append((_RET, 0, 0, RET_ERRNO | errno.EPERM))
    ins.append((_RET, 0, 0, RET_ERRNO | errno.ENOSYS))
    return b"".join(struct.pack("<HBBI", *i) for i in ins)


_PROGRAM: bytes | None = None


def program_fd() -> int:
    """A fresh fd holding the filter, positioned at 0, for one bwrap run (bwrap reads it to EOF)."""
    global _PROGRAM
    if _PROGRAM is None:
        _PROGRAM = program()
    fd = os.memfd_create("conveyor-seccomp", os.MFD_CLOEXEC)
    os.write(fd, _PROGRAM)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
