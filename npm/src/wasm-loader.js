// Shared by the ESM entries (index.js, slim.js): loads the wasm-bindgen module once, from
// whatever `source()` returns (bytes, a URL, a Response or a WebAssembly.Module).
// Nothing runs at import: the wasm is only touched when a tracker starts in a browser.
import wasmInit, { Engine } from '../pkg/tracklet_sdk_wasm.js';

/** `load()` for facade.makeInit. A failed load (bad URL, offline) may be retried later. */
export function wasmLoader(source) {
  let loading = null;
  return () =>
    (loading =
      loading ||
      Promise.resolve()
        .then(() => wasmInit({ module_or_path: source() }))
        .then(
          () => ({ Engine }),
          (e) => {
            loading = null;
            throw e;
          },
        ));
}
