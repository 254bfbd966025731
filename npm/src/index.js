// The default ESM entry, `import { init } from 'tracklet'`: the wasm is inlined (base64,
// decoded on first use), so bundlers need no wasm configuration and there is no second
// request. Importing this module touches no browser global (SSR-safe).
import { makeInit, VERSION } from './facade.js';
import { wasmLoader } from './wasm-loader.js';
// build.mjs loads .wasm files as base64 strings.
import wasmBase64 from '../pkg/tracklet_sdk_wasm_bg.wasm';

function decode(b64) {
  const s = atob(b64);
  const bytes = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
  return bytes;
}

export const init = makeInit(wasmLoader(() => decode(wasmBase64)));
export { VERSION };
export default { init, VERSION };
