"""`lxd netcat SOCKET [NAME] [...]`: tie stdin/stdout to a unix socket the daemon listens on.

rsync's sender runs this as its remote shell (`-e`), so rsync's protocol goes through the socket,
which the daemon bridges to a migration websocket. SOCKET is a path, or `@name` for an abstract
socket. Whatever follows (the name, then the remote host and rsync's server command line that
rsync appends) is ignored. stdin's end half-closes the socket; the socket's end (the daemon saw the
peer's barrier) ends the command. Standard library only: it starts once per stream.
"""

from __future__ import annotations

import os
import socket
import sys
import threading


def _address(arg: str) -> str:
    return "\0" + arg[1:] if arg.startswith("@") else arg


def _stdin_to_socket(sock: socket.socket) -> None:
    try:
        while True:
            data = os.read(0, 65536)
            if not data:
                break
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def main(argv: list[str]) -> int:
    args = list(argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print("usage: lxd netcat SOCKET [NAME]\n\nInternal: forwards stdin/stdout to the unix socket SOCKET "
              "(@NAME for an abstract socket); rsync runs it as its remote shell during a migration.",
              file=sys.stderr if not args else sys.stdout)
        return 0 if args else 1
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(_address(args[0]))
    except OSError as e:
        print(f"Error: could not connect to {args[0]}: {e}", file=sys.stderr)
        return 1
    threading.Thread(target=_stdin_to_socket, args=(sock,), daemon=True).start()
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            view = memoryview(data)
            while view:
                n = os.write(1, view)
                view = view[n:]
    except OSError:
        return 1
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    rc = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
