"""The job's ZeroMQ CURVE key pairs (``async-rl keys generate DIR``; ``weights.curve_keys_dir``).

Every listener of a job uses them when they are configured (required off loopback): the
weight publisher, the buffer service and the control endpoint. Layout of a keys folder (Z85
text files written by ``zmq.auth``):

    DIR/server.key, DIR/server.key_secret   the listeners (publisher, buffer, control)
    DIR/client.key, DIR/client.key_secret   their clients (actors, learner, CLI)
    DIR/authorized/*.key                    client public keys the listeners accept

With keys configured each listener runs a ZAP authenticator that admits only the authorized
client keys, and every byte on the socket is encrypted, so nobody outside the job can push
weights, insert or read trajectories, or stop the job. Secret files are mode 0600.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

SERVER = "server"
CLIENT = "client"
AUTHORIZED = "authorized"


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    secret: bytes


def generate_keys(directory: str | Path) -> Path:
    """Write a server and a client key pair into ``directory`` and authorize the client."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in (SERVER, CLIENT):
        _public, secret = zmq.auth.create_certificates(directory, name)
        os.chmod(secret, 0o600)
    authorized = directory / AUTHORIZED
    authorized.mkdir(exist_ok=True)
    shutil.copyfile(directory / f"{CLIENT}.key", authorized / f"{CLIENT}.key")
    return directory


def load_pair(directory: str | Path, name: str) -> KeyPair:
    """The key pair ``name`` ('server' or 'client'); a missing file raises with its path."""
    path = Path(directory) / f"{name}.key_secret"
    if not path.is_file():
        raise FileNotFoundError(
            f"weights.curve_keys_dir: {path} not found (create it with `async-rl keys generate DIR`)"
        )
    public, secret = zmq.auth.load_certificate(path)
    return KeyPair(public, secret)


def server_public_key(directory: str | Path) -> bytes:
    public, _ = zmq.auth.load_certificate(Path(directory) / f"{SERVER}.key")
    return public


def secure_server(ctx: zmq.Context, sock: zmq.Socket, directory: str | Path) -> ThreadAuthenticator:
    """Make ``sock`` a CURVE server that admits only ``DIR/authorized`` client keys.

    Call before ``bind``; stop the returned authenticator after closing the socket.
    """
    authorized = Path(directory) / AUTHORIZED
    if not authorized.is_dir():
        raise FileNotFoundError(f"weights.curve_keys_dir: {authorized} not found")
    pair = load_pair(directory, SERVER)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(authorized))
    sock.curve_server = True
    sock.curve_publickey = pair.public
    sock.curve_secretkey = pair.secret
    return auth


def secure_client(sock: zmq.Socket, directory: str | Path) -> None:
    """Make ``sock`` a CURVE client of the publisher whose keys live in ``directory``."""
    pair = load_pair(directory, CLIENT)
    sock.curve_serverkey = server_public_key(directory)
    sock.curve_publickey = pair.public
    sock.curve_secretkey = pair.secret
