// Verifies a Sigstore bundle offline with npm's @sigstore/verify, trusting one
// public key under one key id (the bundle's `verificationMaterial.publicKey.hint`
// must name it). Kiln's bundles carry no transparency log entries, certificates
// or timestamps, so those thresholds are 0; the signature over the DSSE
// envelope is what is checked (crypto.verify with the key's own algorithm:
// Ed25519, or ECDSA P-256 with SHA-256 and a DER signature).
//
//   KILN_SIGSTORE_VERIFY=<dir of the @sigstore/verify package> \
//     node verify-bundle.js BUNDLE.json PUBLIC_KEY.pem KEYID
//
// Exit 0 and "verified" on stdout when it verifies; exit 1 and the reason on
// stderr when it does not; exit 2 on a usage error.
'use strict';

const fs = require('fs');
const path = require('path');
const { createRequire } = require('module');

const [bundlePath, keyPath, keyid] = process.argv.slice(2);
const packageDir = process.env.KILN_SIGSTORE_VERIFY;
if (!bundlePath || !keyPath || !keyid || !packageDir) {
  console.error('usage: KILN_SIGSTORE_VERIFY=DIR node verify-bundle.js BUNDLE KEY.pem KEYID');
  process.exit(2);
}

// Resolve the package and its own dependencies from where npm installed them.
const load = createRequire(path.join(packageDir, 'package.json'));
const { Verifier, toSignedEntity, toTrustMaterial } = load('@sigstore/verify');
const { bundleFromJSON } = load('@sigstore/bundle');
const crypto = require('crypto');

try {
  const bundle = bundleFromJSON(JSON.parse(fs.readFileSync(bundlePath, 'utf8')));
  const key = crypto.createPublicKey(fs.readFileSync(keyPath, 'utf8'));
  // No Sigstore roots at all: only the given key is trusted.
  const emptyRoot = {
    certificateAuthorities: [],
    timestampAuthorities: [],
    tlogs: [],
    ctlogs: [],
  };
  const trust = toTrustMaterial(emptyRoot, (hint) => {
    if (hint !== keyid) {
      throw new Error(`key not found: ${hint}`);
    }
    return { publicKey: key, validFor: () => true };
  });
  const verifier = new Verifier(trust, {
    tlogThreshold: 0,
    ctlogThreshold: 0,
    timestampThreshold: 0,
  });
  verifier.verify(toSignedEntity(bundle));
  console.log(`verified: ${bundle.content.dsseEnvelope.payloadType} signed by ${keyid} (${key.asymmetricKeyType})`);
} catch (e) {
  console.error(`not verified: ${e.code ? e.code + ': ' : ''}${e.message}`);
  process.exit(1);
}
