"""Whether the Prefect UI's port is free: the way a server binds decides it."""

from __future__ import annotations

import socket

from cxrelay.app.supervise import free_port, port_free


def test_a_port_whose_server_just_stopped_is_free_again() -> None:
    """The server closed its side of a connection first (it stopped), so that connection
    waits in TIME_WAIT on the port: a new server with SO_REUSEADDR binds it, as uvicorn does."""
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server's side closes first: its end goes to TIME_WAIT
    listener.close()
    client.recv(1)
    client.close()
    assert port_free(port)


def test_a_port_someone_listens_on_is_taken() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        assert not port_free(listener.getsockname()[1])
