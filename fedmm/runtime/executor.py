"""A site's long-lived ClientApp executor, in place of a fresh process for every message.

Out of the box a Flower 1.42 SuperNode (``--isolation subprocess``) starts Flower's SuperExec,
which starts a new ``flwr-clientapp`` process for each message it receives. Each one pays
for starting Python and importing Flower (about 2.7 s of CPU here), and a training message
also pays for importing PyTorch and loading the site's data; a SecAgg+ round has four
messages.

Flower's other isolation mode, ``--isolation process``, leaves running the ClientApp to a
process the operator starts. ``fedmm site`` starts this one: it asks the SuperNode's
Runtime API for work (``AcquireTask``, signed with the SuperExec HMAC secret only the
site's user can read), and runs each task in this same, already warm process, with
Flower's own task protocol (``pull_task_input``, ``push_message``, ``push_task_output``
from ``flwr.supernode.runtime.run_clientapp``, which ``flwr-clientapp`` itself runs). What
the ClientApp does is unchanged; only the process it runs in stays alive. PyTorch, fedmm
and the site's data (:mod:`fedmm.site.runner` keeps them) are loaded once.

    python -m fedmm.runtime.executor --runtime-api-address 127.0.0.1:9094 --secret-file STATE/superexec.secret
"""

from __future__ import annotations

import argparse
import itertools
import os
import secrets
import signal
import sys
import threading
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

__all__ = ["main", "make_secret", "run_task", "serve"]

SECRET_FILE = "superexec.secret"
PULL_MAX_TIME = 900.0  # seconds before a task gives up waiting for its message's arrays


def make_secret(state_dir: Path) -> Path:
    """Create (once) the site's SuperExec secret, readable by the site's user only; return its path."""
    path = Path(state_dir) / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_hex(32).encode())
    return path


class _OwnClientApp:
    """The ClientApp a task runs: always the site's own (:mod:`fedmm.site.clientapp`, from the fedmm
    installed here), never code from the app bundle (FAB) the server submitted with the run.

    A server's bundle could carry any ClientApp, one that trains without DP or skips the site's
    ledger; Flower's own ``flwr-clientapp`` would install and run it. Here the bundle is only
    named in the log (its id and hash); the run's settings still come from the task's context.
    """

    def __init__(self) -> None:
        self._hash = ""
        self._app: Any = None

    def get(self, run: Any, fab: Any) -> Any:
        if self._app is None:
            from fedmm.site.clientapp import app

            self._app = app
        if fab.hash_str != self._hash:
            from flwr.common.logger import log

            from fedmm import __version__

            log(INFO, "[fedmm executor] run %s: the server's app bundle %s (%s...) is not run here; this site runs its own fedmm %s ClientApp",
                getattr(run, "run_id", "?"), getattr(run, "fab_id", "?"), str(fab.hash_str)[:12], __version__)
            self._hash = fab.hash_str
        return self._app


def _pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """Flower's ``pull_task_input``, retrying the message's objects within 20 ms rather than after 1 s.

    The SuperNode hands out a task as soon as a message's header has arrived and is still
    fetching its arrays from the SuperLink; a ``flwr-clientapp`` process that takes seconds
    to start rarely notices, but a warm executor asks at once, and Flower's pull then backs
    off 1 s, 2 s, ... (:mod:`fedmm.runtime.flower_waits`).
    """
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import (
        pull_and_inflate_object_from_tree,
    )
    from flwr.supercore.task_identity import TaskIdentity

    from fedmm.runtime.flower_waits import OBJECT_PULL_BACKOFF

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode gave a task without a message")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, **{**OBJECT_PULL_BACKOFF, "max_time": PULL_MAX_TIME},
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's: the deflated message lacks its own id
    return message, context, run, fab


def _task_retry_invoker() -> Any:
    """Flower's HTTP retries for a task's requests, except that a revoked task token ends the task.

    Flower's invoker answers ``401 Unauthorized`` by sending SIGINT to its own process: right for
    ``flwr-clientapp``, which runs one task, but here it would stop the whole executor (and every
    other task) when the SuperNode drops one message. The task's request raises instead.
    """
    from flwr.supercore.retry import make_simple_http_retry_invoker

    retry = make_simple_http_retry_invoker()
    flower_giveup = retry.should_giveup

    def should_giveup(err: Exception) -> bool:
        return _is_revoked(err) or (bool(flower_giveup(err)) if flower_giveup is not None else False)

    retry.should_giveup = should_giveup
    return retry


def _is_revoked(err: BaseException) -> bool:
    """Whether a Runtime API request failed because the SuperNode dropped the task.

    ``401``: the SuperNode no longer knows the task's token; Flower's ``RunNotRunningException``
    (its retries raise it on ``403``): the task's run is over. Either way nothing is left to reply to.
    """
    import httpx
    from flwr.supercore.run import RunNotRunningException

    if isinstance(err, RunNotRunningException):
        return True
    return (
        isinstance(err, httpx.HTTPStatusError)
        and err.response.status_code == httpx.codes.UNAUTHORIZED
        and err.request.url.path.startswith("/v1/runtime/")  # the SuperNode's, not a 401 from the app's own calls
    )


def _task_heartbeat_fn(client: Any, revoked: threading.Event) -> Any:
    """Flower's task heartbeat, except that a task the SuperNode dropped is marked, not SIGINTed."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=no-name-in-module
    from flwr.supercore import log
    from flwr.supercore.run import RunNotRunningException

    def heartbeat() -> bool:
        if revoked.is_set():
            return True
        try:
            ok = client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success
        except (httpx.HTTPStatusError, RunNotRunningException) as err:
            if not _is_revoked(err):
                return False  # any other answer (a 500, say) is retried by the heartbeat sender, as a lost connection is
            ok = False
        except httpx.TransportError:
            return False
        if not ok:
            revoked.set()
            log(WARNING, "[fedmm executor] the SuperNode dropped this task; its reply will not be sent")
        return True

    return heartbeat


def _stop(heartbeat: Any) -> None:
    try:
        heartbeat.stop()
    except RuntimeError:  # its thread had already ended
        pass


def run_task(address: str, token: str, apps: _OwnClientApp) -> str:
    """Run one ClientApp task in this process, as ``flwr-clientapp --token`` would; return its status."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore import log
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.run import RunNotRunningException
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    retry = _task_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None, retry_invoker=retry,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)],
    )
    revoked = threading.Event()  # the SuperNode dropped this task: it takes no reply and no output
    heartbeat = HeartbeatSender(_task_heartbeat_fn(client, revoked))
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    marks = [("start", time.monotonic())]
    try:
        heartbeat.start()
        message, context, run, fab = _pull_task_input(client)
        app = apps.get(run, fab)
        marks.append(("pull", time.monotonic()))
        reply = app(message=message, context=context)
        marks.append(("app", time.monotonic()))
        status, details = SubStatus.COMPLETED, ""
    except (Exception, RunNotRunningException) as err:  # noqa: BLE001 (the site's error goes back to the server as Flower's Error reply)
        if _is_revoked(err):
            revoked.set()
            log(WARNING, "[fedmm executor] the SuperNode dropped this task (%s); going on with the next", str(err).splitlines()[0] or type(err).__name__)
            reply = None
        else:
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(err, LoadClientAppError) else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            details = f"{type(err)}:<'{err}'>"
            log(ERROR, "ClientApp raised an exception", exc_info=err)
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None and not revoked.is_set():
                push_message(client, reply, context)
                marks.append(("push", time.monotonic()))
        except (Exception, RunNotRunningException) as err:  # noqa: BLE001 (reported like flwr-clientapp does, then the task's status)
            if _is_revoked(err):
                revoked.set()
                log(WARNING, "[fedmm executor] the SuperNode dropped this task before its reply was sent; going on with the next")
            else:
                log(ERROR, "Failed to push reply message", exc_info=err)
            status, details = SubStatus.FAILED, f"could not push the reply: {err}"
        try:
            retry.max_tries = 1
            if not revoked.is_set():
                push_task_output(client, context, status, details)
                marks.append(("output", time.monotonic()))
        except RunNotRunningException:
            revoked.set()
        finally:
            _stop(heartbeat)
            client.close()
            marks.append(("close", time.monotonic()))
    if revoked.is_set():
        status = SubStatus.FAILED
    steps = ", ".join(f"{name} {end - begin:.2f}" for (_, begin), (name, end) in itertools.pairwise(marks))
    log(INFO, "[fedmm executor] task %s in %.2f s (%s)", status, marks[-1][1] - marks[0][1], steps)
    return str(status)


def serve(address: str, secret: bytes, *, poll_interval: float = 0.1, warm: bool = True) -> None:
    """Acquire and run the SuperNode's ClientApp tasks, one at a time, until killed."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore import log
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    if warm:
        import fedmm.site.runner  # noqa: F401  PyTorch and fedmm, before the first round rather than in it

    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None, retry_invoker=make_simple_http_retry_invoker(),
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="SuperExec"),
            SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"})),
        ],
    )
    apps = _OwnClientApp()
    log(INFO, "[fedmm executor] ready (pid %d): asking %s for ClientApp tasks every %.2f s when idle", os.getpid(), address, poll_interval)
    try:
        while True:
            acquired = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if acquired.HasField("task") and acquired.token:
                # The SuperNode hands out one message at a time and waits for its reply, so tasks do
                # not overlap in normal work. A thread each keeps a task whose message the SuperNode
                # dropped (it could not fetch the arrays: e.g. a message of a run that ended with a
                # restarted server) from blocking the next one; it waits out its pull and ends.
                threading.Thread(target=run_task, args=(address, acquired.token, apps), daemon=True).start()
                continue  # the next message of a round is often already waiting
            time.sleep(poll_interval)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedmm.runtime.executor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (host:port, loopback)")
    parser.add_argument("--secret-file", required=True, type=Path, help="the SuperExec secret the SuperNode was given")
    parser.add_argument("--poll-interval", type=float, default=0.1, help="seconds between asks for a task when idle")
    args = parser.parse_args(argv)
    from fedmm.privacy.policy import mark_deployed_process

    mark_deployed_process()  # a deployed site: never the simulation's server-set policy
    import logging

    site_log = logging.getLogger("fedmm.site")  # the site's own log: a line a round (what it spent, what is left), refusals, failures
    site_log.setLevel(logging.INFO)
    if not site_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        site_log.addHandler(handler)
        site_log.propagate = False
    if not 0.005 <= args.poll_interval <= 10:
        parser.error(f"--poll-interval must be between 0.005 and 10 seconds, got {args.poll_interval}")
    def stop(*_: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second SIGTERM must not interrupt the exit
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    serve(args.runtime_api_address, args.secret_file.read_bytes(), poll_interval=args.poll_interval)


if __name__ == "__main__":
    main()
