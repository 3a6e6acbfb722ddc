// Runs core's `hot_path` example built for wasm32-wasip1 in Node's V8 (the engine Envoy embeds),
// so that the VM's own work on a request can be counted and profiled apart from Envoy's host
// calls: `bench/vm_instructions.sh` (instructions per S0 stream under callgrind) and
// `node --cpu-prof bench/vm_stream.mjs FILE` (which functions the time goes to; callgrind cannot
// name functions inside V8's compiled Wasm, a sampling profile can). BENCHMARKS.md, Method.
import { readFileSync } from 'node:fs';
import { WASI } from 'node:wasi';

const wasi = new WASI({ version: 'preview1', args: ['hot_path'], env: process.env, preopens: {} });
const module = await WebAssembly.compile(readFileSync(process.argv[2]));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
wasi.start(instance);
