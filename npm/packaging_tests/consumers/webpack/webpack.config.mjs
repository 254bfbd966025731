// A plain webpack 5 app. The default entry needs no configuration; the one rule below is
// for the slim entry, which imports tracklet.wasm as a file URL.
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));

export default {
  mode: 'production',
  entry: { main: './src/main.js', slim: './src/slim.js' },
  output: { path: join(here, 'dist'), filename: '[name].js', clean: true },
  module: { rules: [{ test: /\.wasm$/, type: 'asset/resource' }] },
  performance: { hints: false },
};
