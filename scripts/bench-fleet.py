"""The Python half of scripts/bench-fleet, run with BuildGrid's venv (its gRPC and its
generated protos):

  bench-fleet.py ready ADDR              waits until the engine answers
  bench-fleet.py bot ADDR BOT_ID         a stand-in worker: a minimal Remote Workers API
                                         bot that runs each action unsandboxed
  bench-fleet.py latency ADDR RUNS TAG   RUNS actions one after the other; prints the
                                         client-seen seconds of each, one a line
  bench-fleet.py throughput ADDR N TAG   N actions at once; prints the wall seconds until
                                         all are done

Every action is `/bin/sh -c 'echo NONCE > out'` with a nonce of its own (nothing is
cached; the Execute request skips the cache lookup too) and an empty input root. The
client checks that each action succeeded, that its output holds the nonce, and that the
worker named in its result is the kind expected (EXPECT_WORKER, a substring), so that a
figure never counts an action that another kind of worker ran.
"""

import concurrent.futures
import hashlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import grpc
from buildgrid._protos.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
    remote_execution_pb2_grpc as re_grpc,
)
from buildgrid._protos.google.devtools.remoteworkers.v1test2 import (
    bots_pb2,
    bots_pb2_grpc,
    worker_pb2,
)

INSTANCE = ""
RPC_TIMEOUT = 30
# The ISA names BuildGrid and Bazel use, as `kiln worker` offers them.
ISA = {"x86_64": "x86-64"}


def digest_of(data):
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def upload(cas, blobs):
    requests = [
        re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(blob), data=blob) for blob in blobs
    ]
    answer = cas.BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(instance_name=INSTANCE, requests=requests),
        timeout=RPC_TIMEOUT,
    )
    for response in answer.responses:
        if response.status.code != 0:
            raise RuntimeError(f"upload of {response.digest.hash}: {response.status.message}")


def download(cas, digests):
    """The blobs of `digests` (all small), by hash."""
    wanted = [d for d in digests if d.size_bytes > 0]
    found = {digest_of(b"").hash: b""}
    if wanted:
        answer = cas.BatchReadBlobs(
            re_pb2.BatchReadBlobsRequest(instance_name=INSTANCE, digests=wanted),
            timeout=RPC_TIMEOUT,
        )
        for response in answer.responses:
            if response.status.code != 0:
                raise RuntimeError(f"read of {response.digest.hash}: {response.status.message}")
            found[response.digest.hash] = response.data
    return found


# The stand-in worker.


class StandIn:
    """One bot session. Like `kiln worker`'s bots: it offers OSFamily and ISA, takes one
    lease at a time (BuildGrid hands new ones out ACTIVE), reports it COMPLETED with an Any
    of the ActionResult as soon as the action ends, and closes its session
    (BOT_TERMINATING) on SIGTERM. It does no more than a worker must: no sandbox, no
    signature, the input root written as it comes."""

    def __init__(self, addr, bot_id):
        channel = grpc.insecure_channel(addr)
        self.bots = bots_pb2_grpc.BotsStub(channel)
        self.cas = re_grpc.ContentAddressableStorageStub(channel)
        self.bot_id = bot_id
        self.stopping = threading.Event()

    def run(self):
        worker = worker_pb2.Worker(
            devices=[worker_pb2.Device(handle=self.bot_id)],
            properties=[
                worker_pb2.Worker.Property(key="OSFamily", value="linux"),
                worker_pb2.Worker.Property(key="ISA", value=ISA.get(platform.machine(), platform.machine())),
            ],
        )
        session = self.bots.CreateBotSession(
            bots_pb2.CreateBotSessionRequest(
                parent=INSTANCE,
                bot_session=bots_pb2.BotSession(bot_id=self.bot_id, status=bots_pb2.OK, worker=worker),
            ),
            timeout=RPC_TIMEOUT,
        )
        print(f"bot session created {session.name}", file=sys.stderr, flush=True)
        taken = set()
        completed = []
        while True:
            closing = self.stopping.is_set()
            session.status = bots_pb2.BOT_TERMINATING if closing else bots_pb2.OK
            del session.leases[:]
            session.leases.extend(completed)
            # An idle bot's call is held by the engine until it has a lease for it (a long
            # poll); it runs on a future so that SIGTERM need not wait for the answer.
            call = self.bots.UpdateBotSession.future(
                bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=session),
                timeout=RPC_TIMEOUT,
            )
            answered = threading.Event()
            call.add_done_callback(lambda _: answered.set())
            while not answered.wait(0.05):
                if self.stopping.is_set() and not closing and not completed:
                    call.cancel()
                    break
            if call.cancelled():
                continue
            answer = call.result()
            completed = []
            if closing:
                print("bot session closed", file=sys.stderr, flush=True)
                return
            session = answer
            for lease in answer.leases:
                if lease.state in (bots_pb2.PENDING, bots_pb2.ACTIVE) and lease.id not in taken:
                    taken.add(lease.id)
                    completed.append(self.run_lease(lease))
                    break

    def run_lease(self, lease):
        began = time.monotonic()
        done = bots_pb2.Lease()
        done.CopyFrom(lease)
        done.state = bots_pb2.COMPLETED
        try:
            result = self.execute(lease)
            done.result.Pack(result)
            done.status.code = 0
            print(
                f"action done exit_code={result.exit_code} seconds={time.monotonic() - began:.6f}",
                file=sys.stderr,
                flush=True,
            )
        except Exception as err:  # noqa: BLE001 -- reported to the engine, the bot carries on
            done.status.code = 13  # INTERNAL
            done.status.message = str(err)
            print(f"action failed: {err}", file=sys.stderr, flush=True)
        return done

    def execute(self, lease):
        started = time.time()
        if lease.payload.Is(re_pb2.Action.DESCRIPTOR):
            action = re_pb2.Action()
            lease.payload.Unpack(action)
        else:
            digest = re_pb2.Digest()
            lease.payload.Unpack(digest)
            action = re_pb2.Action.FromString(download(self.cas, [digest])[digest.hash])
        blobs = download(self.cas, [action.command_digest, action.input_root_digest])
        command = re_pb2.Command.FromString(blobs[action.command_digest.hash])
        root = re_pb2.Directory.FromString(blobs[action.input_root_digest.hash])
        with tempfile.TemporaryDirectory(prefix="standin-") as workspace:
            self.materialise(root, workspace)
            fetched = time.time()
            timeout = action.timeout.seconds or None
            env = {var.name: var.value for var in command.environment_variables}
            ran = subprocess.run(
                list(command.arguments),
                cwd=os.path.join(workspace, command.working_directory),
                env=env,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
            executed = time.time()
            result = re_pb2.ActionResult(exit_code=ran.returncode)
            uploads = [ran.stdout, ran.stderr]
            result.stdout_digest.CopyFrom(digest_of(ran.stdout))
            result.stderr_digest.CopyFrom(digest_of(ran.stderr))
            for path in list(command.output_paths) or list(command.output_files):
                full = os.path.join(workspace, command.working_directory, path)
                if not os.path.isfile(full):
                    continue
                with open(full, "rb") as file:
                    data = file.read()
                uploads.append(data)
                result.output_files.add(
                    path=path, digest=digest_of(data), is_executable=os.access(full, os.X_OK)
                )
            upload(self.cas, [blob for blob in uploads if blob])
        metadata = result.execution_metadata
        metadata.worker = self.bot_id
        for field, at in (
            ("worker_start_timestamp", started),
            ("input_fetch_start_timestamp", started),
            ("input_fetch_completed_timestamp", fetched),
            ("execution_start_timestamp", fetched),
            ("execution_completed_timestamp", executed),
            ("worker_completed_timestamp", time.time()),
        ):
            getattr(metadata, field).FromNanoseconds(int(at * 1e9))
        return result

    def materialise(self, directory, path):
        blobs = download(
            self.cas, [f.digest for f in directory.files] + [d.digest for d in directory.directories]
        )
        for file in directory.files:
            full = os.path.join(path, file.name)
            with open(full, "wb") as out:
                out.write(blobs[file.digest.hash])
            if file.is_executable:
                os.chmod(full, 0o755)
        for link in directory.symlinks:
            os.symlink(link.target, os.path.join(path, link.name))
        for sub in directory.directories:
            os.mkdir(os.path.join(path, sub.name))
            self.materialise(re_pb2.Directory.FromString(blobs[sub.digest.hash]), os.path.join(path, sub.name))


def bot(addr, bot_id):
    standin = StandIn(addr, bot_id)
    signal.signal(signal.SIGTERM, lambda *_: standin.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: standin.stopping.set())
    standin.run()


# The client.


class Client:
    def __init__(self, addr, expect_worker):
        channel = grpc.insecure_channel(addr)
        self.cas = re_grpc.ContentAddressableStorageStub(channel)
        self.execution = re_grpc.ExecutionStub(channel)
        self.expect_worker = expect_worker

    def prepare(self, nonces):
        """Uploads an action per nonce; answers their digests."""
        blobs = []
        digests = []
        root = re_pb2.Directory().SerializeToString()
        for nonce in nonces:
            command = re_pb2.Command(
                arguments=["/bin/sh", "-c", f"echo {nonce} > out"], output_paths=["out"]
            ).SerializeToString()
            action = re_pb2.Action(
                command_digest=digest_of(command), input_root_digest=digest_of(root)
            ).SerializeToString()
            blobs += [command, action]
            digests.append(digest_of(action))
        blobs.append(root)
        for start in range(0, len(blobs), 500):
            upload(self.cas, blobs[start : start + 500])
        return digests

    def execute(self, digest, nonce):
        """Execute, then wait on the operation stream until it is done; checks what it did."""
        last = None
        for operation in self.execution.Execute(
            re_pb2.ExecuteRequest(instance_name=INSTANCE, action_digest=digest, skip_cache_lookup=True),
            timeout=600,
        ):
            last = operation
        if last is None or not last.done or last.HasField("error"):
            raise RuntimeError(f"action {nonce}: {last}")
        response = re_pb2.ExecuteResponse()
        last.response.Unpack(response)
        result = response.result
        if response.status.code != 0 or result.exit_code != 0 or len(result.output_files) != 1:
            raise RuntimeError(f"action {nonce} failed: {response}")
        if result.output_files[0].digest != digest_of(f"{nonce}\n".encode()):
            raise RuntimeError(f"action {nonce}: unexpected output {result.output_files[0]}")
        if self.expect_worker not in result.execution_metadata.worker:
            raise RuntimeError(
                f"action {nonce} ran on {result.execution_metadata.worker!r}, not {self.expect_worker!r}"
            )


def nonces(tag, count):
    return [f"{tag}-{i}-{uuid.uuid4().hex}" for i in range(count)]


def latency(addr, runs, tag):
    client = Client(addr, os.environ.get("EXPECT_WORKER", ""))
    names = nonces(tag, runs)
    for digest, nonce in zip(client.prepare(names), names):
        began = time.monotonic()
        client.execute(digest, nonce)
        print(f"{time.monotonic() - began:.6f}", flush=True)


def throughput(addr, count, tag):
    client = Client(addr, os.environ.get("EXPECT_WORKER", ""))
    names = nonces(tag, count)
    digests = client.prepare(names)
    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        began = time.monotonic()
        for future in [pool.submit(client.execute, d, n) for d, n in zip(digests, names)]:
            future.result()
        print(f"{time.monotonic() - began:.6f}", flush=True)


def ready(addr):
    """Waits until the engine answers GetCapabilities."""
    capabilities = re_grpc.CapabilitiesStub(grpc.insecure_channel(addr))
    deadline = time.monotonic() + 180
    while True:
        try:
            capabilities.GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name=INSTANCE), timeout=5)
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main():
    match sys.argv[1:]:
        case ["ready", addr]:
            ready(addr)
        case ["bot", addr, bot_id]:
            bot(addr, bot_id)
        case ["latency", addr, runs, tag]:
            latency(addr, int(runs), tag)
        case ["throughput", addr, count, tag]:
            throughput(addr, int(count), tag)
        case _:
            sys.exit(__doc__)


if __name__ == "__main__":
    main()
