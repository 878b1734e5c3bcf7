#!/usr/bin/env python3
"""Checks a Kiln SLSA provenance envelope with independent code (cryptography
and the standard library, never Kiln's): the DSSE PAE and ed25519 signature by
the given public key, the payload and predicate types, and that every artifact's
SHA-256 is a subject. Prints a JSON summary; exits 1 on any failure.

usage: check_slsa.py ENVELOPE RUNNER_PUB_PEM ARTIFACT...
"""
import base64
import hashlib
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import load_pem_public_key


def main() -> None:
    envelope_path, pub_path, *artifacts = sys.argv[1:]
    with open(envelope_path) as f:
        env = json.load(f)
    with open(pub_path, "rb") as f:
        pub = load_pem_public_key(f.read())
    ptype = env["payloadType"]
    payload = base64.b64decode(env["payload"])
    pae = b"DSSEv1 %d %s %d %s" % (len(ptype.encode()), ptype.encode(), len(payload), payload)
    good = 0
    for sig in env["signatures"]:
        try:
            pub.verify(base64.b64decode(sig["sig"]), pae)
            good += 1
        except InvalidSignature:
            pass
    problems = []
    if good == 0:
        problems.append("no valid signature")
    if ptype != "application/vnd.in-toto+json":
        problems.append("payloadType " + ptype)
    statement = json.loads(payload)
    if statement.get("_type") != "https://in-toto.io/Statement/v1":
        problems.append("_type " + str(statement.get("_type")))
    if statement.get("predicateType") != "https://slsa.dev/provenance/v1":
        problems.append("predicateType " + str(statement.get("predicateType")))
    subjects = {s["digest"]["sha256"]: s["name"] for s in statement.get("subject", [])}
    for path in artifacts:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest not in subjects:
            problems.append(path + " is not a subject")
    predicate = statement.get("predicate", {})
    print(json.dumps({
        "ok": not problems,
        "problems": problems,
        "subjects": sorted(subjects.values()),
        "builder": predicate.get("runDetails", {}).get("builder", {}).get("id"),
        "build_type": predicate.get("buildDefinition", {}).get("buildType"),
        "dependencies": [d.get("name") for d in predicate.get("buildDefinition", {}).get("resolvedDependencies", [])],
        "byproducts": [d.get("name") for d in predicate.get("runDetails", {}).get("byproducts", [])],
    }))
    sys.exit(0 if not problems else 1)


if __name__ == "__main__":
    main()
