"""Trusted-side validation of an agent's patch before anything is applied.

The patch is untrusted output. Refuse: paths outside the tree, anything under .git/, symlinks
pointing out of the tree, submodule (gitlink) entries, and files or totals over the caps.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from pydantic import BaseModel, Field

from adapters.git import run_git


class PatchRejected(Exception):
    """The patch breaks a rule; the message is shown to the requester."""


class PatchStats(BaseModel):
    files: list[str] = Field(default_factory=list)
    lines_added: int = 0
    lines_removed: int = 0
    size: int = 0


_HEADER = re.compile(r"^diff --git (\"(?:[^\"\\]|\\.)*\"|\S+) (\"(?:[^\"\\]|\\.)*\"|\S+)$")
_PATH_LINES = ("rename from ", "rename to ", "copy from ", "copy to ")
_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "r": "\r", "v": "\v"}


def _unquote(token: str) -> str:
    """Git's C-style quoting of unusual path names (octal bytes for non-ASCII)."""
    if not (token.startswith('"') and token.endswith('"')):
        return token
    body, out, i = token[1:-1], bytearray(), 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt in "01234567" and i + 3 < len(body) + 1:
                out += bytes([int(body[i + 1 : i + 4], 8)])
                i += 4
                continue
            out += _ESCAPES.get(nxt, nxt).encode()
            i += 2
            continue
        out += ch.encode()
        i += 1
    return out.decode("utf-8", errors="surrogateescape")


def check_path(path: str) -> str:
    """A repository-relative path that stays in the tree and out of .git."""
    if not path or "\0" in path:
        raise PatchRejected("patch names an empty or NUL-containing path")
    if path.startswith("/"):
        raise PatchRejected(f"patch writes an absolute path: {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise PatchRejected(f"patch path leaves the tree or is not normalized: {path!r}")
    if any(_is_git_dir(p) for p in parts):
        raise PatchRejected(f"patch changes git metadata: {path!r}")
    return path


# Code points HFS+ ignores in names, so ".g\u200cit" IS ".git" on a Mac checkout.
_HFS_IGNORED = re.compile("[\u200c-\u200f\u202a-\u202e\u206a-\u206f\ufeff]")


def _is_git_dir(part: str) -> bool:
    """A name some filesystem resolves to `.git`: any case, HFS+ ignorable code points, NTFS trailing
    dots/spaces, alternate streams (".git::$INDEX_ALLOCATION") and the 8.3 short name GIT~1."""
    name = _HFS_IGNORED.sub("", part).lower()
    trimmed = name.split(":", 1)[0].rstrip(". ")
    return trimmed == ".git" or name.startswith(".git~") or trimmed == "git~1"


def check_symlink(link: str, target: str) -> None:
    """A symlink at `link` (repository-relative) whose target stays in the tree and out of .git."""
    if target.startswith("/"):
        raise PatchRejected(f"symlink {link!r} points outside the tree: {target!r}")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(link), target))
    if resolved == ".." or resolved.startswith("../") or _is_git_dir(resolved.split("/")[0]):
        raise PatchRejected(f"symlink {link!r} points outside the tree: {target!r}")


def _strip_prefix(path: str, prefix: str) -> str:
    if path == "/dev/null":
        return ""
    if not path.startswith(prefix):
        raise PatchRejected(f"unexpected path prefix in patch: {path!r}")
    return path[len(prefix) :]


def _header_names(line: str) -> tuple[str, str]:
    """The two names of `diff --git A B`. Unquoted names may contain spaces; git then writes the
    same name twice (`a/x y b/x y`), which is the only form accepted with spaces (a rename with
    spaces in an unquoted name is ambiguous and refused)."""
    match = _HEADER.match(line)
    if match:
        return match.group(1), match.group(2)
    rest = line[len("diff --git ") :]
    half = (len(rest) - 1) // 2
    if len(rest) % 2 == 1 and rest[half] == " " and rest.startswith("a/") and rest[half + 1 :].startswith("b/"):
        if rest[2:half] == rest[half + 3 :]:
            return rest[:half], rest[half + 1 :]
    raise PatchRejected(f"malformed diff header: {line[:200]!r}")


def validate_patch(patch: bytes, max_bytes: int, max_files: int | None = None) -> PatchStats:
    if len(patch) > max_bytes:
        raise PatchRejected(f"patch is {len(patch):,} bytes; the limit is {max_bytes:,}")
    text = patch.decode("utf-8", errors="surrogateescape")
    stats = PatchStats(size=len(patch))
    current: str | None = None
    symlink_files: set[str] = set()
    symlink_targets: dict[str, list[str]] = {}
    in_hunk = False
    for line in text.split("\n"):
        if line.startswith("diff --git "):
            a_tok, b_tok = _header_names(line)
            a = check_path(_strip_prefix(_unquote(a_tok), "a/"))
            b = check_path(_strip_prefix(_unquote(b_tok), "b/"))
            current = b or a
            stats.files.append(current)
            in_hunk = False
            continue
        if current is None:
            if line.strip():
                raise PatchRejected("patch has content before its first diff header")
            continue
        if line.startswith("@@"):
            in_hunk = True
            continue
        if in_hunk and line[:1] in ("+", "-", " ", "\\"):
            if line.startswith("+"):
                stats.lines_added += 1
                if current in symlink_files:
                    symlink_targets.setdefault(current, []).append(line[1:])
            elif line.startswith("-"):
                stats.lines_removed += 1
            continue
        in_hunk = False
        for key in _PATH_LINES:
            if line.startswith(key):
                check_path(_unquote(line[len(key) :]))
        if line.startswith("--- ") or line.startswith("+++ "):
            # git ends a name that contains a space with a tab (for GNU patch); it is not part of the name
            token = line[4:].removesuffix("\t")
            if token != "/dev/null":
                check_path(_strip_prefix(_unquote(token), "a/" if line[0] == "-" else "b/"))
        if re.match(r"^(new file mode|new mode|index [0-9a-f]+\.\.[0-9a-f]+) 160000", line):
            raise PatchRejected(f"patch adds a submodule (gitlink) at {current!r}")
        if re.match(r"^(new file mode|new mode) 120000", line) or re.match(r"^index \S+ 120000$", line):
            symlink_files.add(current)
        if line.startswith("GIT binary patch") and current in symlink_files:
            raise PatchRejected(f"binary symlink target at {current!r}")
    for link, targets in symlink_targets.items():
        for target in targets:
            check_symlink(link, target)
    if max_files is not None and len(stats.files) > max_files:
        raise PatchRejected(f"patch changes {len(stats.files)} files; the limit is {max_files}")
    return stats


def check_applied_tree(git_dir: Path, parent: str, tree: str) -> None:
    """What the patch actually produced, checked after applying it: the text checks in
    validate_patch cannot see modes of files it does not show, so a rename or copy of an existing
    in-tree symlink to a shallower path (`sub/l -> ../a` renamed to `l`) would escape."""
    out = run_git("diff-tree", "-r", "-z", "--no-renames", parent, tree, git_dir=git_dir).split(b"\0")
    for meta, path in zip(out[0::2], out[1::2]):
        fields = meta.decode().lstrip(":").split()
        if len(fields) < 5 or fields[4] == "D":
            continue
        name = path.decode("utf-8", "surrogateescape")
        if fields[1] == "160000":
            raise PatchRejected(f"patch adds a submodule (gitlink) at {name!r}")
        if fields[1] == "120000":
            check_symlink(name, run_git("cat-file", "blob", fields[3], git_dir=git_dir).decode("utf-8", "surrogateescape"))
