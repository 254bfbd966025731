// Instantiates the wasm module and hands back wasm-bindgen's bindings (the `Tracker`
// class). wasm-bindgen runs with `--target bundler`, and this file is the loader: it
// accepts the bytes, a URL, a Response (or a promise of one) or a WebAssembly.Module.
// Nothing runs at import: the wasm is touched when a tracker starts.
import { Tracker, __wbg_set_wasm } from '../pkg/tracklet_sdk_wasm_bg.js';
// The import object under the short names wasm-opt gave the imports (npm/build.mjs).
import { imports, start } from '../pkg/imports.js';

async function instantiate(source) {
  let src = await source;
  if (typeof src === 'string' || src instanceof URL) src = await fetch(src);
  if (typeof Response === 'function' && src instanceof Response) {
    if (!src.ok) throw new Error('tracklet: HTTP ' + src.status + ' loading ' + src.url);
    // Not instantiateStreaming: it refuses servers that do not send application/wasm.
    src = await src.arrayBuffer();
  }
  const r = await WebAssembly.instantiate(src, imports);
  const instance = r.instance || r;
  __wbg_set_wasm(instance.exports);
  // wasm-bindgen's start-up (its externref table), as its bundler entry would run it.
  if (start) instance.exports[start]();
  return { Tracker };
}

/** `load()` for facade.makeInit: loads once; a failed load (bad URL, offline) may be retried. */
export function wasmLoader(source) {
  let loading = null;
  return () =>
    (loading =
      loading ||
      Promise.resolve()
        .then(() => instantiate(source()))
        .catch((e) => {
          loading = null;
          throw e;
        }));
}
