from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from adapters.sandbox.bubblewrap import BubblewrapSandbox
from tests.adapters.sandbox.helpers import Network, Origin, make_repo

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None or not Path("/usr/bin/python3").exists(),
    reason="needs bubblewrap, and Debian's python3 in /usr for the in-sandbox probes (apt-get install bubblewrap python3)",
)


@pytest.fixture(scope="module")
def origin():
    server = Origin(big=b"x" * (4 * 1024 * 1024))
    yield server
    server.close()


@pytest.fixture
def network(origin: Origin) -> Network:
    return Network(origin)


@pytest.fixture
def sandbox(network: Network) -> BubblewrapSandbox:
    sb = BubblewrapSandbox(resolver=network.resolve, dial=network.dial, term_grace_s=0.3)
    reason = sb.available()
    if reason:
        pytest.skip(reason)
    return sb


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, str]:
    ws = tmp_path / "ws"
    sha = make_repo(ws)
    return ws, sha
