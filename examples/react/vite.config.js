// No plugin and no wasm configuration: `tracklet` inlines its wasm.
import { defineConfig } from 'vite';

export default defineConfig({
  base: './',
});
