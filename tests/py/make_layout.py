#!/usr/bin/env python3
"""Writes an in-toto layout signed by a fresh owner key, using only the reference
implementation (in-toto 3.1 and securesystemslib), never Kiln's own code.

usage: make_layout.py SPEC.json OUT_LAYOUT OUT_OWNER_PUB

SPEC.json:
  {"functionary_pub": "runner.pub",            # SPKI PEM of the runner key
   "owner_key_type": "ed25519" | "ecdsa",      # optional, default ed25519
   "steps":   [{"name", "expected_command", "expected_materials", "expected_products"}],
   "inspect": [{"name", "run", "expected_materials", "expected_products"}]}
"""
import json
import sys

from cryptography.hazmat.primitives import serialization
from in_toto.models.layout import Inspection, Layout, Step
from in_toto.models.metadata import Metablock
from securesystemslib.signer import CryptoSigner


def main() -> None:
    spec_path, layout_path, owner_pub_path = sys.argv[1:4]
    with open(spec_path) as f:
        spec = json.load(f)

    if spec.get("owner_key_type", "ed25519") == "ecdsa":
        owner = CryptoSigner.generate_ecdsa()
    else:
        owner = CryptoSigner.generate_ed25519()
    pem = owner._private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with open(owner_pub_path, "wb") as f:
        f.write(pem)

    layout = Layout()
    layout.set_relative_expiration(days=1)
    runner_key = layout.add_functionary_key_from_path(spec["functionary_pub"])
    for s in spec["steps"]:
        layout.steps.append(
            Step(
                name=s["name"],
                expected_command=s.get("expected_command", []),
                pubkeys=[runner_key["keyid"]],
                threshold=1,
                expected_materials=s.get("expected_materials", []),
                expected_products=s.get("expected_products", []),
            )
        )
    for i in spec.get("inspect", []):
        layout.inspect.append(
            Inspection(
                name=i["name"],
                run=i["run"],
                expected_materials=i.get("expected_materials", []),
                expected_products=i.get("expected_products", []),
            )
        )
    metablock = Metablock(signed=layout)
    metablock.create_signature(owner)
    metablock.dump(layout_path)


if __name__ == "__main__":
    main()
