"""The ledger's keyed chain: every entry is authenticated with a key the hospital keeps apart.

Each entry's tag is HMAC-SHA256 (key, previous tag + the entry's canonical JSON). Without the key
nobody can recompute the chain, so an edited, inserted, removed or reordered entry is detected. A
keyed chain cannot, by itself, notice that its *last* entries were cut off (the shorter chain is
still valid), nor that the whole file was replaced by an older copy or deleted. So next to the key
the hospital keeps a **witness**: the length and tag of the chain's head after every write. A ledger
shorter than its witness, or whose entry at the witness's length has another tag, is refused; so is
a missing ledger whose key exists.

Where the key lives: ``$FEDPRIV_KEY_DIR``, else the user's configuration folder
(``platformdirs.user_config_dir("fedpriv")/ledger-keys``), or a path the hospital names
(``ledger-key`` in a deployed node's config). One key file and one witness file per ledger path.
Anyone who can write there can forge the ledger: keep that folder on another disk or under
another OS user than the ledger if the ledger's folder is shared.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpriv.errors import LedgerError

KEY_DIR_ENV = "FEDPRIV_KEY_DIR"
KEY_BYTES = 32
_GENESIS = b"fedpriv-ledger/v2\n"


def default_key_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The folder of the ledger keys as a process with environment `environ` (default: this one's)
    resolves it: ``$FEDPRIV_KEY_DIR``, else the user's configuration folder."""
    configured = (os.environ if environ is None else environ).get(KEY_DIR_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("fedpriv")) / "ledger-keys"


def key_path_for(ledger_path: Path, key_dir: Path | None = None) -> Path:
    """The key file of the ledger at ``ledger_path`` (named by a digest of its absolute path)."""
    name = hashlib.sha256(str(Path(ledger_path).resolve()).encode()).hexdigest()[:24]
    return (key_dir or default_key_dir()) / f"{name}.key"


@dataclass(frozen=True)
class Witness:
    """The head of a chain as last written: its length and its last tag."""

    length: int
    tag: str


class ChainKey:
    """A ledger's secret key and its witness file."""

    def __init__(self, path: Path, secret: bytes) -> None:
        self.path = path
        self._secret = secret

    @property
    def witness_path(self) -> Path:
        return self.path.with_suffix(".head")

    @classmethod
    def load(cls, path: Path) -> ChainKey:
        try:
            text = path.read_text().strip()
            secret = bytes.fromhex(text)
        except (OSError, ValueError) as exc:
            raise LedgerError(f"cannot read the ledger key {path} ({exc})",
                              reason="its ledger key cannot be read") from exc
        if len(secret) != KEY_BYTES:
            raise LedgerError(f"ledger key {path} is malformed", reason="its ledger key is malformed")
        return cls(path, secret)

    @classmethod
    def create(cls, path: Path) -> ChainKey:
        """A new random key, written with owner-only permissions; never replaces an existing one.

        Written aside and hard-linked into place, so a process racing to create the same key sees
        either no file or a complete one, and both end up with whichever was linked first.
        """
        secret = secrets.token_bytes(KEY_BYTES)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            handle, temporary = tempfile.mkstemp(prefix=".key.", dir=path.parent)
        except OSError as exc:
            raise LedgerError(f"cannot create the ledger key {path} ({exc})",
                              reason="its ledger key cannot be created") from exc
        try:
            os.fchmod(handle, 0o600)
            with os.fdopen(handle, "w") as file:
                file.write(secret.hex() + "\n")
                file.flush()
                os.fsync(file.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:
                return cls.load(path)
        except OSError as exc:
            raise LedgerError(f"cannot create the ledger key {path} ({exc})",
                              reason="its ledger key cannot be created") from exc
        finally:
            Path(temporary).unlink(missing_ok=True)
        return cls(path, secret)

    def genesis(self, ledger_id: str) -> str:
        return hmac.new(self._secret, _GENESIS + ledger_id.encode(), hashlib.sha256).hexdigest()

    def tag(self, previous: str, entry: dict[str, Any]) -> str:
        return hmac.new(self._secret, previous.encode() + b"\n" + canonical(entry), hashlib.sha256).hexdigest()

    def witness(self) -> Witness | None:
        try:
            values = json.loads(self.witness_path.read_text())
            return Witness(int(values["length"]), str(values["tag"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LedgerError(f"the ledger witness {self.witness_path} is unreadable ({exc})",
                              reason="its ledger witness is unreadable") from exc

    def write_witness(self, witness: Witness) -> None:
        """Replace the witness atomically (a crash leaves the old one, which is still a lower bound)."""
        handle, temporary = tempfile.mkstemp(prefix=".head.", dir=self.path.parent)
        with os.fdopen(handle, "w") as file:
            json.dump({"length": witness.length, "tag": witness.tag}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.witness_path)


def canonical(entry: dict[str, Any]) -> bytes:
    """The bytes an entry's tag covers: sorted-key JSON with exact floats."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()
