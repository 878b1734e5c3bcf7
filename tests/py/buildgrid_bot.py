"""A stand-in bot against a BuildGrid server: one action, Executed by a client and run by
this bot through the Remote Workers API, as a Kiln worker will. Prints what it saw as
JSON: the state the lease came in, the ActionResult the Execute response carried and
the one the action cache holds (their auxiliary metadata, where a worker's signed
statement travels). Run with BuildGrid's own Python (its venv has the protos).

usage: buildgrid_bot.py HOST:PORT
"""

import hashlib
import json
import sys
import threading
import time

import grpc
from google.protobuf import any_pb2

from buildgrid._protos.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as reapi,
    remote_execution_pb2_grpc as reapi_grpc,
)
from buildgrid._protos.google.devtools.remoteworkers.v1test2 import (
    bots_pb2,
    bots_pb2_grpc,
    worker_pb2,
)
from buildgrid._protos.google.rpc import status_pb2

STATEMENT_TYPE = "type.googleapis.com/kiln.v1.SignedLink"
STATEMENT_BYTES = b"\x0a\x05bytes of a DSSE envelope"


def digest(data):
    return reapi.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def metadata_of(result):
    return [
        {"type_url": any_.type_url, "value": any_.value.hex()}
        for any_ in result.execution_metadata.auxiliary_metadata
    ]


def main():
    channel = grpc.insecure_channel(sys.argv[1])
    cas = reapi_grpc.ContentAddressableStorageStub(channel)
    execution = reapi_grpc.ExecutionStub(channel)
    action_cache = reapi_grpc.ActionCacheStub(channel)
    bots = bots_pb2_grpc.BotsStub(channel)

    command = reapi.Command(arguments=["/bin/echo", "hello"]).SerializeToString()
    input_root = reapi.Directory().SerializeToString()
    action = reapi.Action(
        command_digest=digest(command), input_root_digest=digest(input_root)
    ).SerializeToString()
    uploaded = cas.BatchUpdateBlobs(
        reapi.BatchUpdateBlobsRequest(
            instance_name="",
            requests=[
                reapi.BatchUpdateBlobsRequest.Request(digest=digest(blob), data=blob)
                for blob in (command, input_root, action)
            ],
        )
    )
    assert all(r.status.code == 0 for r in uploaded.responses), uploaded

    # The bot first, so that the job has somewhere to go.
    session = bots.CreateBotSession(
        bots_pb2.CreateBotSessionRequest(
            parent="",
            bot_session=bots_pb2.BotSession(
                bot_id="stand-in-bot",
                status=bots_pb2.BotStatus.OK,
                worker=worker_pb2.Worker(
                    devices=[worker_pb2.Device(handle="stand-in-bot")],
                    properties=[worker_pb2.Worker.Property(key="OSFamily", value="linux")],
                ),
            ),
        )
    )

    operations = []

    def execute():
        for operation in execution.Execute(
            reapi.ExecuteRequest(
                instance_name="", action_digest=digest(action), skip_cache_lookup=True
            )
        ):
            operations.append(operation)

    client = threading.Thread(target=execute)
    client.start()

    deadline = time.monotonic() + 120
    while not session.leases:
        assert time.monotonic() < deadline, "no lease came"
        session = bots.UpdateBotSession(
            bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=session)
        )
    lease = session.leases[0]
    seen = {
        "lease_state": bots_pb2.LeaseState.Name(lease.state),
        "leases": len(session.leases),
    }
    payload = reapi.Action()
    assert lease.payload.Unpack(payload), lease.payload.type_url
    seen["payload_type"] = lease.payload.type_url

    result = reapi.ActionResult(
        exit_code=0,
        stdout_raw=b"hello\n",
        execution_metadata=reapi.ExecutedActionMetadata(
            worker="stand-in-bot",
            auxiliary_metadata=[any_pb2.Any(type_url=STATEMENT_TYPE, value=STATEMENT_BYTES)],
        ),
    )
    lease.result.Pack(result)
    lease.state = bots_pb2.LeaseState.COMPLETED
    lease.status.CopyFrom(status_pb2.Status(code=0))
    session = bots.UpdateBotSession(
        bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=session)
    )
    client.join(120)
    assert not client.is_alive(), "Execute did not finish"

    response = reapi.ExecuteResponse()
    assert operations[-1].done, operations[-1]
    assert operations[-1].response.Unpack(response), operations[-1]
    seen["execute_exit_code"] = response.result.exit_code
    seen["execute_metadata"] = metadata_of(response.result)
    cached = action_cache.GetActionResult(
        reapi.GetActionResultRequest(instance_name="", action_digest=digest(action))
    )
    seen["cached_metadata"] = metadata_of(cached)
    seen["expected_metadata"] = [{"type_url": STATEMENT_TYPE, "value": STATEMENT_BYTES.hex()}]
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
