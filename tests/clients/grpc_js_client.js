// A SPIFFE workload using @grpc/grpc-js (npm; Node's own HTTP/2) against latch-proxy's Workload
// API, with the SPIFFE Workload API proto. Run by tests/tests/workload_api_clients.rs with
// SPIFFE_ENDPOINT_SOCKET set, as the uid under test. Prints one JSON object on stdout: the
// X509-SVID and its rotation, the X.509 bundles, the JWT bundles, a JWT-SVID (verified here with
// Node's crypto) and ValidateJWTSVID's answers.
//
//   node grpc_js_client.js PROTO fetch ROTATION_WAIT_SECONDS
//   node grpc_js_client.js PROTO refused
'use strict';

const crypto = require('crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [protoPath, mode, wait] = process.argv.slice(2);
const definition = protoLoader.loadSync(protoPath, { keepCase: true, defaults: true });
const { SpiffeWorkloadAPI } = grpc.loadPackageDefinition(definition);
const client = new SpiffeWorkloadAPI(
  process.env.SPIFFE_ENDPOINT_SOCKET,
  grpc.credentials.createInsecure(),
);
const metadata = new grpc.Metadata();
metadata.set('workload.spiffe.io', 'true');

// The first certificate of concatenated DER: a SEQUENCE with a short or long form length.
function firstDer(bytes) {
  let length = bytes[1];
  let header = 2;
  if (length & 0x80) {
    const octets = length & 0x7f;
    length = 0;
    for (let i = 0; i < octets; i++) length = length * 256 + bytes[2 + i];
    header += octets;
  }
  return bytes.subarray(0, header + length);
}

function done(result) {
  process.stdout.write(JSON.stringify(result) + '\n');
  client.close();
  process.exit(0);
}

function refused() {
  const call = client.FetchX509SVID({}, metadata);
  call.on('data', () => done({ error: null }));
  call.on('error', (e) => done({ error: `${grpc.status[e.code]}: ${e.details}` }));
}

function fetch() {
  const result = { serials: [] };
  const call = client.FetchX509SVID({}, metadata);
  const timer = setTimeout(() => { call.cancel(); bundles(result); }, Number(wait) * 1000);
  call.on('data', (response) => {
    const svid = response.svids[0];
    const leaf = new crypto.X509Certificate(firstDer(svid.x509_svid));
    const key = crypto.createPrivateKey({ key: svid.x509_svid_key, format: 'der', type: 'pkcs8' });
    result.spiffe_id = svid.spiffe_id;
    result.uri_san = leaf.subjectAltName;
    result.key_matches_leaf = leaf.checkPrivateKey(key);
    const serial = leaf.serialNumber.toLowerCase().replace(/^0+/, '');
    if (!result.serials.includes(serial)) result.serials.push(serial);
    if (result.serials.length >= 2) {
      clearTimeout(timer);
      call.cancel();
      bundles(result);
    }
  });
  call.on('error', (e) => {
    if (e.code !== grpc.status.CANCELLED) result.stream_error = `${grpc.status[e.code]}: ${e.details}`;
  });
}

function bundles(result) {
  const call = client.FetchX509Bundles({}, metadata);
  call.on('data', (response) => {
    result.bundles = {};
    for (const [trustDomain, der] of Object.entries(response.bundles)) {
      result.bundles[trustDomain] = new crypto.X509Certificate(firstDer(der)).ca;
    }
    call.cancel();
    jwt(result);
  });
  call.on('error', (e) => {
    if (e.code !== grpc.status.CANCELLED) done({ ...result, bundles_error: e.details });
  });
}

// The JWT bundles, a JWT-SVID for audience "db" checked here with Node's own crypto against the
// bundle's JWKS, then ValidateJWTSVID for "db" and for another audience.
function jwt(result) {
  const call = client.FetchJWTBundles({}, metadata);
  call.on('data', (response) => {
    call.cancel();
    const jwks = {};
    for (const [trustDomain, json] of Object.entries(response.bundles)) {
      jwks[trustDomain] = JSON.parse(Buffer.from(json).toString());
    }
    result.jwt_bundle_keys = Object.fromEntries(
      Object.entries(jwks).map(([td, set]) => [td, set.keys.length]));
    client.FetchJWTSVID({ audience: ['db'] }, metadata, (e, svids) => {
      if (e) return done({ ...result, jwt_error: `${grpc.status[e.code]}: ${e.details}` });
      const svid = svids.svids[0];
      result.jwt_spiffe_id = svid.spiffe_id;
      result.jwt_verified_by_node = verify(svid.svid, jwks);
      client.ValidateJWTSVID({ audience: 'db', svid: svid.svid }, metadata, (e, valid) => {
        result.validate = e ? `${grpc.status[e.code]}: ${e.details}` : valid.spiffe_id;
        client.ValidateJWTSVID({ audience: 'not-db', svid: svid.svid }, metadata, (e) => {
          result.validate_other_audience = e ? grpc.status[e.code] : 'accepted';
          done(result);
        });
      });
    });
  });
  call.on('error', (e) => {
    if (e.code !== grpc.status.CANCELLED) done({ ...result, jwt_bundles_error: e.details });
  });
}

// ES256 signature, sub and aud of `token` against the key its kid names in any bundle.
function verify(token, jwks) {
  const [header, payload, signature] = token.split('.');
  const { kid, alg } = JSON.parse(Buffer.from(header, 'base64url').toString());
  const claims = JSON.parse(Buffer.from(payload, 'base64url').toString());
  const jwk = Object.values(jwks).flatMap((set) => set.keys).find((k) => k.kid === kid);
  if (!jwk || alg !== 'ES256') return false;
  const ok = crypto.verify('sha256', Buffer.from(`${header}.${payload}`),
    { key: crypto.createPublicKey({ key: jwk, format: 'jwk' }), dsaEncoding: 'ieee-p1363' },
    Buffer.from(signature, 'base64url'));
  const aud = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
  return ok && aud.includes('db') && claims.sub.startsWith('spiffe://') && claims.exp * 1000 > Date.now();
}

if (mode === 'fetch') fetch(); else refused();
