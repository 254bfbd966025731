// Bundles the JavaScript around the wasm (already built into npm/pkg by `cargo xtask build`)
// into npm/dist:
//   tracklet.js + tracklet.wasm   the script-tag build (defines window.tracklet)
import { build } from 'esbuild';
import { copyFileSync, mkdirSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, 'dist');
rmSync(dist, { recursive: true, force: true });
mkdirSync(dist, { recursive: true });

const common = { bundle: true, minify: true, target: 'es2020', logLevel: 'warning', legalComments: 'none' };

await build({
  ...common,
  entryPoints: [join(here, 'src/script-tag.js')],
  format: 'iife',
  outfile: join(dist, 'tracklet.js'),
  // wasm-bindgen's default path uses import.meta.url; the script tag always passes a URL.
  define: { 'import.meta.url': 'undefined' },
});
copyFileSync(join(here, 'pkg/tracklet_sdk_wasm_bg.wasm'), join(dist, 'tracklet.wasm'));
console.log('npm/dist: tracklet.js, tracklet.wasm');
