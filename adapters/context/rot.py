"""AGENTS.md rot checks: paths that no longer exist, commands the sandbox cannot run, and
instructions left untouched while the code they describe moved on.

Everything here is pure (text and lists in, warnings out) so it is cheap and deterministic.
AGENTS.md is untrusted repository content: it is only parsed, never executed.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from adapters.codehost.base import CommitInfo

SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
"""PATH inside the local sandbox image (it sees the host's /usr)."""

STALE_COMMITS = 40
"""Commits touching the described directories since the instructions last changed that make them 'stale'."""
STALE_FILES = 20
"""...and at least this many distinct files changed among them."""

_KNOWN_EXT = {
    "md", "rst", "txt", "py", "pyi", "toml", "cfg", "ini", "json", "yml", "yaml", "lock", "sh", "bash",
    "js", "mjs", "cjs", "ts", "tsx", "jsx", "go", "rs", "java", "kt", "rb", "php", "c", "h", "cc", "cpp",
    "hpp", "cs", "swift", "sql", "proto", "graphql", "html", "css", "scss", "env", "mk", "gradle", "xml",
}
_KNOWN_NAMES = {"Makefile", "Dockerfile", "Justfile", "justfile", "Procfile", "Gemfile", "Rakefile", "Taskfile.yml"}
_SHELL_LANGS = {"", "sh", "bash", "shell", "console", "zsh", "shell-session", "terminal"}
_BUILTINS = {
    "cd", "export", "source", ".", "echo", "set", "unset", "for", "if", "then", "else", "fi", "do", "done",
    "while", "until", "case", "esac", "true", "false", "exit", "[", "[[", "test", "alias", "read", "eval",
    "exec", "printf", "pwd", "pushd", "popd", "type", "command", "ulimit", "umask", "wait", "trap", "shift",
    "return", "local", "declare", "let", "{", "}", "(", ")", "!", "function",
}
_PREFIX_WORDS = {"sudo", "env", "time", "nice", "nohup", "exec", "command"}
_COMMAND_HINT = re.compile(r"\b(run|runs|test|tests|testing|build|builds|lint|format|check|install|command|commands|make|execute)\b", re.I)

_FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
_INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_ENV_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass
class Mentions:
    paths: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


def _clean_path(raw: str) -> str | None:
    text = raw.strip().strip("\"'").rstrip(".,;:)")
    if not text or any(ch.isspace() for ch in text):
        return None
    if re.match(r"^[a-z][a-z0-9+.-]*://", text, re.I) or text.startswith(("mailto:", "#", "-", "$", "~", "<", "@", "/", "%")):
        return None
    if any(ch in text for ch in "*?[]{}|<>=`,'\"\\") or "..." in text:
        return None
    text = text.split("#", 1)[0]
    text = re.sub(r":\d+(-\d+)?$", "", text)  # file.py:12
    while text.startswith("./"):
        text = text[2:]
    if not text or text.startswith("../"):
        return None
    last = text.rstrip("/").rsplit("/", 1)[-1]
    ext = last.rsplit(".", 1)[-1].lower() if "." in last else ""
    if "/" in text:
        # 'owner/repo' or 'a/b' prose: need either a file extension, a trailing slash, or depth >= 2
        if ext in _KNOWN_EXT or text.endswith("/") or text.count("/") >= 2 or last in _KNOWN_NAMES:
            return text
        return text if re.match(r"^[\w.-]+/[\w.-]+$", text) and "." in last else None
    if ext in _KNOWN_EXT and re.match(r"^[\w.-]+$", text) and not re.match(r"^\d", text) or last in _KNOWN_NAMES:
        return text
    return None


def extract_mentions(markdown: str) -> Mentions:
    """Paths (inline code, link targets) and shell commands (shell code blocks, inline code on
    lines that talk about running/testing/building) mentioned by an instructions file."""
    paths: list[str] = []
    commands: list[str] = []
    in_fence = False
    fence_is_shell = False
    fence_mark = ""
    for line in markdown.splitlines():
        m = _FENCE.match(line)
        if m:
            if not in_fence:
                in_fence, fence_mark, fence_is_shell = True, m.group(1)[0], m.group(2).lower() in _SHELL_LANGS
            elif m.group(1)[0] == fence_mark:
                in_fence = False
            continue
        if in_fence:
            if fence_is_shell:
                cmd = line.strip()
                if cmd.startswith(("$ ", "% ", "> ")):
                    cmd = cmd[2:].strip()
                if cmd and not cmd.startswith("#"):
                    commands.append(cmd)
            continue
        for span in _INLINE.findall(line):
            cleaned = _clean_path(span)
            if cleaned:
                paths.append(cleaned)
            elif " " in span.strip() and _COMMAND_HINT.search(line):
                commands.append(span.strip().removeprefix("$ "))
        for target in _LINK.findall(line):
            cleaned = _clean_path(target)
            if cleaned:
                paths.append(cleaned)
    return Mentions(paths=list(dict.fromkeys(paths)), commands=list(dict.fromkeys(commands)))


def command_executables(command: str) -> list[str]:
    """First word of each simple command in a shell line (`a && b | c; d`), env assignments
    and wrappers like `sudo` skipped, builtins dropped."""
    found: list[str] = []
    for part in re.split(r"&&|\|\||[|;&]", command):
        words = part.strip().split()
        while words and (_ENV_ASSIGN.match(words[0]) or words[0] in _PREFIX_WORDS):
            words = words[1:]
        if not words:
            continue
        word = words[0].strip("()")
        if not word or word in _BUILTINS or word.startswith(("$", "#", "<", ">", "-", "\\")) or "=" in word:
            continue
        if not re.match(r"^[\w./+-]+$", word):
            continue
        found.append(word)
    return found


class Tree:
    """Set view of the files at the base commit, with directory prefixes."""

    def __init__(self, files: Iterable[str]):
        self.files = set(files)
        self.dirs: set[str] = set()
        self.basenames: set[str] = set()
        for path in self.files:
            self.basenames.add(path.rsplit("/", 1)[-1])
            parent = posixpath.dirname(path)
            while parent and parent not in self.dirs:
                self.dirs.add(parent)
                parent = posixpath.dirname(parent)

    def exists(self, path: str, relative_to: str = "") -> bool:
        candidates = [path]
        if relative_to:
            candidates.append(posixpath.normpath(posixpath.join(relative_to, path)))
        for cand in candidates:
            cand = cand.rstrip("/")
            if cand in self.files or cand in self.dirs:
                return True
        # A bare file name ('pyproject.toml') may describe a file anywhere in the tree.
        return "/" not in path.rstrip("/") and path in self.basenames


def _on_path(executable: str, search_path: str) -> bool:
    for directory in search_path.split(":"):
        candidate = os.path.join(directory, executable)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return True
    return False


def path_warnings(doc_name: str, mentions: Mentions, tree: Tree, doc_dir: str = "") -> list[str]:
    missing = sorted({p for p in mentions.paths if not tree.exists(p, doc_dir)})
    if not missing:
        return []
    shown = ", ".join(missing[:15]) + (f" (+{len(missing) - 15} more)" if len(missing) > 15 else "")
    return [f"{doc_name} mentions paths that do not exist at the base commit: {shown}"]


def command_warnings(
    doc_name: str, mentions: Mentions, tree: Tree, doc_dir: str = "", search_path: str = SANDBOX_PATH
) -> list[str]:
    missing_exe: dict[str, str] = {}
    missing_scripts: dict[str, str] = {}
    for command in mentions.commands:
        for exe in command_executables(command):
            if exe.startswith("/"):
                if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
                    missing_exe.setdefault(exe, command)
            elif "/" in exe:
                if not tree.exists(exe.removeprefix("./"), doc_dir):
                    missing_scripts.setdefault(exe, command)
            elif not _on_path(exe, search_path) and exe not in tree.files:
                missing_exe.setdefault(exe, command)
    warnings = []
    if missing_exe:
        listed = "; ".join(f"{exe} (in `{cmd}`)" for exe, cmd in sorted(missing_exe.items())[:10])
        warnings.append(f"{doc_name} uses commands whose executables are not in the sandbox image ({search_path}): {listed}")
    if missing_scripts:
        listed = "; ".join(f"{exe} (in `{cmd}`)" for exe, cmd in sorted(missing_scripts.items())[:10])
        warnings.append(f"{doc_name} runs scripts that do not exist at the base commit: {listed}")
    return warnings


def staleness_warning(
    doc_path: str,
    mentions: Mentions,
    tree: Tree,
    commits: Sequence[CommitInfo],
    stale_commits: int = STALE_COMMITS,
    stale_files: int = STALE_FILES,
) -> str | None:
    """Warn when the instructions file was not touched while the directories it describes
    (or the whole repository, when it names none) changed a lot. `commits` newest first."""
    described = sorted(
        {p.rstrip("/") if p.rstrip("/") in tree.dirs else posixpath.dirname(p) for p in mentions.paths if tree.exists(p)}
        - {""}
    )
    # Keep only the outermost directories so 'src' and 'src/a' are not counted twice.
    described = [d for d in described if not any(d != o and d.startswith(o + "/") for o in described)]

    def relevant(path: str) -> bool:
        if path == doc_path:
            return False
        return not described or any(path == d or path.startswith(d + "/") for d in described)

    since: list[CommitInfo] = []
    touched = False
    for commit in commits:
        if doc_path in commit.paths:
            touched = True
            break
        since.append(commit)
    relevant_commits = [c for c in since if any(relevant(p) for p in c.paths)]
    files = Counter(p for c in relevant_commits for p in c.paths if relevant(p))
    if len(relevant_commits) < stale_commits or len(files) < stale_files:
        return None
    tops = Counter()
    for path, count in files.items():
        tops[path.split("/", 1)[0] if "/" in path else "."] += count
    busiest = ", ".join(f"{name}/ ({n})" if name != "." else f"repo root ({n})" for name, n in sorted(tops.items(), key=lambda kv: (-kv[1], kv[0]))[:3])
    scope = ", ".join(f"{d}/" for d in described[:5]) if described else "the repository"
    when = "since it last changed" if touched else f"in the last {len(commits)} commits (it was not changed in any of them)"
    return (
        f"{doc_path} may be stale: {len(relevant_commits)} commits changed {len(files)} files under {scope} "
        f"{when}; busiest: {busiest}"
    )


def suggest_skeleton(tree: Tree) -> str:
    """A starting AGENTS.md for a repository with none, from what the tree shows."""
    commands: list[tuple[str, str]] = []
    has = tree.files.__contains__
    if has("pyproject.toml") or has("setup.py") or has("requirements.txt"):
        commands.append(("Test", "python3 -m pytest -q"))
    if has("package.json"):
        commands.append(("Test", "npm test"))
    if has("go.mod"):
        commands.append(("Test", "go test ./..."))
    if has("Cargo.toml"):
        commands.append(("Test", "cargo test"))
    if has("Makefile"):
        commands.append(("Build", "make"))
    if not commands:
        commands.append(("Test", "<the command that runs the tests>"))
    top_dirs = sorted(d for d in tree.dirs if "/" not in d and not d.startswith("."))[:12]
    lines = ["# AGENTS.md", "", "## Project", "<one paragraph: what this repository is and who uses it>", "", "## Layout"]
    lines += [f"- `{d}/`: <what lives here>" for d in top_dirs] or ["- <main directories and what they hold>"]
    lines += ["", "## Commands"]
    lines += [f"- {label}: `{cmd}`" for label, cmd in commands]
    lines += ["", "## Conventions", "- <style, naming, error handling, what reviewers look for>", ""]
    return "\n".join(lines)
