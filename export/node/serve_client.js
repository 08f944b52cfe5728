#!/usr/bin/env node
// Minimal Node.js client of `stimage serve` (Open Inference Protocol v2 REST, Triton's
// binary-tensor extension); needs Node >= 18 (global fetch) and no npm package.
//
//   node serve_client.js URL MODEL TILES.u8 N [--token T] [--outputs mean,var_aleatoric,var_epistemic,q_lo,q_hi]
//
// TILES.u8 holds N RGB tiles as raw uint8, row-major (N, tile_px, tile_px, 3). Prints one
// JSON object: {model_name, model_version, genes, <output>: N rows of per-gene values}.
'use strict';
const fs = require('fs');

function parseArgs(argv) {
  const pos = [], opt = { outputs: 'mean,var_aleatoric,var_epistemic,q_lo,q_hi', token: process.env.STIMAGE_SERVE_TOKEN };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--token') opt.token = argv[++i];
    else if (argv[i] === '--outputs') opt.outputs = argv[++i];
    else pos.push(argv[i]);
  }
  return [pos, opt];
}

async function main() {
  const [[url, model, tilesPath, nArg], opt] = parseArgs(process.argv.slice(2));
  if (!url || !model || !tilesPath || !nArg) {
    console.error('usage: node serve_client.js URL MODEL TILES.u8 N [--token T] [--outputs a,b]');
    process.exit(2);
  }
  const base = url.replace(/\/$/, '');
  const headers = opt.token ? { Authorization: `Bearer ${opt.token}` } : {};
  const meta = await (await fetch(`${base}/v2/models/${model}`, { headers })).json();
  if (meta.error) throw new Error(meta.error);
  const n = parseInt(nArg, 10);
  const bytes = fs.readFileSync(tilesPath);
  const px = meta.parameters.tile_px;
  if (n * px * px * 3 !== bytes.length) {
    console.error(`stimage: error: ${tilesPath} holds ${bytes.length} bytes, not ${n} RGB tiles of ${px} px`);
    process.exit(2);
  }
  const header = Buffer.from(JSON.stringify({
    inputs: [{ name: 'tiles', datatype: 'UINT8', shape: [n, px, px, 3], parameters: { binary_data_size: bytes.length } }],
    outputs: opt.outputs.split(',').map((name) => ({ name, parameters: { binary_data: true } })),
  }));
  const res = await fetch(`${base}/v2/models/${model}/infer`, {
    method: 'POST',
    headers: { ...headers, 'Content-Type': 'application/octet-stream', 'Inference-Header-Content-Length': String(header.length) },
    body: Buffer.concat([header, bytes]),
  });
  const body = Buffer.from(await res.arrayBuffer());
  const hlen = res.headers.get('inference-header-content-length');
  const reply = JSON.parse(body.subarray(0, hlen === null ? body.length : parseInt(hlen, 10)).toString());
  if (!res.ok) throw new Error(`${res.status}: ${reply.error}`);
  const out = { model_name: reply.model_name, model_version: reply.model_version, genes: meta.parameters.genes };
  let offset = hlen === null ? body.length : parseInt(hlen, 10);
  for (const t of reply.outputs) {
    let flat;
    if (t.parameters && t.parameters.binary_data_size !== undefined) {
      const size = t.parameters.binary_data_size;  // FP32, little-endian
      const copy = new Uint8Array(body.subarray(offset, offset + size));
      flat = Array.from(new Float32Array(copy.buffer));
      offset += size;
    } else {
      flat = t.data;
    }
    const cols = t.shape.slice(1).reduce((a, b) => a * b, 1);
    out[t.name] = Array.from({ length: t.shape[0] }, (_, i) => flat.slice(i * cols, (i + 1) * cols));
  }
  console.log(JSON.stringify(out));
}

main().catch((e) => { console.error(`stimage: error: ${e.message.split('\n')[0]}`); process.exit(1); });
