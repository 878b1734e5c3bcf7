#!/usr/bin/env python3
"""Runs a job on a Kiln daemon's TLS listener with grpcio and mutual TLS, as a CI
orchestrator does: submits a one-step job, watches it to its end, downloads its
output. Prints one JSON object with what it saw.

The kiln.v1 stubs are generated beforehand (grpc_tools.protoc) into a directory on
PYTHONPATH.

usage: remote_job.py HOST:PORT SERVER_NAME CA CERT KEY
"""
import json
import sys

import grpc
from kiln.v1 import kiln_pb2, kiln_pb2_grpc


def main() -> None:
    target, server_name, ca, cert, key = sys.argv[1:6]
    credentials = grpc.ssl_channel_credentials(
        root_certificates=open(ca, "rb").read(),
        private_key=open(key, "rb").read(),
        certificate_chain=open(cert, "rb").read(),
    )
    channel = grpc.secure_channel(
        target, credentials, options=[("grpc.ssl_target_name_override", server_name)]
    )
    jobs = kiln_pb2_grpc.JobsStub(channel)
    store = kiln_pb2_grpc.ContentStoreStub(channel)
    spec = kiln_pb2.JobSpec(
        name="from-python",
        image="host",
        steps=[kiln_pb2.Step(name="write", argv=["/bin/sh", "-c", "echo hi > out.txt"])],
        outputs=["out.txt"],
    )
    job_id = jobs.Submit(kiln_pb2.SubmitRequest(spec=spec), timeout=30).job_id
    # Watch ends when the job does.
    events = [e.WhichOneof("event") for e in jobs.Watch(kiln_pb2.WatchRequest(job_id=job_id), timeout=120)]
    job = jobs.Get(kiln_pb2.GetRequest(job_id=job_id), timeout=30)
    outputs = {}
    for output in job.outputs:
        data = b"".join(
            chunk.data for chunk in store.Read(kiln_pb2.ReadRequest(digest=output.digest), timeout=30)
        )
        outputs[output.path] = data.decode()
    print(
        json.dumps(
            {
                "job_id": job_id,
                "state": kiln_pb2.JobState.Name(job.state),
                "message": job.message,
                "events": events,
                "outputs": outputs,
            }
        )
    )


if __name__ == "__main__":
    main()
