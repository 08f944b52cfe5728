#!/usr/bin/env node
// Minimal non-Python consumer of an exported stimage model.
//
//   node predict.js MODEL.onnx TILES.u8 N
//
// TILES.u8 holds N RGB tiles as raw uint8, row-major (N, tile_px, tile_px, 3): the same
// input the Python runtime feeds. Prints one JSON object: the ensemble mean per tile and
// gene (the average of the members' NB means), plus the members' NB parameters, so a
// service can compute the uncertainty decomposition itself:
//   aleatoric = mean_m(mu_m + mu_m^2 / r_m),  epistemic = mean_m((mu_m - mean)^2).
'use strict';
const fs = require('fs');
const ort = require('onnxruntime-node');

async function main() {
  const [modelPath, tilesPath, nArg] = process.argv.slice(2);
  if (!modelPath || !tilesPath || !nArg) {
    console.error('usage: node predict.js MODEL.onnx TILES.u8 N');
    process.exit(2);
  }
  const n = parseInt(nArg, 10);
  const bytes = fs.readFileSync(tilesPath);
  const px = Math.round(Math.sqrt(bytes.length / (3 * n)));
  if (n * px * px * 3 !== bytes.length) {
    console.error(`stimage: error: ${tilesPath} holds ${bytes.length} bytes, not ${n} square RGB tiles`);
    process.exit(2);
  }
  const session = await ort.InferenceSession.create(modelPath, { executionProviders: ['cpu'] });
  const tiles = new ort.Tensor('uint8', new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.length), [n, px, px, 3]);
  const out = await session.run({ tiles });
  const [m, b, g] = out.mu.dims;
  const mu = out.mu.data;
  const mean = [];
  for (let i = 0; i < b; i++) {
    const row = new Array(g).fill(0);
    for (let k = 0; k < m; k++) for (let j = 0; j < g; j++) row[j] += mu[(k * b + i) * g + j] / m;
    mean.push(row);
  }
  console.log(JSON.stringify({ members: m, tiles: b, genes: g, mean,
    mu: Array.from(mu), r: Array.from(out.r.data) }));
}

main().catch((e) => { console.error(`stimage: error: ${e.message.split('\n')[0]}`); process.exit(1); });
