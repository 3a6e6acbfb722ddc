#!/usr/bin/env node
// Signing a request for an apisec gateway, in Node.js 18+ (no packages; SM2 alone needs the
// sm-crypto package: `npm ci` here). RFC 9421 HTTP Message Signatures with an RFC 9530
// Content-Digest.
//
//   node apisec_sign.js send --url https://gw.example.com/api/v1/info/research/r-1 \
//       --app APP_ID --keyid KEY_ID --secret-b64 APP_SECRET [--ca ca.pem]
//   node apisec_sign.js send --url https://gw.example.com/api/v1/orders --method POST \
//       --data '{"symbol":"600000","side":"buy","qty":100}' --app APP_ID --keyid KEY_ID --key app.key.pem
//   node apisec_sign.js vectors ../../vectors/signing.json   # check against the test vectors
//
// National algorithms (DATA-5; the gateway's docs/national.md): add --alg hmac-sm3 (with
// --secret-b64) or --alg sm2-sm3 (with --key sm2.key.pem, and --sm2-id ID when your key was
// registered with an ID other than the default 1234567812345678); a body then carries an sm3
// Content-Digest. SM3 and HMAC-SM3 come from Node's OpenSSL. SM2 does not: Node cannot pass
// OpenSSL a distinguishing ID, and without one OpenSSL signs with an empty ID, which the gateway
// refuses; sm-crypto signs with the ID. `vectors ../../vectors/national.json` checks them.
//
// Sessions (SES-1) and user-bound APIs (ID-4): establish by POSTing
// {"caller_code":"APP_ID","mac":"AA-BB-CC-DD-EE-01"} to /apisec/v1/sessions, then add
// --session SESSION_ID --mac AA-BB-CC-DD-EE-01 (and --sdk VERSION) to every later call:
// x-session-id, x-device-mac and x-sdk-version are sent and covered by the signature.
//
// What the gateway expects: x-app-id; with a body, content-type and content-digest
// (sha-256=:<base64>:); covered components "@method" "@authority" "@path" "@query" "x-app-id"
// (+ "content-digest"), in this order; parameters created, nonce, keyid, alg.
// ECDSA: dsaEncoding 'ieee-p1363' gives r || s, which RFC 9421 wants (not DER).
'use strict';
const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const https = require('https');
const http = require('http');

const SM2_DEFAULT_ID = '1234567812345678'; // GB/T 32918 / GM/T 0009's default distinguishing ID
const NATIONAL = new Set(['hmac-sm3', 'sm2-sm3']);

// RFC 9530 Content-Digest: sha-256, or sm3 (the national hash) with the national algorithms.
function contentDigest(body, alg) {
  const name = NATIONAL.has(alg) ? 'sm3' : 'sha-256';
  return `${name}=:` + crypto.createHash(name === 'sm3' ? 'sm3' : 'sha256').update(body).digest('base64') + ':';
}

// host[:port] as the HTTP client sends it: the port only when not the default (URL drops it).
function authority(u) {
  return u.port ? `${u.hostname.toLowerCase()}:${u.port}` : u.hostname.toLowerCase();
}

// The headers to send before the signature, the Signature-Input value and the signature base,
// exactly as the gateway rebuilds them.
function signatureParts(method, url, app, body, keyid, alg, created, nonce, extra = []) {
  const u = new URL(url);
  const headers = [['x-app-id', app], ...extra];
  const components = ['@method', '@authority', '@path', '@query', 'x-app-id', ...extra.map(([k]) => k)];
  if (body.length > 0) {
    headers.push(['content-type', 'application/json'], ['content-digest', contentDigest(body, alg)]);
    components.push('content-digest');
  }
  const params = '(' + components.map((c) => `"${c}"`).join(' ') + ')' +
    `;created=${created};nonce="${nonce}";keyid="${keyid}";alg="${alg}"`;
  const values = Object.fromEntries(headers);
  values['@method'] = method.toUpperCase();
  values['@authority'] = authority(u);
  values['@path'] = u.pathname || '/';
  values['@query'] = '?' + u.search.replace(/^\?/, '');
  const base = components.map((c) => `"${c}": ${values[c]}`).join('\n') + `\n"@signature-params": ${params}`;
  return { headers, signatureInput: 'sig1=' + params, base };
}

// The SM2 private scalar d of a PKCS#8 PEM key (what `openssl genpkey -algorithm SM2` and
// `apisec keygen sm2` write), as sm-crypto takes it: 64 hex digits. In the PKCS#8 body it is the
// ECPrivateKey's OCTET STRING after version 1 (02 01 01 04 20).
function sm2PrivateHex(keyPem) {
  const der = crypto.createPrivateKey(keyPem).export({ type: 'pkcs8', format: 'der' });
  const at = der.indexOf(Buffer.from([0x02, 0x01, 0x01, 0x04, 0x20]));
  if (at < 0) throw new Error('not an EC private key in PKCS#8');
  return der.subarray(at + 5, at + 37).toString('hex');
}

function signBase(base, alg, secretB64, keyPem, sm2Id = SM2_DEFAULT_ID) {
  let raw;
  if (alg === 'hmac-sha256' || alg === 'hmac-sm3') {
    const hash = alg === 'hmac-sm3' ? 'sm3' : 'sha256';
    raw = crypto.createHmac(hash, Buffer.from(secretB64, 'base64')).update(base, 'utf8').digest();
  } else if (alg === 'sm2-sm3') {
    // SM2 over SM3 with the Z value of the ID; sm-crypto returns r || s in hex (der: false).
    const { sm2 } = require('sm-crypto');
    const sig = sm2.doSignature(Buffer.from(base, 'utf8'), sm2PrivateHex(keyPem), { hash: true, der: false, userId: sm2Id });
    raw = Buffer.from(sig, 'hex');
  } else {
    raw = crypto.sign('sha256', Buffer.from(base, 'utf8'), { key: keyPem, dsaEncoding: 'ieee-p1363' });
  }
  return 'sig1=:' + raw.toString('base64') + ':';
}

function send(a) {
  const body = Buffer.from(a.data || '', 'utf8');
  const method = a.method || (body.length ? 'POST' : 'GET');
  const alg = a.alg || (a.key ? 'ecdsa-p256-sha256' : 'hmac-sha256');
  const nonce = crypto.randomBytes(18).toString('base64url');
  const extra = [['session', 'x-session-id'], ['mac', 'x-device-mac'], ['sdk', 'x-sdk-version']]
    .filter(([k]) => a[k] !== undefined).map(([k, h]) => [h, a[k]]);
  const p = signatureParts(method, a.url, a.app, body, a.keyid, alg, Math.floor(Date.now() / 1000), nonce, extra);
  const sig = signBase(p.base, alg, a['secret-b64'], a.key ? fs.readFileSync(a.key, 'utf8') : null, a['sm2-id']);
  const headers = Object.fromEntries([...p.headers, ['signature-input', p.signatureInput], ['signature', sig]]);
  if (body.length) headers['content-length'] = String(body.length);
  const u = new URL(a.url);
  const lib = u.protocol === 'https:' ? https : http;
  const req = lib.request(u, { method, headers, timeout: 10000, ca: a.ca ? fs.readFileSync(a.ca) : undefined }, (res) => {
    let out = '';
    res.setEncoding('utf8');
    res.on('data', (d) => { out += d; });
    res.on('end', () => {
      console.log(res.statusCode);
      console.log(out);
      process.exitCode = res.statusCode >= 200 && res.statusCode < 300 ? 0 : 1;
    });
  });
  req.on('error', (e) => { console.error(e.message); process.exitCode = 2; });
  req.end(body);
}

function vectors(file) {
  const doc = JSON.parse(fs.readFileSync(file, 'utf8'));
  for (const c of doc.cases) {
    const key = doc.keys[c.key];
    const p = signatureParts(c.request.method, c.request.url, doc.app_id, Buffer.from(c.request.body, 'utf8'),
      c.params.keyid, c.params.alg, c.params.created, c.params.nonce);
    const keyPem = key.private_key_file ? fs.readFileSync(path.join(path.dirname(file), key.private_key_file), 'utf8') : null;
    const digest = p.headers.find(([k]) => k === 'content-digest');
    console.log(JSON.stringify({
      name: c.name, 'content-digest': digest ? digest[1] : null, 'signature-input': p.signatureInput,
      signature_base: p.base, signature: signBase(p.base, c.params.alg, key.secret_b64, keyPem, key.sm2_id),
    }));
  }
}

const argv = process.argv.slice(2);
if (argv.length === 2 && argv[0] === 'vectors') {
  vectors(argv[1]);
} else if (argv[0] === 'send' && argv.length % 2 === 1) {
  const a = {};
  for (let i = 1; i < argv.length; i += 2) a[argv[i].replace(/^--/, '')] = argv[i + 1];
  send(a);
} else {
  console.error('usage: node apisec_sign.js (send --url URL --app APP --keyid KEYID (--secret-b64 S | --key PEM) [--alg hmac-sm3|sm2-sm3 [--sm2-id ID]] [--method M] [--data BODY] [--ca CA] [--session ID --mac MAC] [--sdk VERSION] | vectors FILE)');
  process.exitCode = 2;
}
