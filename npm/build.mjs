// Bundles the JavaScript around the wasm (already built into npm/pkg by `cargo xtask build`)
// into npm/dist:
//   tracklet.js + tracklet.wasm   the script-tag build (defines window.tracklet)
//   index.js                      ESM, `import { init } from 'tracklet'`, wasm inlined (base64)
//   slim.js                       ESM, `tracklet/slim`: the page passes tracklet.wasm's URL or bytes
//   react.js                      ESM, `tracklet/react`: imports ./index.js and react
import { build } from 'esbuild';
import { minify } from 'terser';
import { copyFileSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, 'dist');
rmSync(dist, { recursive: true, force: true });
mkdirSync(dist, { recursive: true });

const common = { bundle: true, minify: true, target: 'es2020', logLevel: 'warning', legalComments: 'none' };
// wasm-bindgen's default path uses import.meta.url; every entry passes the wasm itself, and
// without the reference bundlers do not go looking for tracklet_sdk_wasm_bg.wasm.
const noImportMetaUrl = { 'import.meta.url': 'undefined' };

// tracklet.js is minified by esbuild, then again by terser: its compressor and its
// frequency-ordered short names take another 4 % off the gzipped size.
const scriptTag = await build({
  ...common,
  entryPoints: [join(here, 'src/script-tag.js')],
  format: 'iife',
  write: false,
  define: noImportMetaUrl,
});
const terse = await minify(scriptTag.outputFiles[0].text, {
  ecma: 2020,
  compress: { passes: 2, hoist_funs: true },
  format: { comments: false },
});
writeFileSync(join(dist, 'tracklet.js'), terse.code);
copyFileSync(join(here, 'pkg/tracklet_sdk_wasm_bg.wasm'), join(dist, 'tracklet.wasm'));

// The ESM entries are not minified (the consumer's bundler does that) so stack traces and
// tree-shaking stay readable; they keep `export` and reference no browser global at import.
const esm = { ...common, minify: false, format: 'esm', platform: 'neutral', define: noImportMetaUrl };
await build({
  ...esm,
  entryPoints: { index: join(here, 'src/index.js'), slim: join(here, 'src/slim.js') },
  outdir: dist,
  loader: { '.wasm': 'base64' },
});
await build({
  ...esm,
  entryPoints: { react: join(here, 'src/react.js') },
  outdir: dist,
  // Next.js app router: the provider and hook are client components.
  banner: { js: "'use client';" },
  external: ['react'],
  plugins: [
    {
      // The binding shares the default entry's tracker module instead of bundling a copy.
      name: 'react-uses-index',
      setup(b) {
        b.onResolve({ filter: /^\.\/index\.js$/ }, () => ({ path: './index.js', external: true }));
      },
    },
  ],
});
console.log('npm/dist: tracklet.js, tracklet.wasm, index.js, slim.js, react.js');
