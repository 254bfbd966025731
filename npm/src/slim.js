// `tracklet/slim`: the same API without the inlined wasm. The page says where the wasm is:
//
//   import { init } from 'tracklet/slim';
//   import wasmUrl from 'tracklet/tracklet.wasm?url';   // Vite; webpack: asset/resource
//   const tracker = init({ endpoint, apiKey, wasm: wasmUrl });
//
// `wasm` is a URL (string or URL), the bytes (ArrayBuffer, typed array), a Response or
// promise of one, or a WebAssembly.Module. The first tracker's `wasm` is the one loaded.
import { makeInit, VERSION } from './facade.js';
import { wasmLoader } from './wasm-loader.js';

let wasm;
const load = wasmLoader(() => {
  if (wasm == null) throw new Error('tracklet/slim: init() needs the `wasm` option (the URL or bytes of tracklet.wasm)');
  return wasm;
});
const start = makeInit(load);

export function init(options) {
  if (options && options.wasm != null && wasm == null) wasm = options.wasm;
  return start(options);
}
export { VERSION };
export default { init, VERSION };
